"""`config.distill.extras_checkpoint`: a fresh run's extra modules (FitNet's regressor, CRD's embedding heads, AB's
connectors, SimKD's projector, ...: `params['extras'][method]`, and their non-trained collections
`state['extras'][collection][method]`) start from a checkpoint instead of their initialisation.

The checkpoint is a run's workdir (its latest step, student 0 of a sweep), an `api.save` output, or what
`python -m kdjax.tools.import_torch --extras METHOD` writes. The methods present both there and in the run are
taken: each one's parameters whole, and each non-trained collection the checkpoint holds for it (a collection it
lacks, e.g. CRD's memory banks of an imported file, keeps its initialisation). A parameter of another shape, or a
checkpoint with none of the run's methods, is refused in one line before anything is compiled (`check`).
"""

from __future__ import annotations

from absl import logging
import jax
import jax.numpy as jnp

from kdjax import checkpoint as ckpt_lib
from kdjax.errors import CheckpointMismatchError


def _method(p: tuple) -> str:
  """The method of a checkpoint path: ('params', 'extras', method, ...) or ('state', 'extras', collection, method,
  ...) (the non-trained collections are keyed by collection first, as the extras module's variables are)."""
  return p[2] if p[0] == 'params' else p[3]


def _targets(path: str, params: dict, state: dict, saved: dict) -> dict:
  """{checkpoint path (tuple): the run's leaf (one student, no students axis)} of what is taken from `saved`."""
  run = {('params', 'extras', m) + p: leaf for m, tree in params.items()
         for p, leaf in ckpt_lib.leaf_paths(tree).items()}
  held = {p for p in saved if (p[:2] == ('params', 'extras') and len(p) > 3)
          or (p[:2] == ('state', 'extras') and len(p) > 4)}
  for c, methods in state.items():
    for m, tree in methods.items():
      if any(p[:4] == ('state', 'extras', c, m) for p in held):  # a collection the checkpoint lacks stays as it is
        run.update({('state', 'extras', c, m) + p: leaf for p, leaf in ckpt_lib.leaf_paths(tree).items()})
  ours = set(params) | {m for methods in state.values() for m in methods}
  theirs = {_method(p) for p in held}
  if not ours & theirs:
    raise CheckpointMismatchError(
        f'distill.extras_checkpoint {path} holds no extra module of this run\'s methods '
        f'({", ".join(sorted(ours)) or "none has one"}); it holds {", ".join(sorted(theirs)) or "none"}')
  return {p: leaf for p, leaf in run.items() if _method(p) in theirs}


def check(path: str, params: dict, state: dict) -> tuple[int, dict]:
  """(the checkpoint's step, {path: the run's leaf} to restore) for one student's extras `params`
  ({method: ...}) and `state` ({collection: {method: ...}}), arrays or ShapeDtypeStructs; refused in one line when
  the checkpoint holds none of the run's methods or a taken leaf is missing or of another shape. No array read."""
  ckpt = ckpt_lib.open_for_reading(path)
  try:
    step = ckpt.latest_step()
    saved = ckpt.saved_leaves(step)
  finally:
    ckpt.close()
  targets = _targets(path, params, state, saved)
  for p, leaf in targets.items():
    if p not in saved:
      raise CheckpointMismatchError(f'distill.extras_checkpoint {path} holds no {"/".join(p)}, which this run '
                                    f'builds with shape {tuple(leaf.shape)}')
    have = ckpt_lib.shape_of(saved[p])[1:]  # without the students axis
    if have != tuple(leaf.shape):
      raise CheckpointMismatchError(f'distill.extras_checkpoint {path}: {"/".join(p)} has shape {have} there, '
                                    f'this run builds {tuple(leaf.shape)}')
  return step, targets


def restore(path: str, params: dict, state: dict, index: int = 0) -> tuple[dict, dict]:
  """(params, state) of the methods taken from the checkpoint at `path` (student `index` of its sweep), in the
  layout of one student's `params['extras']` / `state['extras']`."""
  step, targets = check(path, params, state)
  ckpt = ckpt_lib.open_for_reading(path)
  try:
    students = ckpt.read_meta(step).get('students', 1)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    nested = {}
    for p, leaf in targets.items():
      node = nested
      for k in p[:-1]:
        node = node.setdefault(k, {})
      node[p[-1]] = jax.ShapeDtypeStruct((students,) + tuple(leaf.shape), leaf.dtype, sharding=device)
    restored = ckpt.restore(step, nested, partial=True)
  finally:
    ckpt.close()
  one = jax.tree.map(lambda a: a[index], restored)
  logging.info('extras %s initialised from %s (step %d%s)', ', '.join(sorted({_method(p) for p in targets})),
               path, step, f', student {index} of its sweep of {students}' if students > 1 else '')
  return one['params'].get('extras', {}), one.get('state', {}).get('extras', {})


def _one(tree):
  """One student's shapes of a stacked tree (arrays or ShapeDtypeStructs)."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(tuple(a.shape[1:]), a.dtype), tree)


def check_run(cfg, ts):
  """`check` for a run's stacked train state `ts` (arrays or ShapeDtypeStructs): before anything is compiled."""
  check(cfg.distill.extras_checkpoint, _one(ts.params['extras']), _one(ts.state['extras']))


def init_from_checkpoint(cfg, trainer, ts):
  """The train state `ts` (students stacked) with the extras of `cfg.distill.extras_checkpoint`, the same for every
  student, and a fresh optimizer state (as `teacher.init_from_checkpoint`)."""
  params, state = restore(cfg.distill.extras_checkpoint, _one(ts.params['extras']), _one(ts.state['extras']))
  stack = lambda tree: jax.tree.map(lambda a: jnp.broadcast_to(a, (trainer.num_students,) + a.shape), tree)
  extras_params = dict(ts.params['extras'], **stack(params))
  extras_state = {c: dict(ms, **stack(state.get(c, {}))) for c, ms in ts.state['extras'].items()}
  new_params = dict(ts.params, extras=extras_params)
  opt_state = jax.vmap(lambda p, hp: trainer.parts.optimizer(hp).init(p))(new_params, trainer.hparams)
  ts = ts.replace(params=new_params, state=dict(ts.state, extras=extras_state), opt_state=opt_state)
  return jax.device_put(ts, trainer.state_shardings(ts))
