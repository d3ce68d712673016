"""Datasets from the files users already have: torchvision's download folders, read without torch or TFDS.

`config.data.dir` names a directory; what it holds picks the reader: CIFAR-10/100's Python pickles, MNIST-family IDX
files (raw or gzipped), or a folder of images (`kdjax.data.folder`). The dataset's own files win when a torchvision
root holds several. Every reader returns `Split`s of uint8 [N, H, W, C] images and int32 labels, or refuses the
input in one line naming the file. The decoded arrays are cached under `~/.cache/kdjax/data` (`data.cache_dir`),
never beside the data, keyed by the directory and the sizes and times of the files read, each entry with the
SHA-256 of its arrays (`kdjax.data.cached`: a damaged entry is set aside and decoded again).

CIFAR's pickles are read by an unpickler that builds only what the format holds (dicts, lists, bytes, str, numbers
and NumPy arrays): a file that names any other global (a crafted `data_batch_1` whose reduce calls os.system) is
refused in one line naming the file and the global, and none of its code runs.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import pickle
import pickletools
import re
import zlib

from absl import logging
import numpy as np

from kdjax.data import Split, cached
from kdjax.data import folder
from kdjax.errors import ConfigError, DatasetNotFoundError

# name -> (torchvision's folder, train files, test files, meta file, {label set: (labels key, label names key)}).
CIFAR = {
    'cifar10': ('cifar-10-batches-py', tuple(f'data_batch_{i}' for i in range(1, 6)), ('test_batch',),
                'batches.meta', {'fine': (b'labels', b'label_names')}),
    'cifar100': ('cifar-100-python', ('train',), ('test',), 'meta',
                 {'fine': (b'fine_labels', b'fine_label_names'), 'coarse': (b'coarse_labels', b'coarse_label_names')}),
}
# name -> torchvision's folder of the raw IDX files; the files may also lie in DIR or DIR/raw.
IDX_FOLDERS = {'mnist': 'MNIST/raw', 'fashion_mnist': 'FashionMNIST/raw', 'kmnist': 'KMNIST/raw'}
IDX_FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
             'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}
_IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}  # unsigned bytes, 3 (images) or 1 (labels) dimensions
_IDX_CLASSES = 10
NAMES = tuple(CIFAR) + tuple(IDX_FOLDERS) + ('folder',)

LOOKED_FOR = '; '.join([
    'CIFAR-10: cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}',
    'CIFAR-100: cifar-100-python/{train, test, meta}',
    'MNIST, Fashion-MNIST, KMNIST: {train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, '
    't10k-labels-idx1-ubyte}[.gz] in ., raw/, MNIST/raw/, FashionMNIST/raw/ or KMNIST/raw/',
    f'a folder of images: {folder.LAYOUTS}',
])


def load(cfg, root: str) -> tuple[Split, Split, int]:
  """Dataset `cfg.name` (a `config.data` section) from the files in `root`: (train, test, num_classes)."""
  name, label_set = cfg.name, cfg.get('label_set', 'fine')
  root = os.path.abspath(os.path.expanduser(root))
  found = _find(root)
  if name in CIFAR and name in found:
    where = found[name]
    files, read = _cifar_files(name, where), functools.partial(_read_cifar, name, where, label_set)
    num_classes = len(_cifar_label_names(name, where, label_set))
    options, counts = {'label_set': label_set}, (None, None)
  elif name in IDX_FOLDERS and (name in found or 'idx' in found):
    where = found.get(name) or found['idx']
    files, read, num_classes, options = _idx_files(where), functools.partial(_read_idx_dir, where), _IDX_CLASSES, {}
    counts = (None, None)
  elif 'folder' in found:
    if label_set != 'fine':
      raise ConfigError(f"data.label_set={label_set!r} needs CIFAR-100's python files (cifar-100-python), not the "
                        f'image folder {root}')
    lst = folder.listing(root, cfg.folder)
    files, num_classes = lst.files, len(lst.classes)
    read = lambda: [(split, root) for split in folder.read(lst, cfg.folder)]
    counts = (int((~lst.is_test).sum()), int(lst.is_test.sum()))
    options = {k: cfg.folder.get(k) for k in ('image_size', 'test_fraction', 'seed', 'label_column', 'file_column')}
  elif found:
    other, where = next(iter(found.items()))
    names = f'one of {", ".join(IDX_FOLDERS)}' if other == 'idx' else other
    raise ConfigError(f"data.name is {name!r} but {root} holds {'MNIST-family IDX' if other == 'idx' else other} "
                      f'files ({where}); set --config.data.name to {names}')
  else:
    missing = '' if os.path.isdir(root) else ' (no such directory)'
    raise DatasetNotFoundError(f'no dataset found in {root}{missing}: looked for {LOOKED_FOR}')

  cache = _cache_dir(cfg, root, files, options)
  read_once = functools.cache(lambda: _checked(read(), cache))
  # A cached split of another length than the folder's listing counts (None: not known before reading) is stale.
  train = cached(os.path.join(cache, 'train.npz'), lambda: read_once()[0], expected_len=counts[0])
  test = cached(os.path.join(cache, 'test.npz'), lambda: read_once()[1], expected_len=counts[1])
  return train, test, num_classes


def _checked(splits, cache: str) -> tuple[Split, Split]:
  """The splits, once they agree; only then is the cache's folder made (`cached` writes into it, or warns)."""
  (train, train_where), (test, test_where) = splits
  if train.images.shape[1:] != test.images.shape[1:]:
    raise ConfigError(f'train and test images differ in shape: {train.images.shape[1:]} in {train_where}, '
                      f'{test.images.shape[1:]} in {test_where}')
  try:
    os.makedirs(cache, exist_ok=True)
  except OSError:
    pass  # `cached` says so when it cannot write there
  return train, test


def _find(root: str) -> dict[str, str]:
  """What `root` holds: {'cifar10' | 'cifar100' | 'mnist' | 'fashion_mnist' | 'kmnist' | 'idx' | 'folder': where},
  'idx' for IDX files whose dataset the folder does not say."""
  found = {}
  has = lambda where, names: any(os.path.isfile(os.path.join(where, f)) for f in names)
  for name, (sub, train, test, meta, _) in CIFAR.items():
    if has(os.path.join(root, sub), train + test + (meta,)):
      found[name] = os.path.join(root, sub)
    # DIR may be torchvision's folder itself; CIFAR-100's generic names ('train', 'meta') need each other there.
    elif has(root, train + test) and (name == 'cifar10' or has(root, (meta,))):
      found[name] = root
  for name, sub in IDX_FOLDERS.items():
    if holds_idx(os.path.join(root, sub)):
      found[name] = os.path.join(root, sub)
  for where in (root, os.path.join(root, 'raw')):
    if holds_idx(where):
      found.setdefault('idx', where)
  if folder.layout(root):
    found['folder'] = root
  return found


def holds_idx(where: str) -> bool:
  return any(_idx_path(where, f) for files in IDX_FILES.values() for f in files)


def _idx_path(where: str, name: str) -> str | None:
  for path in (os.path.join(where, name), os.path.join(where, name + '.gz')):  # torchvision keeps both
    if os.path.isfile(path):
      return path
  return None


# The cache.

def _cache_dir(cfg, root: str, files: list[str], options: dict) -> str:
  """`<cache_dir>/<name>-<hash>`: the hash covers the directory, the files' sizes and times and the options that
  change the arrays, so a changed file is decoded again."""
  stats = []
  for path in files:
    try:
      st = os.stat(path)
    except OSError as e:  # listed a moment ago: removed since, or a link that leads nowhere
      raise ConfigError(f'cannot read {path}: {e.strerror or e}') from None
    stats.append((os.path.relpath(path, root), st.st_size, st.st_mtime_ns))
  key = json.dumps([root, stats, options], sort_keys=True, default=str)
  digest = hashlib.sha1(key.encode()).hexdigest()[:12]
  return os.path.join(os.path.expanduser(cfg.get('cache_dir') or '~/.cache/kdjax/data'), f'{cfg.name}-{digest}')


def _one_line(error: Exception) -> str:
  return ' '.join(str(error).split())


# CIFAR-10/100: pickled dicts with byte-string keys, b'data' uint8 [N, 3072] in CHW order.

def _cifar_files(name: str, where: str) -> list[str]:
  _, train, test, meta, _ = CIFAR[name]
  paths = [os.path.join(where, f) for f in train + test + (meta,)]
  missing = [os.path.basename(p) for p in paths if not os.path.isfile(p)]
  if missing:
    raise DatasetNotFoundError(f'incomplete {name} files in {where}: missing {", ".join(missing)}')
  return paths


@functools.cache
def _numpy_globals() -> dict:
  """The NumPy callables an array's pickle names, under NumPy 1's and NumPy 2's module paths (torchvision's files
  were written by NumPy 1: numpy.core.multiarray._reconstruct, numpy.ndarray, numpy.dtype)."""
  core = getattr(np, '_core', None) or np.core
  out = {}
  for module in ('numpy.core', 'numpy._core'):
    out[(f'{module}.multiarray', '_reconstruct')] = core.multiarray._reconstruct
    out[(f'{module}.multiarray', 'scalar')] = core.multiarray.scalar
    if hasattr(core.numeric, '_frombuffer'):  # protocol 5 pickles of arrays
      out[(f'{module}.numeric', '_frombuffer')] = core.numeric._frombuffer
  out[('numpy', 'ndarray')], out[('numpy', 'dtype')] = np.ndarray, np.dtype
  return out


def _latin1_encode(text: str, encoding: str = 'utf-8') -> bytes:
  """`_codecs.encode` as Python 3 pickles bytes at protocol 2 (`encode(str, 'latin1')`), and nothing else."""
  if encoding not in ('latin1', 'latin-1') or not isinstance(text, str):
    raise pickle.UnpicklingError(f'_codecs.encode with {encoding!r} is not how a CIFAR file holds bytes')
  return text.encode('latin1')


class _CifarUnpickler(pickle.Unpickler):
  """Loads only what CIFAR's pickles hold: dicts, lists, tuples, bytes, str, numbers and NumPy arrays. Any other
  global (a class, a function such as os.system that a crafted file's reduce would call) is refused, so no code
  from the file runs."""

  def find_class(self, module, name):
    if (module, name) == ('_codecs', 'encode'):
      return _latin1_encode
    found = _numpy_globals().get((module, name))
    if found is not None:
      return found
    raise _ForbiddenGlobal(f'{module}.{name}')


class _ForbiddenGlobal(pickle.UnpicklingError):
  """A pickle names a global that CIFAR's files never hold."""


def _unpickle(path: str) -> dict:
  """torchvision's files were written by Python 2: str keys and values load as bytes."""
  with open(path, 'rb') as f:
    raw = f.read()
  try:
    d = _CifarUnpickler(io.BytesIO(raw), encoding='bytes').load()
  except _ForbiddenGlobal as e:
    raise ConfigError(f'refused {path}: it names {e}, which a CIFAR file never holds (loading it could run code from '
                      'the file); replace it with the original download') from None
  except Exception as e:  # pylint: disable=broad-except  (unpickling garbage raises almost anything)
    raise ConfigError(_pickle_damage(path, raw, e)) from None
  if not isinstance(d, dict):
    raise ConfigError(f'corrupt file {path}: holds a {type(d).__name__}, not the dict of a CIFAR file')
  return d


def _pickle_damage(path: str, raw: bytes, error: Exception) -> str:
  """A one-line account of an unreadable pickle: for a cut file, how long it should at least be."""
  try:
    for _ in pickletools.genops(raw):
      pass
  except ValueError as e:
    m = re.search(r'expected (\d+) bytes in a \w+, but only (\d+) remain', str(e))
    if m:  # the cut fell inside a string: the file needs everything before it plus the whole string
      need = len(raw) - int(m[2]) + int(m[1])
      return f'truncated file {path}: expected at least {need:,} bytes, found {len(raw):,}'
  return f'corrupt file {path} ({len(raw):,} bytes): cannot unpickle it ({type(error).__name__}: {_one_line(error)})'


def _cifar_label_names(name: str, where: str, label_set: str) -> list:
  _, _, _, meta, keys = CIFAR[name]
  path = os.path.join(where, meta)
  d = _unpickle(path)
  key = keys[label_set][1]
  if key not in d:
    raise ConfigError(f'corrupt file {path}: no {key!r} among its keys {sorted(d)}')
  names = d[key]
  if isinstance(names, np.ndarray):
    names = names.tolist()
  if not isinstance(names, (list, tuple)):
    raise ConfigError(f'corrupt file {path}: {key!r} is of type {type(names).__name__}, not a list of class names')
  bad = [n for n in names if not isinstance(n, (bytes, str))]
  if bad:
    raise ConfigError(f'corrupt file {path}: {key!r} holds {str(bad[0])[:40]} (of type {type(bad[0]).__name__}) '
                      'among its class names, which are strings')
  if len(names) < 2:
    raise ConfigError(f'corrupt file {path}: {key!r} names {len(names)} class(es); a dataset needs at least 2')
  return list(names)


def _read_cifar_file(path: str, labels_key: bytes, num_classes: int) -> Split:
  d = _unpickle(path)
  for key in (b'data', labels_key):
    if key not in d:
      raise ConfigError(f'corrupt file {path}: no {key!r} among its keys {sorted(d)}')
  data = d[b'data']
  data = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else np.asarray(data)
  labels = np.asarray(d[labels_key])
  if data.dtype != np.uint8 or labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ConfigError(f'corrupt file {path}: b\'data\' is {data.dtype} (expected uint8), '
                      f'{labels_key!r} is {labels.dtype} of shape {labels.shape} (expected integers)')
  n = len(labels)
  if data.size != n * 3072:
    raise ConfigError(f"corrupt file {path}: expected {n:,} x 3072 = {n * 3072:,} bytes of b'data' for its {n:,} "
                      f'labels, found {data.size:,}')
  _check_labels(labels, num_classes, path)
  # CHW rows -> HWC images.
  return Split(data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels.astype(np.int32))


def _read_cifar(name: str, where: str, label_set: str):
  _, train, test, _, keys = CIFAR[name]
  num_classes = len(_cifar_label_names(name, where, label_set))
  logging.info('decoding %s from %s (%s labels; once: later runs read the cached arrays)', name, where, label_set)
  splits = []
  for files in (train, test):
    parts = [_read_cifar_file(os.path.join(where, f), keys[label_set][0], num_classes) for f in files]
    splits.append((Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts])),
                   where))
  return splits


def _check_labels(labels: np.ndarray, num_classes: int, path: str):
  bad = labels[(labels < 0) | (labels >= num_classes)]
  if bad.size:
    raise ConfigError(f'labels out of range in {path}: {bad.size:,} outside 0..{num_classes - 1}, the first '
                      f'{int(bad[0])}')


# IDX (MNIST, Fashion-MNIST, KMNIST): a big-endian magic number, big-endian int32 sizes, then the bytes.

def _idx_files(where: str) -> list[str]:
  paths, missing = [], []
  for files in IDX_FILES.values():
    for f in files:
      path = _idx_path(where, f)
      paths.append(path)
      if path is None:
        missing.append(f + '[.gz]')
  if missing:
    raise DatasetNotFoundError(f'incomplete IDX files in {where}: missing {", ".join(missing)}')
  return paths


def _read_bytes(path: str) -> tuple[bytes, bool, str]:
  """The file's bytes (decompressed for .gz), whether its gzip stream ends early, and the decompression error."""
  with open(path, 'rb') as f:
    data = f.read()
  if not path.endswith('.gz'):
    return data, False, ''
  # zlib rather than gzip.open: on a cut stream it keeps what was decompressed before, which tells how much is
  # missing. 16 + MAX_WBITS: a gzip member, its CRC and length checked.
  out, pos = [], 0
  while pos < len(data) and data[pos:].strip(b'\0'):  # members one after another; zero padding after the last
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    while not d.eof and pos < len(data):
      chunk = data[pos:pos + (1 << 22)]
      pos += len(chunk)
      try:
        out.append(d.decompress(chunk))
      except zlib.error as e:
        start = b''.join(out)
        if len(start) < 64:  # the damage ended the chunk that held the start: its header still gives the sizes
          try:
            start = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[:1 << 16], 64)
          except zlib.error:
            pass
        return start, False, _one_line(e)
    if not d.eof:
      return b''.join(out), True, ''
    pos -= len(d.unused_data)
  return b''.join(out), False, ''


def read_idx(path: str, ndim: int) -> np.ndarray:
  """An IDX file of unsigned bytes with `ndim` dimensions, validated against its header."""
  raw, cut, error = _read_bytes(path)
  after = ' after decompression' if path.endswith('.gz') else ''
  header, magic = 4 + 4 * ndim, int.from_bytes(raw[:4], 'big')
  if len(raw) >= 4 and magic != _IDX_MAGIC[ndim]:
    raise ConfigError(f'corrupt file {path}: IDX magic number 0x{magic:08x}, expected 0x{_IDX_MAGIC[ndim]:08x} '
                      f'({"images" if ndim == 3 else "labels"})')
  dims = tuple(int(d) for d in np.frombuffer(raw, '>i4', ndim, 4)) if len(raw) >= header else None
  if dims and (min(dims) < 0 or (ndim == 3 and min(dims[1:]) < 1)):
    raise ConfigError(f'corrupt file {path}: its IDX header gives the sizes {" x ".join(map(str, dims))}'
                      f'{" (negative)" if min(dims) < 0 else " (an empty image)"}')
  expected = header + math.prod(dims) if dims else None
  shape = f' (a {header}-byte header and {" x ".join(map(str, dims))} bytes)' if dims else ' (the IDX header)'
  if error:
    raise ConfigError(f'corrupt file {path}: its gzip data is damaged ({error})' +
                      (f'; expected {expected:,} bytes after decompression{shape}' if dims else ''))
  if expected is None or len(raw) < expected or cut:
    raise ConfigError(f'truncated file {path}: expected {"at least " if dims is None else ""}'
                      f'{expected or header:,} bytes{after}{shape}, found {len(raw):,}'
                      f'{"; the gzip stream ends early" if cut else ""}')
  if len(raw) > expected:
    raise ConfigError(f'corrupt file {path}: expected {expected:,} bytes{after}{shape}, found {len(raw):,}')
  return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _read_idx_dir(where: str):
  logging.info('decoding the IDX files in %s (once: later runs read the cached arrays)', where)
  splits = []
  for images_name, labels_name in IDX_FILES.values():
    images_path, labels_path = _idx_path(where, images_name), _idx_path(where, labels_name)
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if len(images) != len(labels):
      raise ConfigError(f'mismatched files: {images_path} holds {len(images):,} images, {labels_path} '
                        f'{len(labels):,} labels')
    _check_labels(labels, _IDX_CLASSES, labels_path)
    splits.append((Split(images[..., None].copy(), labels.astype(np.int32)), images_path))
  return splits
