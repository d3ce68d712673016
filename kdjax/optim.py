"""Optimizer and learning-rate schedule, built from optax pieces to train exactly as the PyTorch references do."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import optax

from kdjax import stages
from kdjax.errors import ConfigError


def schedule(cfg, steps_per_epoch: int) -> optax.Schedule:
  """`cfg.schedule.name`: 'step' (x decay_factor at each of decay_epochs), 'cosine' or 'constant'; optional linear
  warmup over `warmup_epochs`. Boundaries are epoch ends, as torch's MultiStepLR stepped once per epoch. A cosine
  reaches its end at `length_epochs` (0: the run's end), a number a sweep may vary (`traced_cosine`)."""
  s, lr = cfg.schedule, cfg.optimizer.lr
  warmup = int(s.warmup_epochs * steps_per_epoch)
  total = (cfg.epochs - stages.epochs(cfg)) * steps_per_epoch  # the main stage's (kdjax/stages.py)
  if s.name == 'cosine' and not isinstance(s.length_epochs, numbers.Real):  # swept: an array
    main = traced_cosine(lr, s.length_epochs * steps_per_epoch - warmup, s.final_fraction)
  elif s.name == 'step':
    main = optax.piecewise_constant_schedule(
        lr, {int(e * steps_per_epoch) - warmup: s.decay_factor for e in s.decay_epochs})
  elif s.name == 'cosine':
    total = int(s.length_epochs * steps_per_epoch) if s.length_epochs else total
    main = optax.cosine_decay_schedule(lr, max(total - warmup, 1), alpha=s.final_fraction)
  elif s.name == 'constant':
    main = optax.constant_schedule(lr)
  else:
    raise ConfigError(f"unknown schedule {s.name!r}; choose 'step', 'cosine' or 'constant'")
  if warmup:
    main = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])
  return stages.schedule(cfg, steps_per_epoch, main)  # after the pre-training stage's constant rate, if any


def traced_cosine(lr, decay_steps, final_fraction) -> optax.Schedule:
  """optax.cosine_decay_schedule's arithmetic with a traced length (a swept `schedule.length_epochs`): the rate
  falls from `lr` to `final_fraction * lr` over `decay_steps` steps and stays there."""
  def fn(count):
    steps = jnp.maximum(decay_steps, 1)
    count = jnp.minimum(count, steps)
    decayed = (1 - final_fraction) * (0.5 * (1 + jnp.cos(jnp.pi * count / steps))) + final_fraction
    return lr * decayed
  return fn


def optimizer(cfg, steps_per_epoch: int) -> optax.GradientTransformation:
  """The optimizer over {'student': ..., 'extras': ...}; with `student.freeze_backbone` only the student's head and
  the methods' extra modules are trained (fine-tuning)."""
  if cfg.optimizer.name == 'dot':
    if cfg.optimizer.clip_norm:
      raise ConfigError("config.optimizer.clip_norm is not applied by optimizer.name='dot' (two gradients); set 0")
    if cfg.student.freeze_backbone:
      raise ConfigError("config.optimizer.name='dot' cannot train a frozen backbone (student.freeze_backbone)")
    return dot(cfg, steps_per_epoch)
  tx = _base_optimizer(cfg, steps_per_epoch)
  if cfg.optimizer.clip_norm:  # big_vision's grad_clip_norm: the whole gradient rescaled to this global norm
    tx = optax.chain(optax.clip_by_global_norm(cfg.optimizer.clip_norm), tx)
  if not cfg.student.freeze_backbone:
    return tx

  def labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: 'frozen' if [getattr(k, 'key', None) for k in path[:2]] == ['student', 'backbone']
        else 'trained', params)

  return optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()}, labels)


def _base_optimizer(cfg, steps_per_epoch: int) -> optax.GradientTransformation:
  """torch.optim.SGD semantics: weight decay added to the gradient before momentum, on every parameter;
  buf = m * buf + g; step = lr * buf (or lr * (g + m * buf) with Nesterov)."""
  o = cfg.optimizer
  lr = schedule(cfg, steps_per_epoch)
  if o.name == 'sgd':
    # A swept momentum is an array: keep the momentum buffer then (momentum 0 through it is plain SGD).
    momentum = o.momentum if not isinstance(o.momentum, (int, float)) or o.momentum else None
    return optax.chain(optax.add_decayed_weights(o.weight_decay),
                       optax.sgd(lr, momentum=momentum, nesterov=o.nesterov))
  if o.name == 'adam':
    return optax.chain(optax.add_decayed_weights(o.weight_decay), optax.adam(lr))
  if o.name == 'adamw':
    return optax.adamw(lr, weight_decay=o.weight_decay)
  raise ConfigError(f"unknown optimizer {o.name!r}; choose 'sgd', 'adam', 'adamw' or 'dot'")


# --------------------------------------------------------------------------------------------------------- DOT
# Terms whose gradient DOT treats as the task gradient; every other term's is the distillation gradient.
DOT_TASK_TERMS = ('ce', 'ce_strong')


def dot(cfg, steps_per_epoch: int) -> optax.GradientTransformation:
  """DOT, the Distillation-Oriented Trainer (Zhao et al., ICCV 2023; mdistiller engine/dot.py and the DOT trainer in
  engine/trainer.py): SGD with one momentum buffer for the task-loss gradient, momentum m - delta, and one for the
  distillation-loss gradient, momentum m + delta; the step is lr * (task buffer + distillation buffer). As the
  reference, weight decay is added to the task gradient only.

  `update` takes the pair (task gradient, distillation gradient) as its updates. Built from optax pieces: two
  `optax.trace` buffers (torch's first step, buf = g, is trace's m * 0 + g) and the learning-rate schedule."""
  o = cfg.optimizer
  delta = o.dot_delta
  task = optax.chain(optax.add_decayed_weights(o.weight_decay), optax.trace(decay=o.momentum - delta))
  distill = optax.trace(decay=o.momentum + delta)
  lr = optax.scale_by_learning_rate(schedule(cfg, steps_per_epoch))

  def init(params):
    return task.init(params), distill.init(params), lr.init(params)

  def update(updates, state, params=None):
    g_task, g_distill = updates
    u_task, s_task = task.update(g_task, state[0], params)
    u_distill, s_distill = distill.update(g_distill, state[1], params)
    u, s_lr = lr.update(jax.tree.map(lambda a, b: a + b, u_task, u_distill), state[2], params)
    return u, (s_task, s_distill, s_lr)

  return optax.GradientTransformation(init, update)
