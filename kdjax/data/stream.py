"""The streaming half of the data path, for training sets that do not fit on the devices (ImageNet: 1.28 M JPEGs).

Records are read, decoded and augmented on the host by Grain (`data.workers` worker processes) and each step's
uint8 batch is handed to the jitted step as an argument (normalised there, `kdjax.data.device.normalize`); the
device-resident path (`kdjax.data.device`) stays the one for the small datasets (`data.pipeline`, `choose`).

Determinism (README "Architecture": a batch is a pure function of (seed, epoch, step)). The training stream is
Grain's index-based `MapDataset`: record indices shuffled by the data seed, reshuffled every epoch (Grain reseeds
its index shuffle per repetition), repeated without end; element g of that stream is (epoch g // N, record). Each
process reads the elements g = process_index, process_index + process_count, ... (disjoint shards covering every
element), so a global batch is the same whatever the number of worker processes. A record's augmentation draws from
`np.random.default_rng([seed, 1, epoch, record])`, independent of the worker, thread or host that decodes it. A
process's position in its shard (elements consumed) is the loader's whole state: it is saved in the checkpoint
(item 'data') and a resumed run restarts the stream at that position, so it sees the same batches.

Corrupt images (`data.on_corrupt`): 'stop' ends the run with one line naming the file, when the batch that holds it
is taken; 'skip' leaves the example out: the batch is filled with the next elements of the stream, so batches stay
full and stay a function of the position (the stream runs on into the next epoch's order by as many elements as
were skipped); the skipped files are counted per epoch in the log. A stream that yields no readable image (every
image corrupt) stops with one line after MAX_CONSECUTIVE_SKIPS corrupt elements in a row (or two epochs' worth of
the training set, if fewer), instead of looking for ever. Evaluation streams the eval split in order, each
process its strided shard, padded to whole batches with a mask (a skipped eval image is masked out and counted in
the log).
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time

from absl import logging
import jax
import numpy as np

from kdjax.data import IMAGENET_MEAN, IMAGENET_STD, Dataset  # noqa: F401  (the statistics: re-exported)
from kdjax.data import registry
from kdjax.errors import ConfigError

PIPELINES = ('auto', 'device', 'stream')
ON_CORRUPT = ('stop', 'skip')
# data.on_corrupt='skip' stops after this many corrupt images in a row (or two epochs' worth of the training set, if
# fewer): a stream with no readable image would otherwise never fill a batch, and say nothing.
MAX_CONSECUTIVE_SKIPS = 1000
# Evaluation splits smaller than this are read in this process: starting worker processes costs more than they save.
EVAL_WORKERS_MIN_RECORDS = 1024
# data.pipeline = 'auto' keeps a training set on the devices when its decoded uint8 arrays take at most this fraction
# of one device's memory (data.device_budget_gb = 0), the rest is the model's.
DEVICE_BUDGET_FRACTION = 0.25


class Records:
  """A split that is read as it streams: its length and image shape, no pixels. `images` is a ShapeDtypeStruct so
  that `Dataset.image_shape` works and anything that would put the split on a device fails loudly."""

  def __init__(self, source, image_size: int, what: str):
    self.source, self.what = source, what
    self.images = jax.ShapeDtypeStruct((len(source), image_size, image_size, 3), np.uint8)

  def __len__(self):
    return len(self.source)


@dataclasses.dataclass
class StreamDataset(Dataset):
  """A `Dataset` whose splits are `Records`; `augment` is 'random_resized_crop' (ImageNet's training transform) or
  'none' (the evaluation transform also for training)."""
  image_size: int = 224
  resize: int = 256
  workers: int = 0
  prefetch: int = 2
  on_corrupt: str = 'stop'


# ----------------------------------------------------------------------------------------------------- sources
class FolderSource:
  """The images of an ImageFolder listing (`kdjax.data.folder`), one split: record i -> its file's bytes. The paths
  are kept as one byte string and offsets: ImageNet's 1.28 M paths reach each Grain worker as ~80 MB that unpickle
  in 0.1 s, not as a million Python strings (~150 MB, 0.4 s)."""

  def __init__(self, paths, labels):
    encoded = [os.fsencode(p) for p in paths]
    self._blob = b''.join(encoded)
    self._offsets = np.concatenate([[0], np.cumsum([len(p) for p in encoded], dtype=np.int64)])
    self.labels = np.asarray(labels, np.int32)

  def __len__(self):
    return len(self.labels)

  def path(self, i: int) -> str:
    return os.fsdecode(self._blob[self._offsets[i]:self._offsets[i + 1]])

  def __getitem__(self, i):
    path = self.path(int(i))
    try:
      with open(path, 'rb') as f:
        data = f.read()
    except OSError as e:
      data = e  # reported as a corrupt record, by the same switch
    return {'data': data, 'label': int(self.labels[int(i)]), 'where': path}


class TfdsSource:
  """A TFDS array_record split through `tfds.data_source`, read in the Grain workers: TFDS decodes the image there
  (its NumPy path, no TensorFlow; its SkipDecoding needs TensorFlow), kdjax's transforms crop and resize the array.
  Opened lazily, so that the source pickles into Grain's worker processes."""

  def __init__(self, name: str, split: str, data_dir: str | None, label_key: str = 'label'):
    self.name, self.split, self.data_dir, self.label_key = name, split, data_dir, label_key
    self._source = None
    self._len = len(self._open())

  def _open(self):
    if self._source is None:
      import tensorflow_datasets as tfds
      self._source = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir, download=False)
    return self._source

  def __getstate__(self):
    return dict(self.__dict__, _source=None)

  def __len__(self):
    return self._len

  def __getitem__(self, i):
    ex = self._open()[int(i)]
    return {'data': ex['image'], 'label': int(ex[self.label_key]), 'where': f'{self.name}/{self.split}[{int(i)}]'}


# ------------------------------------------------------------------------------------------------ the choice
def choose(cfg) -> str:
  """'device' or 'stream' for the `config.data` section `cfg`: data.pipeline, or for 'auto' the dataset entry's
  pipeline ('auto' there: stream when the decoded training images exceed the device budget)."""
  if cfg.pipeline != 'auto':  # the combinations are checked in `check_config`
    return cfg.pipeline
  entry = registry.entry(cfg.name)
  if entry.pipeline != 'auto':
    return entry.pipeline
  reader, root = _stream_reader(cfg, entry)
  need = reader.stream_bytes(cfg, root)
  if need is None:
    return 'device'
  budget = device_budget(cfg)
  logging.info("data.pipeline='auto': the decoded training images take %.2f GiB, the device budget is %.2f GiB: %s",
               need / 2**30, budget / 2**30, 'device' if need <= budget else 'stream')
  return 'device' if need <= budget else 'stream'


def check_config(cfg, pipeline: str | None = None):
  """The data fields of a run config that the config alone decides, one line each (kdjax/validate.py): the dataset
  registered, its label set, and the pipeline's fields; `pipeline`: the one `choose` picked, when 'auto' picked it
  from the data."""
  d, pipeline = cfg.data, pipeline or cfg.data.pipeline
  entry = registry.check(d)
  if pipeline == 'device' and entry.pipeline == 'stream':
    raise ConfigError(f"config.data.pipeline='device' cannot hold {d.name} on the devices; use 'stream' or 'auto'")
  if pipeline == 'stream' and entry.pipeline == 'device':
    raise ConfigError(f"config.data.pipeline='stream' reads {' or '.join(registry.stream_names())}, not {d.name}; "
                      "use 'device' or 'auto'")
  if d.resize < d.image_size:
    raise ConfigError(f'config.data.resize={d.resize} is smaller than config.data.image_size={d.image_size} (the '
                      'evaluation center crop)')
  if not (pipeline == 'stream' or entry.pipeline == 'stream'):
    return
  where = f"data.pipeline={pipeline!r} with data.name={d.name!r} streams the data"
  for field in ('val_fraction', 'train_examples', 'test_examples'):
    if d[field]:
      raise ConfigError(f'config.data.{field} is not supported: {where} (each split as it is)')
  if d.omit_class >= 0:
    raise ConfigError(f'config.data.omit_class is not supported: {where}')
  if d.augment == 'crop_flip':
    raise ConfigError(f"config.data.augment='crop_flip' is the CIFAR pad-4 crop; {where}: 'auto' (random-resized "
                      "crop + flip) or 'none' (resize + center crop)")
  if cfg.distill.cache_teacher == 'on':
    raise ConfigError(f"config.distill.cache_teacher='on' needs the device-resident training set; {where}: "
                      "'auto' or 'off'")
  if 'mlkd' in dict(cfg.distill.losses):
    raise ConfigError(f"config.distill.losses: mlkd's strong view is gathered from the device-resident training "
                      f"set; {where}: set data.pipeline='device'")


def device_budget(cfg) -> float:
  if cfg.device_budget_gb > 0:
    return cfg.device_budget_gb * 2**30
  from kdjax import memory
  available = memory.available(jax.local_device_count())
  return DEVICE_BUDGET_FRACTION * available if available else 4 * 2**30


def _stream_reader(cfg, entry):
  """(the entry's reader that streams it, data.dir made absolute or ''): with data.dir set, its first dir reader
  that streams; otherwise (or when none does: data.dir is not its source) its first no-dir reader that streams."""
  from kdjax.data import data_root
  root = data_root(cfg, entry)
  streaming = [r for r in entry.readers if r.streams]
  if root:
    for r in streaming:
      if r.takes_dir:
        return r, os.path.abspath(root)
  for r in streaming:
    if not r.takes_dir and r.available(cfg):
      return r, ''
  raise ConfigError(streaming[0].needs_dir(entry) if streaming else
                    f"config.data.pipeline='stream' reads {' or '.join(registry.stream_names())}, not {entry.name}")


def load(cfg) -> StreamDataset:
  """The streamed dataset of the `config.data` section `cfg`: the record listings only, nothing is decoded."""
  entry = registry.check(cfg)
  reader, root = _stream_reader(cfg, entry)
  train, test, num_classes = reader.open_stream(cfg, entry, root, cfg.image_size)
  mean, std = entry.stats or (IMAGENET_MEAN, IMAGENET_STD)
  return StreamDataset(cfg.name, num_classes, train, test, None, mean, std,
                       'random_resized_crop' if cfg.augment == 'auto' else 'none', -1, cfg.image_size, cfg.resize,
                       cfg.workers, cfg.prefetch, cfg.on_corrupt)


# ---------------------------------------------------------------------------------------------- the transforms
class _TrainElement:
  """Grain map: a stream element (epoch, record) -> {'image', 'label', 'index'} or {'corrupt': what, 'index'}."""

  def __init__(self, source, seed: int, size: int, resize: int, augment: bool):
    self.source, self.seed, self.size, self.resize, self.augment = source, seed, size, resize, augment

  def __call__(self, element):
    epoch, index = int(element[0]), int(element[1])
    rng = np.random.default_rng([self.seed, 1, epoch, index]) if self.augment else None
    return _transform(self.source, index, rng, self.size, self.resize)


class _EvalElement:
  """Grain map: an evaluation record index -> the resized, center-cropped image (or its corrupt marker)."""

  def __init__(self, source, size: int, resize: int):
    self.source, self.size, self.resize = source, size, resize

  def __call__(self, index):
    return _transform(self.source, int(index), None, self.size, self.resize)


class _WithEpoch:
  """Grain map_with_index over the repeated shuffle: element g -> (its epoch, the record index)."""

  def __init__(self, n: int):
    self.n = n

  def __call__(self, g, index):
    return np.int64(g // self.n), np.int64(index)


def _transform(source, index: int, rng, size: int, resize: int) -> dict:
  from kdjax.data import transforms
  rec = source[index]
  try:
    data = rec['data']
    if isinstance(data, Exception):
      raise transforms.CorruptImage(str(data))
    if isinstance(data, (bytes, np.bytes_)):  # decoded and transformed in PIL (kdjax/data/transforms.py)
      img = (transforms.train_transform(data, rng, size) if rng is not None else
             transforms.eval_transform(data, size, resize))
    else:  # a source that decodes (TFDS mock data): the same transforms on the array
      img = np.asarray(data, np.uint8)
      if img.ndim == 2 or img.shape[-1] == 1:
        img = np.ascontiguousarray(np.broadcast_to(img.reshape(img.shape[:2] + (1,)), img.shape[:2] + (3,)))
      img = (transforms.random_resized_crop_flip(img, rng, size=size) if rng is not None else
             transforms.resize_center_crop(img, size=size, resize=resize))
  except transforms.CorruptImage as e:  # what kdjax's decode raises for unreadable bytes (a bug still raises)
    return {'corrupt': f'{rec["where"]}: {" ".join(str(e).split())}', 'index': np.int64(index)}
  return {'image': np.ascontiguousarray(img, np.uint8), 'label': np.int32(rec['label']), 'index': np.int64(index)}


def _iterate(ds, workers: int):
  """An iterator over the map dataset `ds`, in order: in this process (2 reading threads: PIL releases the GIL
  while it decodes) or in `workers` Grain processes (each with its 2 threads), the elements interleaved back in
  order."""
  import grain
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=16))
  if workers:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # Grain's workers read its absl flags; a library caller (tests) has not parsed any
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=32),
                              worker_init_fn=_exit_with_parent)
  return iter(it_ds)


def _exit_with_parent(worker_index: int, worker_count: int):
  """In each Grain worker: exit once the process that started it is gone. A run killed by SIGKILL closes nothing,
  and its workers (and multiprocessing's resource tracker, which waits for them) would otherwise live on."""
  del worker_index, worker_count
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(0.5)
    os._exit(0)

  threading.Thread(target=watch, name='kdjax-exit-with-parent', daemon=True).start()


def _process(process_index, process_count):
  return (jax.process_index() if process_index is None else process_index,
          jax.process_count() if process_count is None else process_count)


# ------------------------------------------------------------------------------------------------ training stream
class TrainLoader:
  """This process's share of every global training batch, in stream order, prefetched by a thread (while the
  previous dispatch runs) and placed on the devices as global arrays [K, B, ...] of the step's batch sharding.

  `position`: elements of this process's shard consumed by the batches taken so far (the checkpointed state).
  `process_index` / `process_count` default to JAX's (tests pass others to check the shards)."""

  def __init__(self, ds: StreamDataset, batch_size: int, seed: int, position: int = 0, sharding=None,
               process_index=None, process_count=None):
    import grain
    self.ds, self.sharding = ds, sharding
    self.index, self.count = _process(process_index, process_count)
    if batch_size % self.count:
      raise ConfigError(f'batch_size {batch_size} does not divide over the {self.count} processes')
    self.local_batch = batch_size // self.count
    n = len(ds.train)
    stream = grain.MapDataset.range(n).shuffle(seed=seed).repeat().map_with_index(_WithEpoch(n))
    stream = stream[self.index::self.count][position:]
    self._elements = _iterate(stream.map(_TrainElement(ds.train.source, seed, ds.image_size, ds.resize,
                                                       ds.augment != 'none')), ds.workers)
    self.position = position
    # Two epochs' worth: with one readable record, the longest run of corrupt ones across an epoch boundary is
    # shorter than that (on one process).
    self.max_skips = min(MAX_CONSECUTIVE_SKIPS, 2 * n)
    self._in_a_row = 0
    self.skipped = []  # (path and reason) of the corrupt images skipped in the batches taken, since last read
    self._queue = queue.Queue(maxsize=max(1, ds.prefetch))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._fill, daemon=True, name='kdjax-stream')
    self._thread.start()

  def _fill(self):
    try:
      while not self._stop.is_set():
        batch = self._next_local()
        self._put(batch)
        if batch[0] != 'batch':
          return
    except BaseException as e:  # handed to the consumer, raised where the batch is taken
      self._put(('error', e))

  def _put(self, item):
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return
      except queue.Full:
        continue

  def _next_local(self):
    """('batch', arrays, elements consumed, corrupt ones skipped), ('corrupt', what) under on_corrupt='stop', or
    ('unreadable', count, the last) after `max_skips` corrupt elements in a row under 'skip'."""
    images, labels, indices, corrupt, consumed = [], [], [], [], 0
    while len(images) < self.local_batch:
      el = next(self._elements)
      consumed += 1
      if 'corrupt' in el:
        corrupt.append(el['corrupt'])
        if self.ds.on_corrupt == 'stop':
          return ('corrupt', el['corrupt'])
        self._in_a_row += 1
        if self._in_a_row >= self.max_skips:
          return ('unreadable', self._in_a_row, el['corrupt'])
        continue
      self._in_a_row = 0
      images.append(el['image'])
      labels.append(el['label'])
      indices.append(el['index'])
    return ('batch', {'images': np.stack(images), 'labels': np.asarray(labels, np.int32),
                      'indices': np.asarray(indices, np.int32)}, consumed, corrupt)

  def next_local(self) -> dict:
    """The next host batch of this process ({'images' [b, H, W, C] uint8, 'labels', 'indices'}), advancing
    `position`."""
    item = self._queue.get()
    if item[0] == 'error':
      raise item[1]
    if item[0] == 'corrupt':
      raise ConfigError(f'corrupt image {item[1]}; set --config.data.on_corrupt=skip to leave such files out')
    if item[0] == 'unreadable':
      raise ConfigError(f'{item[1]:,} corrupt training images in a row in {self.ds.train.what} (of '
                        f'{len(self.ds.train):,}), none readable: data.on_corrupt=skip stops here rather than look '
                        f'for ever; the last: {item[2]}')
    _, batch, consumed, corrupt = item
    self.position += consumed
    for what in corrupt:
      logging.warning('skipped a corrupt image (data.on_corrupt=skip): %s', what)
    self.skipped += corrupt
    return batch

  def take(self, steps: int, pad_to: int | None = None) -> dict:
    """The next `steps` global batches as device arrays [pad_to or steps, B, ...] (the steps past `steps` are zeros:
    a rolled scan masks them)."""
    local = [self.next_local() for _ in range(steps)]
    stacked = {k: local[0][k][None] if steps == 1 else np.stack([b[k] for b in local]) for k in local[0]}
    if pad_to and pad_to > steps:
      stacked = {k: np.concatenate([v, np.zeros((pad_to - steps,) + v.shape[1:], v.dtype)])
                 for k, v in stacked.items()}
    if self.sharding is None:
      return stacked
    return {k: jax.make_array_from_process_local_data(self.sharding, v) for k, v in stacked.items()}

  def close(self):
    self._stop.set()
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout=5)
    self._elements = None


def resume_position(data_state: dict | None, step: int, batch_size: int, process_index=None,
                    process_count=None) -> int:
  """This process's position in its stream at a checkpoint's `step`, from the checkpoint's 'data' item. Resumed
  on another number of processes, the positions carry over only while no image was skipped (every process then
  read step x its batch share); otherwise the run must resume on as many processes as wrote it."""
  index, count = _process(process_index, process_count)
  if not data_state:
    return 0
  positions = list(data_state['positions'])
  if len(positions) == count:
    return int(positions[index])
  if all(p == step * batch_size // len(positions) for p in positions):
    return step * batch_size // count
  raise ConfigError(f'the checkpoint at step {step} was streamed by {len(positions)} processes and skipped corrupt '
                    f'images; resume it on {len(positions)} processes, not {count}')


# ------------------------------------------------------------------------------------------------- evaluation
def eval_batches(ds: StreamDataset, split: str, batch_size: int, sharding=None, process_index=None,
                 process_count=None):
  """The eval split in order, this process's strided shard, as batches {'images', 'labels', 'mask'} of the global
  `batch_size` (padded and masked: every example counted once). Yields (batch, corrupt list)."""
  import grain
  index, count = _process(process_index, process_count)
  records = ds.test if split == 'test' else ds.val
  n, local = len(records), batch_size // count
  per_process = -(-n // count)
  num_batches = -(-per_process // local)
  mine = grain.MapDataset.range(n)[index::count]
  workers = ds.workers if n >= EVAL_WORKERS_MIN_RECORDS else 0
  elements = _iterate(mine.map(_EvalElement(records.source, ds.image_size, ds.resize)), workers)
  shape = (ds.image_size, ds.image_size, 3)
  for _ in range(num_batches):
    images = np.zeros((local,) + shape, np.uint8)
    labels, mask, corrupt = np.zeros((local,), np.int32), np.zeros((local,), bool), []
    for j in range(local):
      el = next(elements, None)
      if el is None:
        break
      if 'corrupt' in el:
        if ds.on_corrupt == 'stop':
          raise ConfigError(f'corrupt image {el["corrupt"]}; set --config.data.on_corrupt=skip to leave such files '
                            'out')
        corrupt.append(el['corrupt'])
        continue
      images[j], labels[j], mask[j] = el['image'], el['label'], True
    batch = {'images': images[None], 'labels': labels[None], 'mask': mask[None]}
    if sharding is not None:
      batch = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
    yield batch, corrupt
