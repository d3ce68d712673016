"""Datasets as uint8 arrays in host memory: read once, then put on the devices (see `kdjax.data.device`).

Sources: the files users already have in `data.dir` (torchvision's CIFAR pickles and MNIST-family IDX files, or a
folder of images; `kdjax.data.files`), TFDS (`mnist`, `fashion_mnist`, `cifar10`, `cifar100`) through
`tfds.data_source` (array_record files, no TensorFlow needed to read), Debian's Fashion-MNIST package, and
scikit-learn's shipped `digits`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time

from absl import logging
import numpy as np

from kdjax import atomic
from kdjax.errors import ConfigError, DatasetNotFoundError

# Per-channel statistics of the training sets, as the reference codebases normalise (RepDistiller for CIFAR-100).
_STATS = {
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'cifar100': ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    'mnist': ((0.1307,), (0.3081,)),
    'fashion_mnist': ((0.2860,), (0.3530,)),
}
TFDS_NAMES = ('mnist', 'fashion_mnist', 'cifar10', 'cifar100')
# Where Debian's dataset-fashion-mnist package puts the original gzipped IDX files.
DEBIAN_FASHION_MNIST = '/usr/share/datasets/fashion-mnist'
LABEL_SETS = ('fine', 'coarse')  # CIFAR-100's 100 classes, or its 20 superclasses
# Pad-4 random crop + horizontal flip, as the CIFAR references augment; none for the digit datasets.
_DEFAULT_AUGMENT = {'cifar10': 'crop_flip', 'cifar100': 'crop_flip'}


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
  """Loads `cfg.name` (a `config.data` section) and carves the optional validation split from train."""
  from kdjax.data import files
  name, root = cfg.name, os.path.expanduser(cfg.get('dir') or '')
  label_set = cfg.get('label_set', 'fine')
  if name not in ('digits',) + files.NAMES:
    raise ConfigError(f'unknown dataset {name!r}; choose one of digits, {", ".join(files.NAMES)}')
  if label_set not in LABEL_SETS:
    raise ConfigError(f'data.label_set must be one of {", ".join(LABEL_SETS)}, got {label_set!r}')
  if label_set != 'fine' and name != 'cifar100':
    raise ConfigError(f'data.label_set={label_set!r} applies to cifar100 only (its 20 superclasses), not {name}')
  if name == 'folder':
    folder_root = os.path.expanduser(cfg.folder.get('root') or '')
    if root and folder_root and os.path.abspath(root) != os.path.abspath(folder_root):
      raise ConfigError(f'data.dir={root} and data.folder.root={folder_root} name different folders; set one')
    root = root or folder_root
  if name == 'digits':
    if root:
      raise ConfigError(f'data.dir={root} but digits is scikit-learn\'s shipped dataset; set data.name to one of '
                        f'{", ".join(files.NAMES)} for the files there')
    train, test, num_classes = _load_digits()
  elif root or name == 'folder':
    train, test, num_classes = files.load(cfg, root)
  elif name == 'fashion_mnist' and files.holds_idx(DEBIAN_FASHION_MNIST):
    train, test, num_classes = files.load(cfg, DEBIAN_FASHION_MNIST)
  elif name in TFDS_NAMES:
    train, test, num_classes = _load_tfds(name, cfg.get('data_dir') or None, label_set)
  else:
    raise ConfigError(f"{name} is read from torchvision's files: set --config.data.dir to the folder that holds "
                      f'{files.IDX_FOLDERS.get(name, name)}')

  # Seeded stratified subsets (quick experiments, CI-sized real data), before the validation split.
  train = _subset(train, cfg.get('train_examples', 0), 'data.train_examples', cfg.get('val_seed', 0))
  test = _subset(test, cfg.get('test_examples', 0), 'data.test_examples', cfg.get('val_seed', 0))

  val = None
  fraction = cfg.get('val_fraction', 0.0)
  if fraction:
    train, val = _split(train, fraction, cfg.get('val_seed', 0))

  omitted = cfg.get('omit_class', -1)
  if omitted >= 0:  # after the validation split, so validation keeps the class: only the transfer set lacks it
    if omitted >= num_classes:
      raise ConfigError(f'data.omit_class={omitted} but {name} has {num_classes} classes')
    train = train.take(train.labels != omitted)
  _check_classes(train, num_classes, f'{name} ({root})' if root else name)

  if name in _STATS:
    mean, std = _STATS[name]
  else:  # statistics of the training images themselves
    pixels = train.images.reshape(-1, train.images.shape[-1]).astype(np.float64) / 255.0
    mean, std = tuple(pixels.mean(0)), tuple(pixels.std(0))
  augment = cfg.get('augment', 'auto')
  if augment == 'auto':
    augment = _DEFAULT_AUGMENT.get(name, 'none')
  return Dataset(name, num_classes, train, test, val, tuple(mean), tuple(std), augment, omitted)


def from_arrays(train_images, train_labels, test_images=None, test_labels=None, num_classes: int | None = None,
                name: str = 'arrays', mean=None, std=None, augment: str = 'none') -> Dataset:
  """A Dataset of arrays the caller made (kdjax/api.py): uint8 images [N, H, W, C] (or [N, H, W]) and integer
  labels. `num_classes` defaults to the largest label + 1; `mean` / `std` (per channel, of pixels in [0, 1]) to
  the training images' own."""
  def split(images, labels, what):
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim == 3:
      images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4:
      raise ConfigError(f'{what} images must be uint8 [N, H, W, C], got {images.dtype} {list(images.shape)}')
    if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
      raise ConfigError(f'{what} labels must be integers [{images.shape[0]}], got {labels.dtype} {list(labels.shape)}')
    return Split(images, labels.astype(np.int32))
  train = split(train_images, train_labels, 'train')
  test = split(test_images, test_labels, 'test') if test_images is not None else train
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


def _load_digits() -> tuple[Split, Split, int]:
  """scikit-learn's 1,797 real 8x8 handwritten digits (pixel values 0..16), a fixed stratified 80/20 split."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  d = load_digits()
  images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = d.target.astype(np.int32)
  idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=0.2, random_state=0, stratify=labels)
  return Split(images[idx_train], labels[idx_train]), Split(images[idx_test], labels[idx_test]), 10


def _prepare_hint(name: str, data_dir: str | None) -> str:
  where = data_dir or '~/tensorflow_datasets'
  debian = (f', or `apt-get install dataset-fashion-mnist` (Debian\'s package: the original files in '
            f'{DEBIAN_FASHION_MNIST})') if name == 'fashion_mnist' else ''
  return (f'dataset {name!r} is not prepared in {where}; on a machine with internet run '
          f'`pip install tensorflow tensorflow-datasets && tfds build {name} --file_format=array_record '
          f'--data_dir={where}` and copy {where}/{name} here (or set --config.data.data_dir){debian}; or point '
          "--config.data.dir at torchvision's files (see README, Data)")


def _load_tfds(name: str, data_dir: str | None, label_set: str = 'fine') -> tuple[Split, Split, int]:
  import tensorflow_datasets as tfds
  builder = tfds.builder(name, data_dir=data_dir)
  label_key, suffix = ('coarse_label', '_coarse') if label_set == 'coarse' else ('label', '')
  splits = {}
  try:
    for split in ('train', 'test'):
      source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
      cache = os.path.join(builder.data_dir, f'kdjax_uint8_{split}{suffix}.npz') if builder.is_prepared() else None
      splits[split] = cached(cache, lambda: _read_all(source, f'{name}/{split}', label_key), expected_len=len(source))
  except Exception as e:  # tfds raises several types for "not there"; decide by asking the builder
    if builder.is_prepared():
      raise
    raise DatasetNotFoundError(_prepare_hint(name, data_dir)) from e
  return splits['train'], splits['test'], builder.info.features[label_key].num_classes


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
        np.savez(f, images=split.images, labels=split.labels, sha256=np.array(_digest(split.images, split.labels)))
    except OSError as e:
      logging.warning('could not cache the decoded dataset at %s: %s', path, e)
  return split


def _digest(images: np.ndarray, labels: np.ndarray) -> str:
  h = hashlib.sha256()
  for a in (images, labels):
    a = np.ascontiguousarray(a)
    h.update(f'{a.dtype.str}{a.shape};'.encode())
    h.update(a.reshape(-1).view(np.uint8))
  return h.hexdigest()


def _read_cache(path: str) -> Split | None:
  """The cached split at `path`, or None when it is damaged (then set aside, with a warning)."""
  try:
    with np.load(path) as f:  # allow_pickle=False: an npz holds arrays only
      images, labels, digest = f['images'], f['labels'], str(f['sha256']) if 'sha256' in f else None
    damage = None if digest in (None, _digest(images, labels)) else 'its arrays do not match their SHA-256'
  except Exception as e:  # pylint: disable=broad-except  (a cut or garbled zip raises almost anything)
    damage = f'{type(e).__name__}: {" ".join(str(e).split())[:200]}'
  if damage is None and digest is None:
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


def _read_all(source, what: str, label_key: str = 'label') -> Split:
  n = len(source)
  logging.info('decoding %s: %d examples (once; later runs read the cached arrays)', what, n)
  first = source[0]
  images = np.empty((n,) + first['image'].shape, np.uint8)
  labels = np.empty((n,), np.int32)
  for i in range(n):
    ex = source[i]
    images[i] = ex['image']
    labels[i] = ex[label_key]
  return Split(images, labels)
