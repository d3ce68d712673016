"""The teacher replay store (`distill.teacher_store`): the teacher's logits on every augmented batch of a run, made
once and replayed, so that students and sweeps trained on the same views never run the teacher.

With `data.pipeline='device'` the batch of global step t is fixed by the data seed: the epoch's permutation (seed
stream 0) and the augmentation key `fold_in(stream 1, t)` (kdjax/data/source.py). `make` runs exactly that batch
path and the teacher once per step (`python -m kdjax.tools.teacher_logits`), keeping per example the top k logits
(`distill.store_topk`; 0 = every class) and one value for the other C - k classes: the log of the mean of their
exp, so the reconstructed logits hold the top k exactly and give the rest their exact total softmax mass, shared
equally (k = C: the exact logits). Files in the store's folder: values.npy [steps, B, k] float32, indices.npy
[steps, B, k] int16 (int32 past 32767 classes), rest.npy [steps, B] float32 and meta.json (the key the views and
the teacher depend on, the epochs covered, each array's sha256), written last. A run checks the key, the epochs
and the checksums before its step compiles (a missing store it makes first: `make`); the step reads row t in place
of the teacher's forward pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from kdjax import atomic
from kdjax import config_lib
from kdjax import data as data_lib
from kdjax import sharding
from kdjax import step as step_lib
from kdjax import teacher as teacher_lib
from kdjax import teacher_table
from kdjax.data import source as source_lib
from kdjax.errors import ConfigError

FILES = ('values', 'indices', 'rest')
FORMAT = 1
TOOL = 'python -m kdjax.tools.teacher_logits --config=... --workdir=...'


# ------------------------------------------------------------------------------------------------- compression
def compress(logits, k: int):
  """(the top `k` logits [B, k] float32, their classes [B, k] int32, the log mean exp of the other classes' logits
  [B] float32; 0 when k is the class count)."""
  logits = logits.astype(jnp.float32)
  c = logits.shape[-1]
  values, indices = jax.lax.top_k(logits, k)
  if k == c:
    return values, indices, jnp.zeros(logits.shape[:-1], jnp.float32)
  kept = jnp.any(jax.nn.one_hot(indices, c, dtype=jnp.bool_), axis=-2)
  rest = jax.nn.logsumexp(jnp.where(kept, -jnp.inf, logits), axis=-1) - jnp.log(jnp.float32(c - k))
  return values, indices, rest


def expand(values, indices, rest, num_classes: int):
  """Dense logits [B, num_classes]: `values` at `indices`, `rest` everywhere else."""
  b = values.shape[0]
  dense = jnp.broadcast_to(rest[:, None].astype(jnp.float32), (b, num_classes))
  return dense.at[jnp.arange(b)[:, None], indices.astype(jnp.int32)].set(values)


@dataclasses.dataclass(frozen=True, eq=False)
class StoreLayout:
  """The teacher's output tree as the step reads it from a store: its logits leaf rebuilt from row `step`, every
  other leaf zeros of its shape (read by no loss: `check_methods`; dropped by XLA). Streamed (`rows`), the step
  reads a dispatch's rows, `store['first']` the global step of the first (`dispatch_rows`)."""
  treedef: object
  shapes: tuple   # jax.ShapeDtypeStruct per leaf, with the batch axis
  logits: int     # the logits leaf's index
  rows: int = 0   # streamed: the rows sent per dispatch (the dispatch's steps); 0: the whole store on the device

  def gather(self, store, idx, step=None):
    del idx
    leaves = [jnp.zeros(s.shape, s.dtype) for s in self.shapes]
    shape = self.shapes[self.logits]
    row = jnp.clip(step - store['first'], 0, self.rows - 1) if self.rows else step
    leaves[self.logits] = expand(store['values'][row], store['indices'][row], store['rest'][row],
                                 shape.shape[-1]).astype(shape.dtype)
    return jax.tree.unflatten(self.treedef, leaves)


def dispatch_rows(arrays: dict, first: int, rows: int) -> dict:
  """Rows `first`..`first + rows - 1` of the store's (memory-mapped) arrays, zeros past its end (steps a dispatch
  skips), with `first`: what a streamed `StoreLayout` reads for one dispatch."""
  out = {}
  for name, a in arrays.items():
    part = np.asarray(a[first:first + rows])
    if len(part) < rows:
      part = np.concatenate([part, np.zeros((rows - len(part),) + a.shape[1:], a.dtype)])
    out[name] = part
  out['first'] = np.int32(first)
  return out


def streams(cfg, arrays: dict) -> bool:
  """Whether the run streams its store's rows (`distill.store_stream`; auto: larger than the data's device
  budget)."""
  mode = cfg.distill.store_stream
  if mode != 'auto':
    return mode == 'on'
  from kdjax.data import stream
  return sum(a.nbytes for a in arrays.values()) > stream.device_budget(cfg.data)


def logits_leaf(t_shapes) -> int:
  """The index of the `logits` leaf among a teacher output's leaves."""
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(t_shapes)[0]]
  return paths.index('.logits')


# ---------------------------------------------------------------------------------------------------------- key
def topk(cfg, num_classes: int) -> int:
  k = cfg.distill.store_topk
  return num_classes if k == 0 or k > num_classes else int(k)


def _digest(tree) -> str:
  """A tree's arrays and their paths (the paths as one byte array first), by the data cache's digest."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  paths = np.frombuffer(';'.join(jax.tree_util.keystr(p) for p, _ in leaves).encode(), np.uint8)
  return data_lib.digest(paths, *(np.asarray(jax.device_get(a)) for _, a in leaves))[:16]


def data_seed(cfg) -> int:
  return cfg.seed if cfg.data.seed < 0 else cfg.data.seed


def key(cfg, ds, teacher_vars) -> dict:
  """What the stored logits depend on, by the config field (or the thing) that sets it."""
  return json.loads(json.dumps({
      'teacher.model': cfg.teacher.model, 'teacher.kwargs': config_lib.as_dict(cfg.teacher.kwargs),
      'teacher.image_size': cfg.teacher.image_size, 'teacher variables (sha256)': _digest(teacher_vars),
      'dataset': ds.name, 'training set (sha256)': data_lib.digest(ds.train.images, ds.train.labels)[:16],
      'data.augment': ds.augment,
      **{f'data.{f}': config_lib.as_dict(cfg.data[f]) for f in teacher_lib.VIEW_FIELDS},
      'data seed': data_seed(cfg), 'batch_size': cfg.batch_size, 'dtype': cfg.dtype,
      'distill.store_topk': topk(cfg, ds.num_classes)}, sort_keys=True, default=str))


def check_config(cfg, streaming: bool):
  """The refusals that read the config alone."""
  if cfg.teachers:
    raise ConfigError('config.distill.teacher_store holds the logits of config.teacher alone; config.teachers '
                      f'adds {len(cfg.teachers)} more: leave distill.teacher_store empty')
  if streaming:
    raise ConfigError("config.distill.teacher_store replays the on-device batches; data.pipeline='stream' augments "
                      "on the host, in no fixed order: use data.pipeline='device'")


def check_methods(programs, teacher_vars, t_shapes):
  """Refuses, naming the term, a method that reads more of the teacher than its logits on the batch (feature maps,
  embeddings: a store holds none) or reads the teacher on an extra view. `programs`: (Parts, swept numbers) per
  group."""
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(t_shapes)[0]]
  for parts, hparams in programs:
    if parts.distiller.views:
      term = next(n for n, (_, m) in parts.distiller.terms.items() if m.views)
      raise ConfigError(f'config.distill.teacher_store: {term} reads the teacher on the extra view(s) '
                        f'{", ".join(parts.distiller.views)}, which a store does not hold; leave it empty')
    for term, read in teacher_table.leaves_read_by_term(parts, teacher_vars, hparams).items():
      other = [n.lstrip('.') for n, r in zip(names, read) if r and n != '.logits']
      if other:
        raise ConfigError(f"config.distill.teacher_store: {term} reads the teacher's {', '.join(other)}, but a "
                          "store holds the teacher's logits only; leave distill.teacher_store empty for it")


# ------------------------------------------------------------------------------------------------------ files
def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def write(path: str, store_key: dict, arrays: dict, steps_per_epoch: int):
  """The store's files, meta.json last (a store without it is incomplete): any earlier meta.json is removed
  first."""
  os.makedirs(path, exist_ok=True)
  meta_path = os.path.join(path, 'meta.json')
  if os.path.exists(meta_path):
    os.remove(meta_path)
  sums = {}
  for name in FILES:
    file = os.path.join(path, f'{name}.npy')
    with atomic.writing(file, 'wb') as f:
      np.save(f, arrays[name], allow_pickle=False)
    sums[name] = _sha256(file)
  steps = arrays['values'].shape[0]
  meta = {'format': FORMAT, 'key': store_key, 'epochs': steps // steps_per_epoch, 'steps_per_epoch': steps_per_epoch,
          'shape': list(arrays['values'].shape), 'sha256': sums,
          'bytes_per_example': int(sum(arrays[n].nbytes for n in FILES) // arrays['rest'].size)}
  with atomic.writing(meta_path) as f:
    json.dump(meta, f, indent=1, sort_keys=True)
  return meta


def read_meta(path: str) -> dict:
  meta_path = os.path.join(path, 'meta.json')
  if not os.path.isfile(meta_path):
    raise ConfigError(f'config.distill.teacher_store {path} holds no store (no meta.json); make it first: {TOOL}')
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    if meta.get('format') != FORMAT or not isinstance(meta.get('key'), dict):
      raise ValueError(f"format {meta.get('format')!r}, not {FORMAT}")
  except (OSError, ValueError, AttributeError) as e:
    raise ConfigError(f'config.distill.teacher_store {path}: meta.json is damaged ({str(e).splitlines()[0]}); make '
                      f'the store again: {TOOL}') from None
  return meta


def load(path: str, store_key: dict, steps: int, steps_per_epoch: int) -> dict:
  """The store's arrays for the run's first `steps` steps (host NumPy), after checking that it was made for this
  run's views and teacher (`key`), that it covers the run and that every file matches its checksum."""
  meta = read_meta(path)
  for field, value in store_key.items():
    if meta['key'].get(field) != value:
      raise ConfigError(f'config.distill.teacher_store {path} was made with {field} = {meta["key"].get(field)!r}, '
                        f'but this run has {value!r}; make it again for this run: {TOOL}')
  covered = meta['shape'][0]
  if meta['steps_per_epoch'] != steps_per_epoch or covered < steps:
    raise ConfigError(f'config.distill.teacher_store {path} covers {meta["epochs"]} epoch(s) of '
                      f'{meta["steps_per_epoch"]} steps, but the run trains {steps // steps_per_epoch} epoch(s) of '
                      f'{steps_per_epoch} (config.epochs); make it for config.epochs >= the run\'s: {TOOL}')
  arrays = {}
  for name in FILES:
    file = os.path.join(path, f'{name}.npy')
    if not os.path.isfile(file) or _sha256(file) != meta['sha256'][name]:
      raise ConfigError(f'config.distill.teacher_store {path}: {name}.npy is missing or does not match its sha256 '
                        f'in meta.json (truncated or damaged); make the store again: {TOOL}')
    arrays[name] = np.load(file, allow_pickle=False, mmap_mode='r')[:steps]
  logging.info('teacher replay store %s: %d of its %d steps, the top %d logits, %d bytes per example', path,
               steps, covered, meta['shape'][2], meta['bytes_per_example'])
  return arrays


# ------------------------------------------------------------------------------------------------------- making
def make(cfg, ds, mesh, teacher, teacher_vars, path: str, log=logging.info) -> dict:
  """Runs the teacher once on every batch of `cfg.epochs` epochs, gathered and augmented exactly as a run of `cfg`
  gathers them (kdjax/data/source.py `DeviceSource`), and writes the store at `path`; returns its meta. A store
  already there with this key, covering as many epochs and intact, is kept."""
  check_config(cfg, streaming=False)
  if teacher is None:
    raise ConfigError('config.distill.teacher_store: config.teacher.model is empty, there is no teacher to store')
  spe = len(ds.train) // cfg.batch_size
  if spe == 0:
    raise ConfigError(f'batch_size {cfg.batch_size} exceeds the {len(ds.train)} training examples')
  steps, k, store_key = cfg.epochs * spe, topk(cfg, ds.num_classes), key(cfg, ds, teacher_vars)
  try:
    load(path, store_key, steps, spe)
    log(f'teacher_logits: {path} already holds this store ({cfg.epochs} epochs): kept')
    return read_meta(path)
  except ConfigError:
    pass
  source = source_lib.DeviceSource(ds, mesh, cfg.batch_size, data_seed(cfg), cfg.eval_batch_size)
  parts = step_lib.Parts(cfg=cfg, student=None, teacher=teacher, distiller=None, data=step_lib.DataSpec.of(ds),
                         batch_size=cfg.batch_size, steps_per_epoch=spe,
                         batch_sharding=sharding.batch_sharded(mesh))

  @jax.jit
  def one(teacher_vars, arrays, perm, s, step):
    batch = source.batch(arrays, perm, s, s, step)
    t_out = step_lib.batch_teacher_outputs(parts, teacher_vars, batch, step)[2]
    return compress(t_out.logits, k)

  index_dtype = np.int16 if ds.num_classes <= np.iinfo(np.int16).max else np.int32
  rows = {n: [] for n in FILES}
  for epoch in range(cfg.epochs):
    t0 = time.time()
    perm = source.dispatch_input(None, epoch)
    out = [one(teacher_vars, source.arrays(), perm, jnp.int32(s), jnp.int32(epoch * spe + s)) for s in range(spe)]
    for name, parts_ in zip(FILES, zip(*jax.device_get(out))):
      rows[name].append(np.stack(parts_))
    log(f'teacher_logits: epoch {epoch + 1}/{cfg.epochs}: {spe} batches of {cfg.batch_size} ({time.time() - t0:.1f} s)')
  arrays = {n: np.concatenate(rows[n]) for n in FILES}
  arrays['values'] = arrays['values'].astype(np.float32)
  arrays['indices'] = arrays['indices'].astype(index_dtype)
  arrays['rest'] = arrays['rest'].astype(np.float32)
  meta = write(path, store_key, arrays, spe)
  log(f'teacher_logits: {path}: {steps} steps x {cfg.batch_size} examples, top {k} of {ds.num_classes} logits, '
      f'{meta["bytes_per_example"]} bytes per example')
  return meta
