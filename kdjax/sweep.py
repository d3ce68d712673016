"""Sweeps: a config's `sweep` axes and `seeds` expanded into the students of one program.

`config.sweep = 'alpha=0.1,0.9; distill.temperature=1,4'` (a string, so that it is also a command-line override:
`--config.sweep='optimizer.lr=0.01,0.05'`) combines its axes as a grid (`config.sweep_mode = 'grid'`) or
element-wise (`'zip'`); `config.seeds = N` adds an axis of N seeds
(`seed`, `seed + 1`, ...). Every student shares the data order and augmentation (drawn from `data.seed`, which
defaults to the base config's `seed`), the batch and the teacher pass; each has its own parameters, optimizer and
batch statistics, initialisation and dropout (from its own `seed`), and its own values of the swept fields.

A field can be swept when the train step reads it as a number: those values enter the step as arrays with a
leading students axis (`Sweep.traced`), so one compilation serves the whole sweep. A field that changes shapes or
code cannot. Convenience fields that exist only in one config file (e.g. `alpha`, tied to the loss weights by
`config_lib.alpha_losses`) can be swept when everything they change is sweepable.

A single run is the sweep of one student.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import numbers
from typing import Any

import ml_collections
import numpy as np

from kdjax import config_lib
from kdjax.errors import ConfigError

# Fields the step reads as numbers, beside the loss weights (`distill.losses.<term>`) and each method's own
# `Method.hparams`.
STEP_NUMBERS = ('seed', 'distill.temperature', 'distill.label_smoothing', 'optimizer.lr', 'optimizer.momentum',
                'optimizer.weight_decay')


@dataclasses.dataclass
class Student:
  index: int
  name: str
  values: dict          # swept field -> value (the seed axis excluded)
  seed: int
  cfg: ml_collections.ConfigDict  # the full config this student trains with, as a single run would


@dataclasses.dataclass
class Sweep:
  axes: dict            # swept field -> list of values, in config order
  mode: str             # 'grid' | 'zip'
  seeds: list           # the seed axis' values ([cfg.seed] without one)
  students: list
  traced: dict          # config path -> np.ndarray [S]: the step-read numbers that differ between students
  labels: dict = dataclasses.field(default_factory=dict)

  @property
  def size(self) -> int:
    return len(self.students)

  @property
  def base(self) -> ml_collections.ConfigDict:
    """The config every non-swept field is read from (the first student's)."""
    return self.students[0].cfg

  def to_json(self) -> dict:
    return {'axes': self.axes, 'mode': self.mode, 'seeds': self.seeds, 'labels': self.labels,
            'students': [{'index': s.index, 'name': s.name, 'values': s.values, 'seed': s.seed}
                         for s in self.students]}


def sweepable(cfg) -> set:
  """The config paths a sweep may vary in `cfg`: the numbers the step reads."""
  from kdjax import distill
  distill.load_methods()
  paths = set(STEP_NUMBERS)
  if cfg.optimizer.name == 'dot':
    paths.add('optimizer.dot_delta')
  for term in cfg.distill.losses:
    paths.add(f'distill.losses.{term}')
    method = distill.METHODS.get(term)
    if method is not None:
      paths.update(f'distill.{h}' for h in method.hparams)
  return paths


def _is_number(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _fmt(v) -> str:
  return f'{v:g}' if isinstance(v, float) else str(v)


def flatten(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v:
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _set(cfg, path: str, value):
  *parents, leaf = path.split('.')
  node = cfg
  for p in parents:
    node = node[p]
  try:
    node[leaf] = value
  except TypeError as e:
    raise ConfigError(f'config.sweep.{path}: value {value!r} has the wrong type for this field '
                      f'({type(node[leaf]).__name__})') from e


def get(cfg, path: str):
  """The value at dotted `path` in a config; KeyError when there is none."""
  node = cfg
  for p in path.split('.'):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or p not in node:
      raise KeyError(path)
    node = node[p]
  return node


def _number(text: str):
  try:
    return int(text)
  except ValueError:
    return float(text)


def parse(spec: str, what: str = 'config.sweep', numbers: bool = True) -> dict:
  """'field=v1,v2; field2=v3' -> {'field': [v1, v2], 'field2': [v3]} (numbers), in order."""
  if not isinstance(spec, str):
    raise ConfigError(f"{what} must be a string like 'alpha=0.1,0.9; distill.temperature=1,4', got {spec!r}")
  out = {}
  for item in filter(None, (i.strip() for i in spec.split(';'))):
    field, eq, values = item.partition('=')
    field = field.strip()
    if not eq or not field:
      raise ConfigError(f"{what}: {item!r} is not 'field=value,value,...'")
    if field in out:
      raise ConfigError(f'{what}: {field!r} is given twice')
    if not numbers:
      out[field] = values.strip()
      continue
    items = [v.strip() for v in values.split(',') if v.strip()]
    if not items:
      raise ConfigError(f'{what}.{field} is empty: give at least one value')
    try:
      out[field] = [_number(v) for v in items]
    except ValueError:
      bad = next(v for v in items if not _is_numeric_text(v))
      raise ConfigError(f'{what}.{field}: values must be numbers, got {bad!r}') from None
  return out


def _is_numeric_text(text: str) -> bool:
  try:
    float(text)
    return True
  except ValueError:
    return False


def expand(cfg) -> Sweep:
  """The students of `cfg`'s sweep, each with its full config; refuses (one line naming the field) what the
  step cannot vary."""
  axes = parse(cfg.sweep or '')
  mode = cfg.sweep_mode
  n_seeds = cfg.seeds
  if mode not in ('grid', 'zip'):
    raise ConfigError(f"config.sweep_mode must be 'grid' or 'zip', got {mode!r}")
  if not isinstance(n_seeds, int) or isinstance(n_seeds, bool) or n_seeds < 1:
    raise ConfigError(f'config.seeds must be an integer >= 1, got {n_seeds!r}')
  if n_seeds > 1 and 'seed' in axes:
    raise ConfigError('config.sweep.seed and config.seeds both set the seeds; use one of them')
  base = copy.deepcopy(cfg)
  schema = config_lib.base()
  allowed = sweepable(base)
  for path, values in axes.items():
    try:
      current = get(base, path)
    except KeyError:
      raise ConfigError(f'config.sweep: no such config field {path!r}') from None
    if not isinstance(values, list):
      raise ConfigError(f'config.sweep.{path} must be a list of values, got {values!r}')
    if not values:
      raise ConfigError(f'config.sweep.{path} is empty: give at least one value')
    bad = [v for v in values if not _is_number(v)]
    if bad:
      raise ConfigError(f'config.sweep.{path}: values must be numbers, got {bad[0]!r}')
    if path == 'seed' and any(not isinstance(v, int) for v in values):
      raise ConfigError(f'config.sweep.seed: seeds must be integers, got {values}')
    is_alias = '.' not in path and path not in schema
    if path not in allowed and not is_alias:
      if isinstance(current, ml_collections.ConfigDict) or not _is_number(current):
        raise ConfigError(f'config.sweep: {path!r} is not a number and cannot be swept')
      raise ConfigError(f'config.sweep: {path!r} changes shapes or code and cannot be swept (one program serves '
                        f'the sweep); sweepable here: {", ".join(sorted(allowed))}')
  if mode == 'zip' and len({len(v) for v in axes.values()}) > 1:
    lengths = ', '.join(f'{k}: {len(v)}' for k, v in axes.items())
    raise ConfigError(f"config.sweep_mode='zip' needs axes of one length, got {lengths}")

  # Everyone shares the data order and augmentation of the base config's seed.
  if base.data.seed < 0:
    with base.unlocked():
      base.data.seed = base.seed
  # A swept `seed` is the seed axis: grid points x seeds, the seeds innermost.
  swept_seed = 'seed' in axes
  seeds = axes.pop('seed') if swept_seed else [base.seed + i for i in range(n_seeds)]
  if mode == 'zip' and axes and swept_seed:
    raise ConfigError("config.sweep_mode='zip' with a swept seed: use config.seeds for the seed axis")
  points = (list(zip(*axes.values())) if mode == 'zip' else list(itertools.product(*axes.values()))) if axes \
      else [()]
  students = []
  for point in points:
    for seed in seeds:
      c = copy.deepcopy(base)
      values = dict(zip(axes, point))
      for path, v in values.items():
        _set(c, path, v)
      c.seed = seed
      name = ' '.join([f'{k}={_fmt(v)}' for k, v in values.items()] +
                      ([f'seed={seed}'] if len(seeds) > 1 else [])) or 'run'
      students.append(Student(len(students), name, values, seed, c))

  flats = [flatten(s.cfg.to_dict()) for s in students]
  traced = {}
  for path in flats[0]:
    column = [f[path] for f in flats]
    if all(v == column[0] for v in column[1:]):
      continue
    if path in allowed:
      traced[path] = np.asarray(column, np.int64 if path == 'seed' else np.float32)
    elif not ('.' not in path and path not in schema):  # an alias's own value is read by nothing
      raise ConfigError(f'config.sweep: sweeping {", ".join(axes)} changes {path!r}, which changes shapes or code '
                        'and cannot be swept')
  return Sweep(axes=axes, mode=mode, seeds=list(seeds), students=students, traced=traced,
               labels=parse(cfg.sweep_labels or '', 'config.sweep_labels', numbers=False))


class View:
  """A read-only view of a config in which some leaves (by dotted path) read as other values: one student's
  traced hyperparameters inside the vmapped step. Reads like a ConfigDict: attributes, `[key]` and `.get`."""

  def __init__(self, cfg, overrides: dict, prefix: str = ''):
    object.__setattr__(self, '_cfg', cfg)
    object.__setattr__(self, '_overrides', overrides)
    object.__setattr__(self, '_prefix', prefix)

  def _read(self, key):
    path = self._prefix + key
    if path in self._overrides:
      return self._overrides[path]
    value = self._cfg[key]
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      return View(value, self._overrides, path + '.')
    return value

  def __getattr__(self, key):
    try:
      return self._read(key)
    except KeyError:
      raise AttributeError(key) from None

  def __getitem__(self, key):
    return self._read(key)

  def get(self, key, default=None):
    return self._read(key) if key in self._cfg else default

  def __contains__(self, key):
    return key in self._cfg

  def __iter__(self):
    return iter(self._cfg)

  def keys(self):
    return self._cfg.keys()

  def items(self):
    return [(k, self._read(k)) for k in self._cfg.keys()]

  def __setattr__(self, key, value):
    raise AttributeError('a config View is read-only')


def view(cfg, traced: dict[str, Any]) -> View:
  return View(cfg, traced)
