"""The datasets, one entry each: `DatasetEntry` says everything kdjax knows of a dataset, `register` adds one.

An entry declares where the dataset can be read from (its `readers`, kdjax/data/readers.py, tried in order), how its
pixels are normalised, its default augmentation, the input pipeline that holds it, its splits' names in the source
and its class count where the files do not say it. `kdjax.data.load` (the device pipeline), `kdjax.data.files`
(what a `data.dir` holds), `kdjax.data.stream` (`choose`, `check_config`, `load`) and validate's check of
`data.name` all read `DATASETS`; nothing else names a dataset. The built-in entries are in kdjax/data/__init__.py;
README "Adding a dataset" has a skeleton.
"""

from __future__ import annotations

import dataclasses
import numbers

from kdjax.errors import ConfigError

AUGMENTS = ('crop_flip', 'none')  # what data.augment='auto' may mean on the device pipeline (kdjax/data/device.py)
PIPELINES = ('device', 'stream', 'auto')


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
  """One dataset: `config.data.name = name` reads it.

  readers      where it can be read from, in order (kdjax/data/readers.py): with `data.dir` set, the first reader
               whose files lie there; without, the first reader that needs no `data.dir` and is available.
  stats        ((mean per channel), (std per channel)) of its pixels in [0, 1], as the reference codebases
               normalise; None: the training images' own (on the stream pipeline, which never holds them all:
               torchvision's ImageNet statistics).
  augment      what data.augment='auto' means on the device pipeline: 'crop_flip' (CIFAR's pad-4 crop + flip) or
               'none'. The stream pipeline's is always the random-resized crop + flip.
  pipeline     'device' (the decoded training set on the devices), 'stream' (always streamed from the host) or
               'auto' (either; data.pipeline='auto' streams it when its decoded training images exceed the device
               budget).
  splits       the source's names of its training and test splits (TFDS's imagenet2012: 'validation' is the test
               split).
  num_classes  its class count where the files do not say it (IDX files); None: the reader tells.
  label_sets   the data.label_set values it has -> what they are (CIFAR-100's 'coarse': its 20 superclasses).
  title        how messages name its files ('CIFAR-10'); '' = its name.
  """
  name: str
  readers: tuple
  stats: tuple | None = None
  augment: str = 'none'
  pipeline: str = 'device'
  splits: tuple = ('train', 'test')
  num_classes: int | None = None
  label_sets: dict = dataclasses.field(default_factory=lambda: {'fine': 'its classes'})
  title: str = ''

  @property
  def shown(self) -> str:
    return self.title or self.name

  @property
  def folder_only(self) -> bool:
    """Read from a folder of images only: `data.folder.root` (the older field) may name its `data.dir`."""
    from kdjax.data import readers
    return all(isinstance(r, readers.ImageFolder) for r in self.readers)

  def dir_readers(self) -> list:
    return [r for r in self.readers if r.takes_dir]


# name -> entry, in the order registered (messages list them in this order).
DATASETS: dict[str, DatasetEntry] = {}


def register(entry: DatasetEntry, replace: bool = False) -> DatasetEntry:
  """Adds `entry` to `DATASETS` (`replace`: over an entry of the same name), after checking what it declares."""
  from kdjax.data import readers
  what = f'dataset entry {entry.name!r}'
  if not isinstance(entry.name, str) or not entry.name:
    raise ConfigError(f'a dataset entry needs a name (config.data.name), got {entry.name!r}')
  if entry.name in DATASETS and not replace:
    raise ConfigError(f'{what} is registered already; pass replace=True to replace it')
  if not isinstance(entry.readers, tuple) or not entry.readers or not all(
      isinstance(r, readers.Reader) for r in entry.readers):
    raise ConfigError(f'{what}: readers must be a non-empty tuple of kdjax.data.readers.Reader, got {entry.readers!r}')
  if entry.stats is not None:
    _check_stats(entry.stats, what)
  if entry.augment not in AUGMENTS:
    raise ConfigError(f'{what}: augment must be one of {", ".join(AUGMENTS)}, got {entry.augment!r}')
  if entry.pipeline not in PIPELINES:
    raise ConfigError(f'{what}: pipeline must be one of {", ".join(PIPELINES)}, got {entry.pipeline!r}')
  if entry.pipeline != 'device' and not any(r.streams for r in entry.readers):
    raise ConfigError(f"{what}: pipeline={entry.pipeline!r} needs a reader that streams "
                      f'({", ".join(type(r).__name__ for r in entry.readers)} do not)')
  if entry.num_classes is not None and (not isinstance(entry.num_classes, int) or entry.num_classes < 2):
    raise ConfigError(f'{what}: num_classes must be an integer >= 2 (or None), got {entry.num_classes!r}')
  if any(r.needs_num_classes for r in entry.readers) and entry.num_classes is None:
    raise ConfigError(f'{what}: its IDX files do not say how many classes it has; set num_classes')
  if not isinstance(entry.label_sets, dict) or 'fine' not in entry.label_sets:
    raise ConfigError(f"{what}: label_sets must be a dict holding 'fine' (the default data.label_set), got "
                      f'{entry.label_sets!r}')
  for r in entry.readers:
    missing = [s for s in entry.label_sets if s not in getattr(r, 'labels', entry.label_sets)]
    if missing:
      raise ConfigError(f'{what}: its {type(r).__name__} reader has no labels for the label set(s) '
                        f'{", ".join(missing)} the entry declares')
  if not (isinstance(entry.splits, tuple) and len(entry.splits) == 2 and all(isinstance(s, str) for s in entry.splits)):
    raise ConfigError(f"{what}: splits must be the source's (train, test) split names, got {entry.splits!r}")
  DATASETS[entry.name] = entry
  return entry


def _check_stats(stats, what: str):
  ok = (isinstance(stats, tuple) and len(stats) == 2 and all(isinstance(s, tuple) for s in stats)
        and len(stats[0]) == len(stats[1]) > 0 and all(isinstance(v, numbers.Real) for s in stats for v in s)
        and all(v > 0 for v in stats[1]))
  if not ok:
    raise ConfigError(f'{what}: stats must be ((mean per channel), (std per channel)) with positive stds, or None '
                      f'(the training images\' own), got {stats!r}')


def names() -> tuple[str, ...]:
  """Every registered `data.name`: the choices of config.data.name."""
  return tuple(DATASETS)


def entry(name: str) -> DatasetEntry:
  """The entry of `data.name`, or the one-line refusal of an unknown name."""
  found = DATASETS.get(name)
  if found is None:
    raise ConfigError(f'unknown dataset {name!r}; choose one of {", ".join(DATASETS)}')
  return found


def label_sets() -> tuple[str, ...]:
  """Every data.label_set some entry has, 'fine' first."""
  out = {'fine': None}
  for e in DATASETS.values():
    out.update(dict.fromkeys(e.label_sets))
  return tuple(out)


def check(cfg) -> DatasetEntry:
  """The entry of the `config.data` section `cfg`, once its name and label set are known to fit it (one line)."""
  e = entry(cfg.name)
  label_set = cfg.label_set
  if label_set not in label_sets():
    raise ConfigError(f'data.label_set must be one of {", ".join(label_sets())}, got {label_set!r}')
  if label_set not in e.label_sets:
    owners = [d for d in DATASETS.values() if label_set in d.label_sets]
    its = f' ({owners[0].label_sets[label_set]})' if len(owners) == 1 else ''
    raise ConfigError(f'data.label_set={label_set!r} applies to {" or ".join(d.name for d in owners)} only{its}, '
                      f'not {e.name}')
  return e


def stream_names() -> tuple[str, ...]:
  """The datasets data.pipeline='stream' can read."""
  return tuple(name for name, e in DATASETS.items() if e.pipeline != 'device')


def dir_names() -> tuple[str, ...]:
  """The datasets read from the files in `data.dir`."""
  return tuple(name for name, e in DATASETS.items() if e.dir_readers())
