"""Where a run's batches come from: one small interface, two sources.

`DeviceSource`: the uint8 training set lives on the devices; each step gathers its batch by the epoch's permutation
(drawn from `fold_in(rng, epoch)`) and augments it inside the jitted step, so the host never touches a batch.
`StreamSource`: the training set is streamed (kdjax/data/stream.py: Grain workers decode and augment on the host);
each dispatch's K uint8 batches [K, B, ...] are an argument of the step, placed on the devices while the previous
dispatch runs.

Both answer the same questions, so the trainer never branches on which it has:
  arrays()                the device-resident arrays the step reads (an argument of every dispatch), or None
  take(steps, pad_to)     host side: the next dispatch's batches (an argument of the dispatch), or None
  dispatch_spec(k)        the abstract shape of `take`'s result (None on the device path)
  dispatch_input(...)     inside jit, once per dispatch: the epoch's permutation, or the taken batches
  batch(...)              inside jit: step i's batch {'images' uint8, 'labels', 'indices', 'views'}
  eval_batches()          (split, its batches) for val (if any) and test, each {'images', 'labels', 'mask'}
  state() / close()       the checkpointed position in the stream; release the workers
`open_source(cfg, ds, ...)` builds the one the dataset needs.
"""

from __future__ import annotations

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.data import device as device_data
from kdjax.data import stream as stream_data
from kdjax.errors import ConfigError


def _seed_key(seed, stream: int):  # the streams of kdjax/step.py `seed_key`
  return jax.random.fold_in(jax.random.key(seed), stream)


class DeviceSource:
  """The training set on the devices (replicated, uint8); batches gathered and augmented in the step."""
  streaming = False

  def __init__(self, ds, mesh, batch_size: int, data_seed: int, eval_batch_size: int):
    from kdjax import sharding
    self.ds, self.batch_size, self.data_seed = ds, batch_size, data_seed
    self.replicated = sharding.replicated(mesh)
    self.data_rng, self.aug_rng = _seed_key(data_seed, 0), _seed_key(data_seed, 1)
    self._arrays = device_data.put_replicated(ds.train, self.replicated)
    self._eval = {name: jax.device_put(device_data.padded_eval_arrays(split, eval_batch_size), self.replicated)
                  for name, split in (('val', ds.val), ('test', ds.test)) if split is not None}

  def arrays(self):
    return self._arrays

  def dispatch_spec(self, k: int):
    return None

  def take(self, steps: int, pad_to: int | None = None):
    return None

  def dispatch_input(self, taken, epoch):
    return device_data.epoch_permutation(self.data_rng, epoch, len(self.ds.train))

  def batch(self, arrays, perm, i, step_in_epoch, step, views=()) -> dict:
    """Step `step_in_epoch` of the epoch whose permutation is `perm` (global step `step`): gathered and augmented;
    the `views` (names of distill.VIEWS) made from the same examples, un-augmented, each from its own rng stream."""
    from kdjax import distill
    images, labels, idx = device_data.gather(arrays, perm, step_in_epoch, self.batch_size,
                                             jax.random.fold_in(self.aug_rng, step), self.ds.augment)
    made = {}
    for name in views:
      view = distill.VIEWS[name]
      rng = jax.random.fold_in(_seed_key(self.data_seed, view.stream), step)
      made[name] = view.make(rng, arrays['images'][idx], self.ds.augment)
    return {'images': images, 'labels': labels, 'indices': idx, 'views': made}

  def eval_batches(self):
    return [(name, [arrays]) for name, arrays in self._eval.items()]

  def table_arrays(self, eval_batch_size: int):
    """The training set as padded batches [N, B, ...], for the teacher table (kdjax/teacher_table.py)."""
    return jax.device_put(device_data.padded_eval_arrays(self.ds.train, eval_batch_size), self.replicated)

  def key_ingredients(self) -> dict:
    return {'streaming': False}  # the training arrays are an argument of the step: their shapes are in the key

  def start(self, position: int = 0):
    pass

  def state(self):
    return None

  def end_epoch(self, epoch: int):
    pass

  def close(self):
    pass


class StreamSource:
  """The training set streamed from the host: a dispatch's K batches are its argument (kdjax/data/stream.py)."""
  streaming = True

  def __init__(self, ds, mesh, batch_size: int, data_seed: int, eval_batch_size: int):
    from kdjax import sharding
    n_data = sharding.data_size(mesh)
    if eval_batch_size % n_data:
      raise ConfigError(f'eval_batch_size {eval_batch_size} is not divisible by the {n_data} devices of the data '
                        "axis (data.pipeline='stream' splits every eval batch)")
    if jax.process_count() > 1 and mesh.shape['students'] > 1:
      raise ConfigError("data.pipeline='stream' on several processes needs mesh_students=1 (each process feeds "
                        'its own block of the data axis)')
    self.ds, self.batch_size, self.data_seed, self.eval_batch_size = ds, batch_size, data_seed, eval_batch_size
    self.sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, 'data'))
    self.loader = None

  def arrays(self):
    return None

  def dispatch_spec(self, k: int):
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=self.sharding)
    b = self.batch_size
    return {'images': spec((k, b) + tuple(self.ds.image_shape), jnp.uint8), 'labels': spec((k, b), jnp.int32),
            'indices': spec((k, b), jnp.int32)}

  def start(self, position: int = 0):
    """Opens the stream at this process's `position` (`stream.resume_position` of a checkpoint's data state)."""
    self.loader = stream_data.TrainLoader(self.ds, self.batch_size, self.data_seed, position, self.sharding)

  def take(self, steps: int, pad_to: int | None = None):
    return self.loader.take(steps, pad_to=pad_to)

  def dispatch_input(self, taken, epoch):
    return taken

  def batch(self, arrays, taken, i, step_in_epoch, step, views=()) -> dict:
    return {'images': taken['images'][i], 'labels': taken['labels'][i], 'indices': taken['indices'][i],
            'views': {}}

  def eval_batches(self):
    return [(name, self._streamed_eval(name)) for name in ('val', 'test') if getattr(self.ds, name) is not None]

  def _streamed_eval(self, name: str):
    skipped = []
    for batch, corrupt in stream_data.eval_batches(self.ds, name, self.eval_batch_size, self.sharding):
      skipped += corrupt
      yield batch
    if skipped:
      logging.warning('evaluation (%s): %d corrupt image(s) skipped (data.on_corrupt=skip), e.g. %s', name,
                      len(skipped), skipped[0])

  def table_arrays(self, eval_batch_size: int):
    raise ConfigError("the teacher table needs the device-resident training set; data.pipeline='stream' has none")

  def key_ingredients(self) -> dict:
    return {'streaming': True}

  def state(self):
    """Every process's position in its stream (the checkpoint's 'data' item)."""
    positions = [self.loader.position]
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      positions = np.asarray(multihost_utils.process_allgather(np.int64(self.loader.position))).reshape(-1).tolist()
    return {'positions': [int(p) for p in positions]}

  def end_epoch(self, epoch: int):
    if self.loader.skipped:
      logging.warning('epoch %d: %d corrupt image(s) skipped (data.on_corrupt=skip)', epoch + 1,
                      len(self.loader.skipped))
      self.loader.skipped = []

  def close(self):
    if self.loader is not None:
      self.loader.close()


def open_source(cfg, ds, mesh, data_seed: int):
  """The batch source of dataset `ds` (`data.load` or `stream.load` of `cfg.data`) for a run config `cfg`."""
  cls = StreamSource if isinstance(ds, stream_data.StreamDataset) else DeviceSource
  return cls(ds, mesh, cfg.batch_size, data_seed, cfg.eval_batch_size)
