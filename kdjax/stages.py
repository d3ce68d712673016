"""The pre-training stage of two-stage methods (RepDistiller helper/pretrain.py, `init_epochs` = 30 for AB, FT, FSP).

`config.distill.init` describes it:

  epochs        the stage's length; 0 = no stage. `config.epochs` counts it: a run trains `init.epochs` stage epochs
                then `epochs - init.epochs` main ones, and the main schedule (decay epochs, warmup, cosine length)
                is counted from the stage's end.
  losses        term -> weight during the stage ({'ab': 1.0}); outside it `distill.losses` apply. A term named only
                here is still computed in the main stage, with weight 0.
  train         the parameter subtrees the stage trains, as '/'-joined prefixes of the train state's parameter paths
                ('student/backbone', 'extras/ab', 'extras/ft/paraphraser'). Everything else keeps its parameters AND
                its non-trained state (BatchNorm statistics) bit-identical during the stage.
  lr            the stage's constant learning rate; 0 = `optimizer.lr`.
  freeze_after  parameter subtrees the main stage never updates (FT's paraphraser, AB's connectors): RepDistiller's
                main optimizer does not hold them.

Everything is a function of the step counter, inside the one compiled train step: the step selects the stage's or
the main weights with `jnp.where`, masks the updates (and state) of what its stage does not train, and at the first
main step restarts the optimizer's moment buffers (the reference makes a fresh optimizer there). A run resumed from
a checkpoint continues in the right stage.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from kdjax.errors import ConfigError


# `config.distill.init`'s fields and defaults: config_lib.base() builds the section from them. A config file may set
# the section whole, naming only the fields it sets (configs/cifar100.py: FSP's stage has no `freeze_after`), so the
# readers below take an absent field's default from here (`field`).
DEFAULTS = dict(epochs=0, losses={}, train=(), lr=0.0, freeze_after=())


def field(cfg_distill, name: str):
  """`config.distill.init.<name>`, its default when the config's init section leaves it out."""
  init = cfg_distill.init
  return init[name] if name in init else DEFAULTS[name]


def epochs(cfg) -> int:
  return int(field(cfg.distill, 'epochs'))


def steps(cfg, steps_per_epoch: int) -> int:
  """The stage's length in steps (0 = no stage)."""
  return epochs(cfg) * steps_per_epoch


def stage_losses(cfg_distill) -> dict:
  if int(field(cfg_distill, 'epochs')) <= 0:
    return {}
  return dict(field(cfg_distill, 'losses'))


def loss_weights(cfg_distill, names, in_stage) -> dict:
  """{term: weight} for this step: the stage's weights while `in_stage`, else `distill.losses` (0 for a term named
  only in the stage)."""
  stage = stage_losses(cfg_distill)
  main = cfg_distill.losses
  return {n: jnp.where(in_stage, stage.get(n, 0.0), main.get(n, 0.0)) for n in names}


def schedule(cfg, steps_per_epoch: int, main: optax.Schedule) -> optax.Schedule:
  """The stage's constant learning rate for its steps, then `main` counted from the stage's end."""
  n = steps(cfg, steps_per_epoch)
  if not n:
    return main
  lr = float(field(cfg.distill, 'lr')) or cfg.optimizer.lr
  return optax.join_schedules([optax.constant_schedule(lr), main], [n])


def _path(path) -> tuple:
  return tuple(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def _matches(path: tuple, prefixes) -> bool:
  return any(path[:len(p)] == p for p in prefixes)


def _prefixes(paths, field: str, params, terms=()) -> list[tuple]:
  """The '/'-joined `paths` as key tuples; each must name at least one parameter of `params`, or be an enabled
  term's extra module, 'extras/<term>' (AB's connectors are all identities, without parameters, on some pairs)."""
  leaves = [_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  out = []
  for text in paths:
    prefix = tuple(k for k in str(text).split('/') if k)
    if prefix[:1] == ('extras',) and len(prefix) == 2 and prefix[1] in terms:
      out.append(prefix)
      continue
    if not prefix or not any(_matches(leaf, [prefix]) for leaf in leaves):
      tops = sorted({'/'.join(l[:3]) for l in leaves})
      raise ConfigError(f'config.distill.init.{field}: {text!r} names no parameter; parameter subtrees: '
                        f'{", ".join(tops)}')
    out.append(prefix)
  return out


class Masks:
  """Which leaves of the parameters and of the non-trained state each stage updates (static, from the config)."""

  def __init__(self, cfg, params, terms=()):
    self.stage = _prefixes(field(cfg.distill, 'train'), 'train', params, terms) if epochs(cfg) else []
    self.frozen = _prefixes(field(cfg.distill, 'freeze_after'), 'freeze_after', params, terms)
    if epochs(cfg) and not self.stage:
      raise ConfigError('config.distill.init.train is empty: name what the pre-training stage trains, e.g. '
                        "('student/backbone',)")

  def _select(self, new, old, in_stage, state: bool):
    def pick(path, a, b):
      p = _path(path)
      if state:  # {'student': {'batch_stats': {...}}}: the collection name sits after the top-level key
        p = p[:1] + p[2:]
      in_stage_value = a if _matches(p, self.stage) else b
      in_main_value = b if _matches(p, self.frozen) else a
      if in_stage_value is in_main_value:
        return a if in_stage_value is a else b
      return jnp.where(in_stage, in_stage_value, in_main_value)
    return jax.tree_util.tree_map_with_path(pick, new, old)

  def params(self, new, old, in_stage):
    return self._select(new, old, in_stage, state=False)

  def state(self, new, old, in_stage):
    return self._select(new, old, in_stage, state=True)


def needed(cfg) -> bool:
  """Whether the step masks anything: a stage, or parameters the main stage keeps fixed."""
  return bool(epochs(cfg) or tuple(field(cfg.distill, 'freeze_after')))


def restart_moments(opt_state, fresh, at_start):
  """The optimizer state with its float leaves (momentum, Adam moments) replaced by `fresh`'s at the first main
  step; integer counters (the schedule's step count) continue."""
  return jax.tree.map(lambda f, o: jnp.where(at_start, f, o) if jnp.issubdtype(o.dtype, jnp.floating) else o,
                      fresh, opt_state)
