"""Orbax checkpoints under `workdir/checkpoints`: the train state plus a JSON 'meta' item per step.

Checkpoints are numbered by global train step. The state holds every student of a sweep on a leading axis (one for
a single run; `meta['students']` says how many). Kept: the latest `keep` and the best one by `select_accuracy`
(validation accuracy, or test accuracy when there is no validation split; a sweep's mean over its students).
Saving is asynchronous. A streaming run (`data.pipeline = 'stream'`) adds the item 'data': its input stream's
positions (JSON, `kdjax.data.stream.TrainLoader`), so that a resumed run reads the same batches.
A checkpoint directory is also what `config.teacher.checkpoint` points at: `load_model` restores only the model
variables (parameters and BatchNorm statistics) of a run, whatever optimizer it used.
"""

from __future__ import annotations

import os

from etils import epath
import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from kdjax.errors import CheckpointMismatchError, CheckpointNotFoundError

SELECT_METRIC = 'select_accuracy'


def directory(workdir: str) -> str:
  return os.path.join(os.path.abspath(os.path.expanduser(workdir)), 'checkpoints')


class Checkpointer:

  def __init__(self, workdir: str, keep: int = 2, read_only: bool = False, async_save: bool = True):
    self.workdir = workdir
    policy = cm.AnyPreservationPolicy([
        cm.LatestN(n=keep),
        cm.BestN(get_metric_fn=lambda m: m[SELECT_METRIC], reverse=False, n=1,
                 keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        # best_fn only makes Orbax write the metrics; which steps are kept is the policy's decision.
        best_fn=lambda m: m[SELECT_METRIC], best_mode='max', preservation_policy=policy, read_only=read_only,
        create=not read_only, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(directory(workdir), options=options,
                                         item_names=('state', 'meta', 'data'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    scored = [(m[SELECT_METRIC], s) for s in self.manager.all_steps()
              if (m := self.manager.metrics(s)) and SELECT_METRIC in m]
    return max(scored)[1] if scored else None

  def save(self, step: int, state, meta: dict, metrics: dict | None = None, data: dict | None = None):
    items = dict(state=ocp.args.PyTreeSave(flax.serialization.to_state_dict(state)), meta=ocp.args.JsonSave(meta))
    if data is not None:
      items['data'] = ocp.args.JsonSave(data)
    self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

  def read_data(self, step: int) -> dict | None:
    """The input stream's state saved at `step` (None when the step has none: the device-resident data path)."""
    if not os.path.isdir(os.path.join(directory(self.workdir), str(step), 'data')):
      return None
    return self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))['data']

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def restore(self, step: int, target, partial: bool = False):
    """Restores `step` into the structure (and shardings) of `target`, a pytree of arrays or ShapeDtypeStructs.

    A step that does not fit `target` raises `CheckpointMismatchError` before anything is read (`check_fits`);
    any other exception means the step could not be read: it is damaged."""
    self.check_fits(step, target, partial)
    target_dict = flax.serialization.to_state_dict(target)
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target_dict, restore_args=ocp.checkpoint_utils.construct_restore_args(target_dict),
        partial_restore=partial)))['state']
    return flax.serialization.from_state_dict(target, restored)

  def check_fits(self, step: int, target, partial: bool = False):
    """Compares the tree and the array shapes saved at `step` (Orbax's metadata, no array read) with `target`'s,
    and raises `CheckpointMismatchError` naming the first difference: a step that does not fit the config is not a
    damaged one. With `partial`, the step may hold more than `target`. Unreadable metadata raises what Orbax
    raises (damage). Dtypes may differ: the restore casts them, as it always has."""
    saved = self.saved_leaves(step)
    wanted = leaf_paths(flax.serialization.to_state_dict(target))
    where = f'checkpoint step {step} in {directory(self.workdir)}'

    def first(paths, what):  # the parameters first: they name the layer (its optimizer state differs with it)
      path = min(paths, key=lambda p: p[0] != 'params')
      more = f' (and {len(paths) - 1} more)' if len(paths) > 1 else ''
      raise CheckpointMismatchError(f'{where} does not fit this config: {what(path)}{more}')

    if missing := [p for p in wanted if p not in saved]:
      first(missing, lambda p: f'it holds no {"/".join(p)}, which this config builds')
    if extra := [] if partial else [p for p in saved if p not in wanted]:
      first(extra, lambda p: f'it holds {"/".join(p)}, which this config does not build')
    if reshaped := [p for p in wanted if shape_of(saved[p]) != shape_of(wanted[p])]:
      first(reshaped, lambda p: f'{"/".join(p)} is saved with shape {shape_of(saved[p])}, this config builds '
                                f'{shape_of(wanted[p])}')

  def saved_leaves(self, step: int) -> dict:
    """{path as a tuple of key names: leaf metadata (its `.shape`)} of the state saved at `step`, no array read."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
      return leaf_paths(handler.metadata(epath.Path(directory(self.workdir)) / str(step) / 'state').tree)
    finally:
      handler.close()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def leaf_paths(tree) -> dict:
  """{path as a tuple of key names: leaf} of a nested state dict (its empty containers hold nothing to restore)."""
  name = lambda k: str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k))))
  return {tuple(name(k) for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def shape_of(leaf) -> tuple | None:
  shape = getattr(leaf, 'shape', None)
  return None if shape is None else tuple(int(n) for n in shape)


def load_model(workdir: str, target_variables, which: str = 'latest', index: int = 0):
  """Restores one trained network's variables from a run's workdir: student `index` of its sweep (0 for a single
  run).

  `target_variables` ({'params': ..., 'batch_stats': ...} of the expected architecture, arrays or
  ShapeDtypeStructs) fixes structure and sharding. Returns (variables, meta). The caller checks `meta` (model name,
  class count) before calling this, so a mismatch is reported by name rather than as a shape error.
  """
  ckpt = open_for_reading(workdir)
  try:
    step = _pick_step(ckpt, which)
    meta = ckpt.read_meta(step)
    stacked = jax.tree.map(lambda s: jax.ShapeDtypeStruct((meta.get('students', 1),) + tuple(s.shape), s.dtype,
                                                          sharding=getattr(s, 'sharding', None)),
                           target_variables)
    restored = ckpt.restore(step, _run_layout(stacked), partial=True)
    variables = {'params': restored['params']['student'], **restored['state']['student']}
    # Network `index` of the stack, in one program: leaf by leaf, eager indexing compiled one program per shape
    # (1.3 s of a resnet32x4 teacher's 3.3 s restore).
    leaves, treedef = jax.tree.flatten(target_variables)
    shardings = [getattr(s, 'sharding', None) for s in leaves]
    placed = {} if None in shardings else {'out_shardings': jax.tree.unflatten(treedef, shardings)}
    return jax.jit(lambda v: jax.tree.map(lambda a: a[index], v), **placed)(variables), meta
  finally:
    ckpt.close()


def _run_layout(variables: dict) -> dict:
  """A network's variables where a run's train state keeps them (the trained network is the 'student')."""
  return {'params': {'student': variables['params']},
          'state': {'student': {k: v for k, v in variables.items() if k != 'params'}}}


def _pick_step(ckpt: Checkpointer, which: str) -> int:
  step = ckpt.best_step() if which == 'best' else None
  return ckpt.latest_step() if step is None else step


def open_for_reading(workdir: str) -> Checkpointer:
  path = directory(workdir)
  if not os.path.isdir(path):
    raise CheckpointNotFoundError(f'no checkpoint found: {path} does not exist (expected the workdir of a '
                                  'finished kdjax run or an imported checkpoint)')
  ckpt = Checkpointer(workdir, read_only=True, async_save=False)
  if ckpt.latest_step() is None:
    raise CheckpointNotFoundError(f'no checkpoint found: {path} holds no saved step')
  return ckpt


def read_meta(workdir: str, which: str = 'latest') -> dict:
  ckpt = open_for_reading(workdir)
  try:
    return ckpt.read_meta(_pick_step(ckpt, which))
  finally:
    ckpt.close()


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)),
                      tree)


def save_model(workdir: str, variables: dict | None, meta: dict, step: int = 0, extras: dict | None = None):
  """Writes a model-only checkpoint (no optimizer state) that `config.teacher.checkpoint` and `load_model` accept.

  `variables` = {'params': ..., 'batch_stats': ..., ...} of a `kdjax.models.create(meta['model'],
  num_classes=meta['num_classes'])` network (None: none, an extras-only file). `extras` = {'params': {method: ...},
  'state': {collection: {method: ...}}}: the methods' extra modules, where a run keeps them (what
  `config.distill.extras_checkpoint` reads). Used by the PyTorch importer and the deployable-student export.
  """
  tree = _run_layout(variables) if variables is not None else {'params': {}, 'state': {}}
  for part, methods in (extras or {}).items():
    methods = {m: v for m, v in methods.items() if jax.tree.leaves(v)}  # an empty module holds nothing to save
    if methods:
      tree[part]['extras'] = methods
  ckpt = Checkpointer(workdir, async_save=False)
  try:
    one = jax.tree.map(lambda a: np.asarray(a)[None], tree)  # a run of one student
    ckpt.save(step, one, dict(meta, step=step, complete=True, students=1))
    ckpt.wait()
  finally:
    ckpt.close()
