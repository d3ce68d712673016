"""Datasets from the files users already have: torchvision's download folders, read without torch or TFDS.

`config.data.dir` names a directory; the dataset entry's dir readers (kdjax/data/readers.py) say what it may hold:
CIFAR-10/100's Python pickles, MNIST-family IDX files (raw or gzipped), or a folder of images (`kdjax.data.folder`).
`_find` looks for the layouts of every registered entry, so the dataset's own files win when a torchvision root holds
several, and a directory that holds another dataset's files is refused naming it. Every reader returns `Split`s of
uint8 [N, H, W, C] images and int32 labels, or refuses the input in one line naming the file. The decoded arrays are cached under `~/.cache/kdjax/data` (`data.cache_dir`),
never beside the data, keyed by the directory and the sizes and times of the files read, each entry with the
SHA-256 of its arrays (`kdjax.data.cached`: a damaged entry is set aside and decoded again).

CIFAR's pickles are read by an unpickler that builds only what the format holds (dicts, lists, bytes, str, numbers
and NumPy arrays): a file that names any other global (a crafted `data_batch_1` whose reduce calls os.system) is
refused in one line naming the file and the global, and none of its code runs.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import pickle
import pickletools
import re
from typing import Callable
import zlib

from absl import logging
import numpy as np

from kdjax.data import Split, cached
from kdjax.data import registry
from kdjax.errors import ConfigError, DatasetNotFoundError

IDX_FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
             'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}
_IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}  # unsigned bytes, 3 (images) or 1 (labels) dimensions


@dataclasses.dataclass
class Plan:
  """What reading a dataset's files takes (a dir reader's `plan`, kdjax/data/readers.py)."""
  files: list[str]  # every file read: what the decoded cache depends on
  read: Callable  # -> [(train Split, where it was read), (test Split, where)]
  num_classes: int
  options: dict  # what else changes the arrays (in the cache key)
  counts: tuple = (None, None)  # the splits' lengths when known before reading (a cache of another length is stale)


@dataclasses.dataclass
class _Found:
  name: str | None  # the dataset whose own files these are; None: files of a kind whose folder names no dataset
  kind: type  # the reader class that reads them
  where: str
  reader: object = None


def _kinds() -> list[type]:
  """The classes of the registered dir readers, in their `order` (CIFAR pickles, IDX files, image folders)."""
  seen = {}
  for e in registry.DATASETS.values():
    for r in e.dir_readers():
      seen.setdefault(type(r), None)
  return sorted(seen, key=lambda kind: kind.order)


def looked_for() -> str:
  """What a `data.dir` is searched for, every registered layout."""
  lines = []
  for kind in _kinds():
    pairs = [(e, r) for e in registry.DATASETS.values() for r in e.dir_readers() if type(r) is kind]
    lines += kind.looked_for(pairs)
  return '; '.join(lines)


def load(cfg, root: str, entry) -> tuple[Split, Split, int]:
  """Dataset `entry` (`cfg`: its `config.data` section) from the files in `root`: (train, test, num_classes), read
  by the entry's first dir reader whose files lie there."""
  root = os.path.abspath(os.path.expanduser(root))
  found = _find(root)
  for reader in entry.dir_readers():
    where = next((f.where for f in found if f.reader is reader), None)
    if where is None and reader.reads_any:
      where = next((f.where for f in found if f.name is None and f.kind is type(reader)), None)
    if where is not None:
      return read_plan(cfg, root, reader.plan(cfg, root, where, entry))
  if found:
    f = found[0]
    if f.name is not None:
      what, names = f.name, f.name
    else:
      what = f.kind.kind
      owners = [e.name for e in registry.DATASETS.values() if any(type(r) is f.kind for r in e.readers)
                and (f.kind.kind != 'folder' or e.folder_only)]
      names = owners[0] if len(owners) == 1 else f'one of {", ".join(owners)}'
    raise ConfigError(f'data.name is {entry.name!r} but {root} holds {what} files ({f.where}); set '
                      f'--config.data.name to {names}')
  missing = '' if os.path.isdir(root) else ' (no such directory)'
  raise DatasetNotFoundError(f'no dataset found in {root}{missing}: looked for {looked_for()}')


def read_plan(cfg, root: str, plan: Plan) -> tuple[Split, Split, int]:
  """The splits a plan reads: from the decoded cache, else read (and cached)."""
  cache = _cache_dir(cfg, root, plan.files, plan.options)
  read_once = functools.cache(lambda: _checked(plan.read(), cache))
  # A cached split of another length than the folder's listing counts (None: not known before reading) is stale.
  train = cached(os.path.join(cache, 'train.npz'), lambda: read_once()[0], expected_len=plan.counts[0])
  test = cached(os.path.join(cache, 'test.npz'), lambda: read_once()[1], expected_len=plan.counts[1])
  return train, test, plan.num_classes


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


def _find(root: str) -> list[_Found]:
  """What `root` holds, in the order of `_kinds`: each registered dir reader's own files (CIFAR-10's
  cifar-10-batches-py, MNIST's MNIST/raw, ...), then the files of its kind whose folder names no dataset (IDX files in
  root or root/raw, a folder of images)."""
  found = []
  for kind in _kinds():
    for e in registry.DATASETS.values():
      for r in e.dir_readers():
        where = r.locate(root) if type(r) is kind else None
        if where:
          found.append(_Found(e.name, kind, where, r))
    where = kind.locate_any(root)
    if where:
      found.append(_Found(None, kind, where))
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
  return os.path.join(os.path.expanduser(cfg.cache_dir or '~/.cache/kdjax/data'), f'{cfg.name}-{digest}')


def _one_line(error: Exception) -> str:
  return ' '.join(str(error).split())


# CIFAR-10/100: pickled dicts with byte-string keys, b'data' uint8 [N, 3072] in CHW order.

def cifar_files(reader, name: str, where: str) -> list[str]:
  """The files of dataset `name` that its `readers.CifarFiles` reader names, all present in `where`."""
  paths = [os.path.join(where, f) for f in reader.train + reader.test + (reader.meta,)]
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


def cifar_label_names(reader, where: str, label_set: str) -> list:
  path = os.path.join(where, reader.meta)
  d = _unpickle(path)
  key = reader.labels[label_set][1]
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


def _read_cifar(reader, name: str, where: str, label_set: str):
  train, test, keys = reader.train, reader.test, reader.labels
  num_classes = len(cifar_label_names(reader, where, label_set))
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

def idx_files(where: str) -> list[str]:
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


def read_idx_dir(where: str, num_classes: int):
  logging.info('decoding the IDX files in %s (once: later runs read the cached arrays)', where)
  splits = []
  for images_name, labels_name in IDX_FILES.values():
    images_path, labels_path = _idx_path(where, images_name), _idx_path(where, labels_name)
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if len(images) != len(labels):
      raise ConfigError(f'mismatched files: {images_path} holds {len(images):,} images, {labels_path} '
                        f'{len(labels):,} labels')
    _check_labels(labels, num_classes, labels_path)
    splits.append((Split(images[..., None].copy(), labels.astype(np.int32)), images_path))
  return splits
