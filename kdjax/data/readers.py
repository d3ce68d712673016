"""Where a dataset's images come from: the readers a `DatasetEntry` lists (kdjax/data/registry.py).

A reader either reads the files in `data.dir` (`takes_dir`: torchvision's CIFAR pickles or MNIST-family IDX files,
a folder of images; `kdjax.data.files` finds which lie there), or needs no `data.dir` (TFDS, IDX files at a fixed
place such as Debian's package, arrays a function makes). With `data.dir` set, the entry's first reader whose files
lie there reads it; without, its first reader that needs no `data.dir` and is `available`. A reader that `streams`
also opens the dataset for data.pipeline='stream' (kdjax/data/stream.py). Every reader returns uint8 [N, H, W, C]
images and int32 labels, or refuses its input in one line.

The format code stays where it was (files.py: the CIFAR unpickler, IDX parsing, the decoded-array cache; folder.py:
the folder layouts; stream.py: the record sources); a reader is its parameters and the glue.
"""

from __future__ import annotations

import functools
import os

from absl import logging
import numpy as np

from kdjax.errors import ConfigError, DatasetNotFoundError


class Reader:
  """The interface. No-dir readers implement `available` and `read`; dir readers `locate`, `plan` and `needs_dir`
  (and the class methods `locate_any` and `looked_for`); readers that stream `open_stream` (and `stream_bytes`)."""
  takes_dir = False  # reads the files in data.dir
  streams = False  # opens the dataset for data.pipeline='stream' too
  needs_num_classes = False  # its files do not say the class count: the entry's num_classes does
  reads_any = False  # dir readers: also reads files of its kind whose folder does not name the dataset
  order = 9  # dir readers: the order in which files.py looks for the kinds of files (its messages list them so)
  what = 'not read from files'  # how the refusal of a data.dir it does not read names it

  def available(self, cfg) -> bool:
    return True

  def read(self, cfg, entry):
    """No-dir readers: (train Split, test Split, num_classes) of dataset `entry` (`cfg`: its config.data)."""
    raise NotImplementedError

  def hint(self) -> str:
    """What another reader's "not prepared" message may suggest instead ('' = nothing)."""
    return ''

  def source(self, entry) -> str:
    return f'{type(self).__name__}'

  # Dir readers.
  def locate(self, root: str) -> str | None:
    """Where this dataset's own files lie in `root` (None: not there)."""
    return None

  @classmethod
  def locate_any(cls, root: str) -> str | None:
    """Where files of this kind lie in `root` whose folder does not name their dataset."""
    return None

  kind = 'such'  # how "root holds ... files" names files found by `locate_any`

  def plan(self, cfg, root: str, where: str, entry):
    """What reading the files at `where` takes: a `files.Plan`."""
    raise NotImplementedError

  def needs_dir(self, entry) -> str:
    return f'{entry.name} is read from the files in --config.data.dir; set it'

  @classmethod
  def looked_for(cls, pairs) -> list[str]:
    """What `root` was searched for, for the (entry, reader) pairs of this kind."""
    return []

  # Readers that stream.
  def open_stream(self, cfg, entry, root: str, size: int):
    """(train Records, test Records, num_classes) for the stream pipeline."""
    raise NotImplementedError

  def stream_bytes(self, cfg, root: str) -> int | None:
    """The decoded training images' size in bytes, for data.pipeline='auto' (None: cannot be streamed)."""
    return None


def without_dir(entry, cfg) -> Reader:
  """The reader of `entry` that reads it with `data.dir` empty, or a one-line refusal."""
  for reader in entry.readers:
    if not reader.takes_dir and reader.available(cfg):
      return reader
  dirs = entry.dir_readers()
  if dirs:
    raise ConfigError(dirs[0].needs_dir(entry))
  raise DatasetNotFoundError(f'dataset {entry.name!r} is not on this machine: looked for '
                             f'{"; ".join(r.source(entry) for r in entry.readers)}')


def _split_of(out, what: str):
  from kdjax import data
  if isinstance(out, data.Split):
    out = (out.images, out.labels)
  if not (isinstance(out, tuple) and len(out) == 2):
    raise ConfigError(f'{what} must be a kdjax.data.Split or an (images, labels) pair, got {type(out).__name__}')
  return data.as_split(out[0], out[1], what)


# ------------------------------------------------------------------------------------------------ no files
class Arrays(Reader):
  """Arrays a function makes: `fn(cfg)` (cfg: the config.data section) -> (train, test, num_classes), each split a
  `kdjax.data.Split` or an (images uint8 [N, H, W, C] or [N, H, W], integer labels [N]) pair. `what` says what
  they are (the refusal of a data.dir names it)."""

  def __init__(self, fn, what: str = 'made by a function, not read from files'):
    self.fn, self.what = fn, what

  def read(self, cfg, entry):
    out = self.fn(cfg)
    name = getattr(self.fn, '__name__', 'fn')
    if not (isinstance(out, tuple) and len(out) == 3):
      raise ConfigError(f'dataset {entry.name!r}: its reader {name}() must return (train, test, num_classes), got '
                        f'{type(out).__name__}')
    train, test = (_split_of(s, f'dataset {entry.name!r}: the {part} split of {name}()')
                   for s, part in ((out[0], 'train'), (out[1], 'test')))
    num_classes = out[2]
    if not isinstance(num_classes, (int, np.integer)):
      raise ConfigError(f'dataset {entry.name!r}: {name}() gave num_classes={num_classes!r}, not an integer')
    if test.images.shape[1:] != train.images.shape[1:]:
      raise ConfigError(f'dataset {entry.name!r}: its test images {list(test.images.shape[1:])} differ from its '
                        f'train images {list(train.images.shape[1:])}')
    for split, part in ((train, 'train'), (test, 'test')):
      bad = split.labels[(split.labels < 0) | (split.labels >= num_classes)]
      if bad.size:
        raise ConfigError(f'dataset {entry.name!r}: {bad.size:,} {part} labels outside 0..{num_classes - 1}, the '
                          f'first {int(bad[0])}')
    return train, test, int(num_classes)

  def source(self, entry):
    return f'{getattr(self.fn, "__name__", "its function")}()'


def sklearn_digits(cfg):
  """scikit-learn's 1,797 real 8x8 handwritten digits (pixel values 0..16), a fixed stratified 80/20 split."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  from kdjax.data import Split
  d = load_digits()
  images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = d.target.astype(np.int32)
  idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=0.2, random_state=0, stratify=labels)
  return Split(images[idx_train], labels[idx_train]), Split(images[idx_test], labels[idx_test]), 10


class Tfds(Reader):
  """A TFDS dataset prepared as array_record, read through `tfds.data_source` (no TensorFlow needed to read):
  decoded once into uint8 arrays cached beside the TFDS files, or streamed. `labels`: data.label_set -> the feature
  holding those labels. Its splits are the entry's `splits`."""
  streams = True
  what = 'read from TFDS'

  def __init__(self, name: str, labels: dict | None = None):
    self.name, self.labels = name, dict(labels or {'fine': 'label'})

  def source(self, entry):
    return f"TFDS's {self.name}"

  def _not_prepared(self, entry, data_dir: str | None) -> str:
    where = data_dir or '~/tensorflow_datasets'
    others = ''.join(f', or {h}' for h in (r.hint() for r in entry.readers) if h)
    files = "; or point --config.data.dir at torchvision's files (see README, Data)" if entry.dir_readers() else ''
    return (f'dataset {self.name!r} is not prepared in {where}; on a machine with internet run '
            f'`pip install tensorflow tensorflow-datasets && tfds build {self.name} --file_format=array_record '
            f'--data_dir={where}` and copy {where}/{self.name} here (or set --config.data.data_dir){others}{files}')

  def read(self, cfg, entry):
    import tensorflow_datasets as tfds
    from kdjax.data import cached
    data_dir = cfg.data_dir or None
    builder = tfds.builder(self.name, data_dir=data_dir)
    label_key = self.labels[cfg.label_set]
    suffix = '' if cfg.label_set == 'fine' else f'_{cfg.label_set}'
    splits = []
    try:
      for split in entry.splits:
        source = tfds.data_source(self.name, split=split, data_dir=data_dir, download=False)
        cache = os.path.join(builder.data_dir, f'kdjax_uint8_{split}{suffix}.npz') if builder.is_prepared() else None
        splits.append(cached(cache, functools.partial(_read_all, source, f'{self.name}/{split}', label_key),
                             expected_len=len(source)))
    except Exception as e:  # tfds raises several types for "not there"; decide by asking the builder
      if builder.is_prepared():
        raise
      raise DatasetNotFoundError(self._not_prepared(entry, data_dir)) from e
    return splits[0], splits[1], builder.info.features[label_key].num_classes

  def open_stream(self, cfg, entry, root, size):
    import tensorflow_datasets as tfds
    from kdjax.data import stream
    data_dir = cfg.data_dir or None
    builder = tfds.builder(self.name, data_dir=data_dir)
    label_key = self.labels[cfg.label_set]
    try:
      train, test = (stream.Records(stream.TfdsSource(self.name, split, data_dir, label_key), size,
                                    f'{self.name}/{split}') for split in entry.splits)
    except Exception as e:  # tfds raises several types for "not there"
      if builder.is_prepared():
        raise
      raise DatasetNotFoundError(self._not_prepared(entry, data_dir)) from e
    return train, test, builder.info.features[label_key].num_classes


def _read_all(source, what: str, label_key: str = 'label'):
  from kdjax.data import Split
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


class IdxAt(Reader):
  """MNIST-family IDX files at a fixed place on this machine (Debian's dataset-fashion-mnist package), read when
  `data.dir` is empty and they are there. `path`: the folder, or a function that returns it (read when used);
  `install`: how to get them, '{path}' standing for the folder (a TFDS reader's "not prepared" message says it)."""
  needs_num_classes = True

  def __init__(self, path, install: str = ''):
    self.path, self.install = path, install

  @property
  def where(self) -> str:
    return self.path() if callable(self.path) else self.path

  def available(self, cfg) -> bool:
    from kdjax.data import files
    return files.holds_idx(self.where)

  def read(self, cfg, entry):
    from kdjax.data import files
    root = os.path.abspath(self.where)
    return files.read_plan(cfg, root, IdxFiles.plan_at(root, entry))

  def hint(self) -> str:
    return self.install.format(path=self.where)

  def source(self, entry):
    return f'the IDX files in {self.where}'


# ------------------------------------------------------------------------------------------- files in data.dir
def _brace(names) -> str:
  """'data_batch_1..5' for data_batch_1, ..., data_batch_5; the names otherwise."""
  names = list(names)
  stem = names[0].rstrip('0123456789')
  if len(names) > 2 and names == [f'{stem}{i}' for i in range(1, len(names) + 1)]:
    return f'{stem}1..{len(names)}'
  return ', '.join(names)


class _TorchvisionFiles(Reader):
  """A torchvision download folder (`folder`) in data.dir."""
  takes_dir = True
  folder = ''

  def needs_dir(self, entry):
    return (f"{entry.name} is read from torchvision's files: set --config.data.dir to the folder that holds "
            f'{self.folder}')


class CifarFiles(_TorchvisionFiles):
  """CIFAR-10/100's Python pickles as torchvision downloads them: `folder` (in data.dir, or data.dir itself) holding
  the `train` and `test` files and the `meta` file of class names. `labels`: data.label_set -> (the labels key, the
  label names key). `named`: the file names say which dataset they are (CIFAR-10's data_batch_N); when not
  (CIFAR-100's train, test, meta) data.dir itself counts only when it holds the meta file too."""
  order = 0

  def __init__(self, folder: str, train: tuple, test: tuple, meta: str, labels: dict, named: bool = True):
    self.folder, self.train, self.test, self.meta, self.labels, self.named = folder, train, test, meta, labels, named

  def source(self, entry):
    return f"{entry.shown}'s python files ({self.folder})"

  def locate(self, root):
    has = lambda where, names: any(os.path.isfile(os.path.join(where, f)) for f in names)
    if has(os.path.join(root, self.folder), self.train + self.test + (self.meta,)):
      return os.path.join(root, self.folder)
    if has(root, self.train + self.test) and (self.named or has(root, (self.meta,))):
      return root
    return None

  def plan(self, cfg, root, where, entry):
    from kdjax.data import files
    paths = files.cifar_files(self, entry.name, where)
    num_classes = len(files.cifar_label_names(self, where, cfg.label_set))
    read = functools.partial(files._read_cifar, self, entry.name, where, cfg.label_set)
    return files.Plan(paths, read, num_classes, {'label_set': cfg.label_set})

  @classmethod
  def looked_for(cls, pairs):
    return [f'{e.shown}: {r.folder}/{{{_brace(r.train)}, {", ".join(r.test + (r.meta,))}}}' for e, r in pairs]


class IdxFiles(_TorchvisionFiles):
  """MNIST-family IDX files (raw or gzipped) as torchvision downloads them: in `folder` under data.dir (its own,
  e.g. 'FashionMNIST/raw'), or in data.dir itself or data.dir/raw. Their class count is the entry's."""
  needs_num_classes, reads_any, order = True, True, 1
  kind = 'MNIST-family IDX'

  def __init__(self, folder: str):
    self.folder = folder

  def source(self, entry):
    return f"{entry.shown}'s IDX files ({self.folder})"

  def locate(self, root):
    from kdjax.data import files
    where = os.path.join(root, self.folder)
    return where if files.holds_idx(where) else None

  @classmethod
  def locate_any(cls, root):
    from kdjax.data import files
    for where in (root, os.path.join(root, 'raw')):
      if files.holds_idx(where):
        return where
    return None

  @staticmethod
  def plan_at(where: str, entry):
    from kdjax.data import files
    return files.Plan(files.idx_files(where), functools.partial(files.read_idx_dir, where, entry.num_classes),
                      entry.num_classes, {})

  def plan(self, cfg, root, where, entry):
    return self.plan_at(where, entry)

  @classmethod
  def looked_for(cls, pairs):
    from kdjax.data import files
    names = ', '.join(f for pair in files.IDX_FILES.values() for f in pair)
    places = ['.', 'raw/'] + [f'{r.folder}/' for _, r in pairs]
    return [f'{", ".join(e.shown for e, _ in pairs)}: {{{names}}}[.gz] in {", ".join(places[:-1])} or {places[-1]}']


class ImageFolder(Reader):
  """A folder of images (kdjax/data/folder.py): MHIST's images/ + annotations.csv, or torchvision's ImageFolder
  (one subfolder of images per class, optionally under train/ and test/). Decoded for the device pipeline; an
  ImageFolder tree is also streamed (its JPEGs decoded by the workers)."""
  takes_dir, streams, reads_any, order = True, True, True, 2
  kind = 'folder'

  def source(self, entry):
    return 'a folder of images'

  @classmethod
  def locate_any(cls, root):
    from kdjax.data import folder
    return root if folder.layout(root) else None

  def plan(self, cfg, root, where, entry):
    from kdjax.data import files, folder
    if cfg.label_set != 'fine':
      own = next((r for r in entry.readers if cfg.label_set in getattr(r, 'labels', {})), None)
      raise ConfigError(f'data.label_set={cfg.label_set!r} needs {own.source(entry) if own else "its own files"}, '
                        f'not the image folder {root}')
    lst = folder.listing(root, cfg.folder)
    read = lambda: [(split, root) for split in folder.read(lst, cfg.folder)]
    counts = (int((~lst.is_test).sum()), int(lst.is_test.sum()))
    options = {k: cfg.folder[k] for k in ('image_size', 'test_fraction', 'seed', 'label_column', 'file_column')}
    return files.Plan(lst.files, read, len(lst.classes), options, counts)

  def needs_dir(self, entry):
    if entry.folder_only:
      return f'data.name={entry.name} needs --config.data.dir (or --config.data.folder.root)'
    return f'{entry.name} is read from a folder of images here: set --config.data.dir to it'

  @classmethod
  def looked_for(cls, pairs):
    from kdjax.data import folder
    return [f'a folder of images: {folder.LAYOUTS}']

  def stream_bytes(self, cfg, root):
    from kdjax.data import folder
    if folder.layout(root) != 'classes':
      return None  # MHIST's CSV layout: the device reader's
    lst = folder.listing(root, cfg.folder)
    size = cfg.folder.image_size or cfg.image_size
    return int((~lst.is_test).sum()) * size * size * 3

  def open_stream(self, cfg, entry, root, size):
    from kdjax.data import folder, stream
    if folder.layout(root) != 'classes':
      raise DatasetNotFoundError(f"data.pipeline='stream' reads ImageFolder trees (root/train/<class>/*.jpg and "
                                 f'root/val|test/<class>/*.jpg), not {root}')
    lst = folder.listing(root, cfg.folder)  # an empty class folder stops here, in one line
    paths, is_test = np.asarray(lst.paths), lst.is_test
    train = stream.Records(stream.FolderSource(paths[~is_test], lst.labels[~is_test]), size, f'{root} train')
    test = stream.Records(stream.FolderSource(paths[is_test], lst.labels[is_test]), size, f'{root} test')
    return train, test, len(lst.classes)
