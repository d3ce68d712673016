"""Datasets as uint8 arrays in host memory: read once, then put on the devices (see `kdjax.data.device`).

Every dataset is one `DatasetEntry` in `DATASETS` (kdjax/data/registry.py), the built-in ones below: its readers
(kdjax/data/readers.py: torchvision's files in `data.dir` (CIFAR pickles, MNIST-family IDX files, a folder of images;
`kdjax.data.files`), TFDS through `tfds.data_source` (array_record files, no TensorFlow needed to read), Debian's
Fashion-MNIST package, scikit-learn's shipped `digits`), its statistics, default augmentation, pipeline and splits.
`register(entry)` adds one (README "Adding a dataset").
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time

from absl import logging
import numpy as np

from kdjax import atomic
from kdjax.data import readers
from kdjax.data import registry
from kdjax.data.registry import DATASETS, DatasetEntry, entry, names, register  # noqa: F401  (the public registry)
from kdjax.errors import ConfigError

# Where Debian's dataset-fashion-mnist package puts the original gzipped IDX files.
DEBIAN_FASHION_MNIST = '/usr/share/datasets/fashion-mnist'
# torchvision's ImageNet statistics (the anchors' `transforms.Normalize`): ImageNet's, and the stream pipeline's for
# a dataset without its own (it never holds the training set to measure).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# The built-in datasets, one entry each. Statistics: per channel, of the training sets, as the reference codebases
# normalise (RepDistiller for CIFAR-100); None: the training images' own. The CIFAR references augment with a pad-4
# random crop + horizontal flip, the digit datasets not at all. Any dataset read from data.dir may also be a folder
# of images under its name (ImageFolder).
BUILT_IN = (
    DatasetEntry('digits', (readers.Arrays(readers.sklearn_digits, "scikit-learn's shipped dataset"),)),
    DatasetEntry('cifar10', (
        readers.CifarFiles('cifar-10-batches-py', tuple(f'data_batch_{i}' for i in range(1, 6)), ('test_batch',),
                           'batches.meta', {'fine': (b'labels', b'label_names')}),
        readers.ImageFolder(), readers.Tfds('cifar10')),
        stats=((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)), augment='crop_flip', title='CIFAR-10'),
    DatasetEntry('cifar100', (
        readers.CifarFiles('cifar-100-python', ('train',), ('test',), 'meta',
                           {'fine': (b'fine_labels', b'fine_label_names'),
                            'coarse': (b'coarse_labels', b'coarse_label_names')}, named=False),
        readers.ImageFolder(), readers.Tfds('cifar100', {'fine': 'label', 'coarse': 'coarse_label'})),
        stats=((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)), augment='crop_flip',
        label_sets={'fine': 'its 100 classes', 'coarse': 'its 20 superclasses'}, title='CIFAR-100'),
    DatasetEntry('mnist', (readers.IdxFiles('MNIST/raw'), readers.ImageFolder(), readers.Tfds('mnist')),
                 stats=((0.1307,), (0.3081,)), num_classes=10, title='MNIST'),
    DatasetEntry('fashion_mnist', (
        readers.IdxFiles('FashionMNIST/raw'), readers.ImageFolder(),
        readers.IdxAt(lambda: DEBIAN_FASHION_MNIST, "`apt-get install dataset-fashion-mnist` (Debian's package: the "
                      'original files in {path})'),
        readers.Tfds('fashion_mnist')),
        stats=((0.2860,), (0.3530,)), num_classes=10, title='Fashion-MNIST'),
    DatasetEntry('kmnist', (readers.IdxFiles('KMNIST/raw'), readers.ImageFolder()), num_classes=10, title='KMNIST'),
    DatasetEntry('imagenet2012', (readers.Tfds('imagenet2012'),), stats=(IMAGENET_MEAN, IMAGENET_STD),
                 pipeline='stream', splits=('train', 'validation')),
    DatasetEntry('folder', (readers.ImageFolder(),), pipeline='auto'),
)
for _entry in BUILT_IN:
  register(_entry)


@dataclasses.dataclass
class Split:
  images: np.ndarray  # uint8 [N, H, W, C]
  labels: np.ndarray  # int32 [N]

  def __len__(self):
    return len(self.labels)

  def take(self, idx) -> 'Split':
    return Split(self.images[idx], self.labels[idx])


@dataclasses.dataclass
class Dataset:
  name: str
  num_classes: int
  train: Split
  test: Split
  val: Split | None
  mean: tuple
  std: tuple
  augment: str  # 'crop_flip' | 'none'
  omitted: int = -1  # a class left out of the training (transfer) set, or -1

  @property
  def image_shape(self):
    return self.train.images.shape[1:]


def load(cfg) -> Dataset:
  """Loads `cfg.name` (a `config.data` section) by its entry's readers and carves the optional validation split
  from train."""
  from kdjax.data import files
  e = registry.check(cfg)
  if e.pipeline == 'stream':
    raise ConfigError(f"config.data.pipeline='device' cannot hold {e.name} on the devices; use 'stream' or 'auto'")
  root = data_root(cfg, e)
  if not root:
    train, test, num_classes = readers.without_dir(e, cfg).read(cfg, e)
  elif e.dir_readers():
    train, test, num_classes = files.load(cfg, root, e)
  else:
    raise ConfigError(f'data.dir={root} but {e.name} is {e.readers[0].what}; set data.name to one of '
                      f'{", ".join(registry.dir_names())} for the files there')

  # Seeded stratified subsets (quick experiments, CI-sized real data), before the validation split.
  train = _subset(train, cfg.train_examples, 'data.train_examples', cfg.val_seed)
  test = _subset(test, cfg.test_examples, 'data.test_examples', cfg.val_seed)

  val = None
  if cfg.val_fraction:
    train, val = _split(train, cfg.val_fraction, cfg.val_seed)

  omitted = cfg.omit_class
  if omitted >= 0:  # after the validation split, so validation keeps the class: only the transfer set lacks it
    if omitted >= num_classes:
      raise ConfigError(f'data.omit_class={omitted} but {e.name} has {num_classes} classes')
    train = train.take(train.labels != omitted)
  _check_classes(train, num_classes, f'{e.name} ({root})' if root else e.name)

  if e.stats is not None:
    mean, std = e.stats
  else:  # statistics of the training images themselves
    pixels = train.images.reshape(-1, train.images.shape[-1]).astype(np.float64) / 255.0
    mean, std = tuple(pixels.mean(0)), tuple(pixels.std(0))
  augment = e.augment if cfg.augment == 'auto' else cfg.augment
  return Dataset(e.name, num_classes, train, test, val, tuple(mean), tuple(std), augment, omitted)


def data_root(cfg, e: DatasetEntry) -> str:
  """`data.dir` (user-expanded; '' = none); for an entry read from a folder of images only, `data.folder.root` (the
  older field) may name it instead."""
  root = os.path.expanduser(cfg.dir)
  if e.folder_only:
    folder_root = os.path.expanduser(cfg.folder.root)
    if root and folder_root and os.path.abspath(root) != os.path.abspath(folder_root):
      raise ConfigError(f'data.dir={root} and data.folder.root={folder_root} name different folders; set one')
    root = root or folder_root
  return root


def as_split(images, labels, what: str) -> 'Split':
  """A Split of uint8 images [N, H, W, C] (or [N, H, W]) and integer labels [N], or a one-line refusal naming
  `what`."""
  images, labels = np.asarray(images), np.asarray(labels)
  if images.ndim == 3:
    images = images[..., None]
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ConfigError(f'{what} images must be uint8 [N, H, W, C], got {images.dtype} {list(images.shape)}')
  if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
    raise ConfigError(f'{what} labels must be integers [{images.shape[0]}], got {labels.dtype} {list(labels.shape)}')
  return Split(images, labels.astype(np.int32))


def from_arrays(train_images, train_labels, test_images=None, test_labels=None, num_classes: int | None = None,
                name: str = 'arrays', mean=None, std=None, augment: str = 'none') -> Dataset:
  """A Dataset of arrays the caller made (kdjax/api.py): uint8 images [N, H, W, C] (or [N, H, W]) and integer
  labels. `num_classes` defaults to the largest label + 1; `mean` / `std` (per channel, of pixels in [0, 1]) to
  the training images' own."""
  train = as_split(train_images, train_labels, 'train')
  test = as_split(test_images, test_labels, 'test') if test_images is not None else train
  if test.images.shape[1:] != train.images.shape[1:]:
    raise ConfigError(f'test images {list(test.images.shape[1:])} differ from the train images '
                      f'{list(train.images.shape[1:])}')
  top = int(max(train.labels.max(), test.labels.max())) + 1
  num_classes = top if num_classes is None else num_classes
  low = int(min(train.labels.min(), test.labels.min()))
  if low < 0 or top > num_classes:
    raise ConfigError(f'labels must lie in [0, {num_classes}), got {low}..{top - 1}')
  if mean is None or std is None:
    pixels = train.images.reshape(-1, train.images.shape[-1]).astype(np.float64) / 255.0
    mean, std = pixels.mean(0), np.maximum(pixels.std(0), 1e-3)
  _check_classes(train, num_classes, name)
  return Dataset(name, num_classes, train, test, None, tuple(float(m) for m in mean), tuple(float(s) for s in std),
                 augment)


def _check_classes(train: Split, num_classes: int, what: str):
  """Distillation (and any classifier) needs two classes to tell apart: a one-class dataset, or a training set left
  with one class by a subset or an omitted class, would train to accuracy 1.0 and mean nothing."""
  if num_classes < 2:
    raise ConfigError(f'dataset {what} has {num_classes} class; knowledge distillation needs at least 2')
  present = np.unique(train.labels)
  if len(present) < 2:
    raise ConfigError(f'the training set of dataset {what} holds {len(present)} class (label '
                      f'{", ".join(map(str, present)) or "none"}) in its {len(train):,} examples, after '
                      'data.train_examples, data.val_fraction and data.omit_class; knowledge distillation needs at '
                      'least 2')


def stratified_split(labels: np.ndarray, seed: int, what: str, names=None, **size) -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's seeded stratified `train_test_split(indices, **size)` of the indices of `labels` (`size`:
  train_size= or test_size=), the two parts sorted, its refusals as one line naming `what` (and the class, by
  `names` if given)."""
  from sklearn.model_selection import train_test_split
  counts = np.bincount(labels) if len(labels) else np.zeros(0, int)
  single = np.flatnonzero(counts == 1)
  if single.size:
    k = int(single[0])
    more = f' (and {single.size - 1} more class(es))' if single.size > 1 else ''
    raise ConfigError(f'{what}: class {names[k] if names else k} has a single example{more}; a stratified split '
                      'needs at least 2 of each class')
  try:
    first, second = train_test_split(np.arange(len(labels)), random_state=seed, stratify=labels, **size)
  except ValueError as e:  # e.g. fewer examples in a part than classes
    raise ConfigError(f'{what}: {" ".join(str(e).split())}') from None
  return np.sort(first), np.sort(second)


def _subset(split: Split, n: int, field: str, seed: int) -> Split:
  """`n` examples of `split`, stratified by label and seeded (0 or n >= len(split): all of it)."""
  if not n or n >= len(split):
    return split
  if n < 0:
    raise ConfigError(f'config.{field} must be >= 0, got {n}')
  idx, _ = stratified_split(split.labels, seed, f'config.{field}={n}', train_size=n)
  return split.take(idx)


def _split(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
  """A seeded stratified split of `train` into (train, val)."""
  if not 0.0 < fraction < 1.0:
    raise ConfigError(f'data.val_fraction must be in [0, 1), got {fraction}')
  idx_train, idx_val = stratified_split(train.labels, seed, f'config.data.val_fraction={fraction}',
                                        test_size=fraction)
  return train.take(idx_train), train.take(idx_val)


def cached(path: str | None, read, expected_len: int | None) -> Split:
  """`read()` once, then the decoded uint8 arrays from `path`: decoding 60,000 PNGs costs far more than loading one
  array file. A cache of another length than `expected_len` is stale (None: the path's name says what it holds).
  Each entry holds the SHA-256 of its arrays: a damaged one (cut short, a flipped bit, not an npz) is set aside as
  `<path>.damaged-<time>`, with a warning, and decoded again. An unwritable location only costs the cache."""
  if path and os.path.exists(path):
    split = _read_cache(path)
    if split is not None and (expected_len is None or len(split) == expected_len):
      return split
  split = read()
  if path:
    try:
      with atomic.writing(path, 'wb') as f:
        np.savez(f, images=split.images, labels=split.labels, sha256=np.array(digest(split.images, split.labels)))
    except OSError as e:
      logging.warning('could not cache the decoded dataset at %s: %s', path, e)
  return split


def digest(*arrays) -> str:
  """The SHA-256 (hex) of arrays, each headed by its dtype and shape: the decoded cache's checksum, and the replay
  store's key of the training set and of the teacher's variables (kdjax/replay.py)."""
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(a)
    h.update(f'{a.dtype.str}{a.shape};'.encode())
    h.update(a.reshape(-1).view(np.uint8))
  return h.hexdigest()


def _read_cache(path: str) -> Split | None:
  """The cached split at `path`, or None when it is damaged (then set aside, with a warning)."""
  try:
    with np.load(path) as f:  # allow_pickle=False: an npz holds arrays only
      images, labels, stored = f['images'], f['labels'], str(f['sha256']) if 'sha256' in f else None
    damage = None if stored in (None, digest(images, labels)) else 'its arrays do not match their SHA-256'
  except Exception as e:  # pylint: disable=broad-except  (a cut or garbled zip raises almost anything)
    damage = f'{type(e).__name__}: {" ".join(str(e).split())[:200]}'
  if damage is None and stored is None:
    logging.info('the cached dataset %s has no checksum (an older kdjax wrote it); decoding again', path)
    return None
  if damage is None:
    return Split(images, labels)
  aside = f'{path}.damaged-{int(time.time())}'
  try:
    os.rename(path, aside)
    logging.warning('the cached dataset %s is damaged (%s); moved to %s and decoded again', path, damage, aside)
  except OSError as e:  # another process set it aside first, or a read-only cache: decoded again all the same
    logging.warning('the cached dataset %s is damaged (%s); decoding again (could not move it aside: %s)', path,
                    damage, e)
  return None
