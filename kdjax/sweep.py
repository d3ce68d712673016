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
import math
import numbers
import pickle
from typing import Any

import ml_collections
import numpy as np

from kdjax import config_lib
from kdjax.errors import ConfigError

# Fields the step reads as numbers, beside the loss weights (`distill.losses.<term>`) and each method's own
# `Method.hparams`.
STEP_NUMBERS = ('seed', 'distill.temperature', 'distill.label_smoothing', 'optimizer.lr', 'optimizer.momentum',
                'optimizer.weight_decay')
# JAX (without x64) reads a seed as 32 bits and so does NumPy's RandomState (scikit-learn's `random_state`, the
# splits' and subsets' seeds): seed 2**32 would silently repeat seed 0.
SEED_LIMIT = 2**32
INT64_LIMIT = 2**63
FLOAT32_MAX = float(np.finfo(np.float32).max)  # the step computes in float32 (or bfloat16, of the same range)
# The most students that `students_loop='unroll'` (the CPU's default) traces into one program, one copy of the step
# each. Its trace and compile time grow faster than the count: the digits test config (cnn_small, batch 64, XLA:CPU
# at its default level, 2 shared cores) took 1.8 s for 1 student, 6.7 s for 8, 30 s for 16, 61 s for 32, 137 s for
# 64 and 670 s for 128. 256 (room for configs/kd_cifar10.py's 45-student grid x 3 seeds) would compile for most of
# an hour; 10,000 would never finish.
MAX_UNROLLED_STUDENTS = 256


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
  if cfg.schedule.name == 'cosine':  # the cosine's length (kdjax/optim.py `traced_cosine`)
    paths.add('schedule.length_epochs')
  for term in cfg.distill.losses:
    paths.add(f'distill.losses.{term}')
    method = distill.METHODS.get(term)
    if method is not None:
      paths.update(f'distill.{h}' for h in method.hparams)
  return paths


def _is_number(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_seed(path: str) -> bool:
  leaf = path.rsplit('.', 1)[-1]
  return leaf == 'seed' or leaf.endswith('_seed')


def check_number(path: str, v):
  """Refuses (ConfigError naming `path`) a number no run can use: NaN, ±inf or a float beyond float32's range (the
  step's), an integer beyond int64 (NumPy's and XLA's), a seed outside 0..2**32-1 (`data.seed`: or -1)."""
  if isinstance(v, bool) or not isinstance(v, numbers.Real):
    return
  if isinstance(v, numbers.Integral):
    if not -INT64_LIMIT <= v < INT64_LIMIT:
      raise ConfigError(f'{path} must fit a 64-bit integer (|value| < 2**63), got {v}')
    if _is_seed(path):
      low = -1 if path.endswith('data.seed') else 0
      if v < low:
        raise ConfigError(f'{path} must be >= {low}, got {v}')
      if v >= SEED_LIMIT:
        raise ConfigError(f'{path} must be < 2**32 = {SEED_LIMIT}, got {v} (JAX and NumPy read seeds as 32-bit '
                          'numbers: a larger seed would repeat a smaller one)')
    return
  if not math.isfinite(v):
    raise ConfigError(f'{path} must be a finite number, got {v}')
  if abs(v) > FLOAT32_MAX:
    raise ConfigError(f'{path} must be a finite number in float32 (the step\'s precision, |value| <= 3.4e38), got '
                      f'{v:g}')


def check_numbers(node, path: str = 'config'):
  """`check_number` on every number of a config, wherever it is: every section, the loss weights, tuples
  (`schedule.decay_epochs`), the teacher's recipe, the extra teachers. Cheap (it runs for every student of a
  sweep): a number that is plainly fine (a float in float32's range, an integer in 0..2**32-1) is passed over,
  and a field's path is written out only for the others."""
  if isinstance(node, ml_collections.ConfigDict):
    node = node.to_dict()  # plain containers: walked several times faster than a ConfigDict's items()
  _walk_numbers(node, [path])


def _walk_numbers(node, keys: list):
  kind = type(node)
  if kind is dict:
    items = node.items()
  elif kind is list or kind is tuple:
    items = enumerate(node)
  elif isinstance(node, (dict, ml_collections.ConfigDict)):  # a ConfigDict inside a list (config.teachers)
    return _walk_numbers(dict(node), keys)
  else:
    return
  for key, value in items:
    kind = type(value)
    if kind is float:
      if -FLOAT32_MAX <= value <= FLOAT32_MAX:  # False for NaN
        continue
    elif kind is int:
      if 0 <= value < SEED_LIMIT:
        continue
    elif kind is str or kind is bool or value is None:
      continue
    elif kind in (dict, list, tuple) or isinstance(value, (dict, list, tuple, ml_collections.ConfigDict)):
      keys.append(key)
      _walk_numbers(value, keys)
      keys.pop()
      continue
    check_number(''.join(k if i == 0 else (f'[{k}]' if isinstance(k, int) else f'.{k}')
                         for i, k in enumerate(keys + [key])), value)


def students_loop(cfg) -> str:
  """How the step runs the students: `config.students_loop`, its 'auto' resolved (unroll on the CPU, where XLA runs
  the batched convolutions of vmap slowly; vmap elsewhere)."""
  loop = cfg.students_loop
  if loop == 'auto':
    import jax  # here: validate.py reads configs without JAX
    loop = 'unroll' if jax.default_backend() == 'cpu' else 'vmap'
  return loop


def check_unroll(cfg, size: int, what: str):
  """Refuses a sweep of more than MAX_UNROLLED_STUDENTS students that the step would unroll (one traced copy of the
  step per student, compiled for longer the more there are), from the count alone: before any config is built."""
  if size > MAX_UNROLLED_STUDENTS and students_loop(cfg) == 'unroll':
    raise ConfigError(f'{what}: {size} students, but at most {MAX_UNROLLED_STUDENTS} are unrolled into one program '
                      "(students_loop='unroll', the CPU's default: one copy of the step per student, compiled for "
                      'longer the more there are); sweep fewer students per run, or set --config.students_loop=vmap '
                      '(one batched step, slower per step on the CPU)')


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
    for v in out[field]:  # 'nan', 'inf' and '1e400' parse as floats
      check_number(f'{what}.{field}', v)
  return out


def _is_numeric_text(text: str) -> bool:
  try:
    float(text)
    return True
  except ValueError:
    return False


def expand(cfg) -> Sweep:
  """The students of `cfg`'s sweep, each with its full config; refuses (one line naming the field) what the
  step cannot vary, a value no run can use (NaN, inf, an out-of-range seed), two students that would train
  identically, and more students than the step unrolls."""
  check_numbers(cfg)  # before any comparison below: NaN equals nothing
  axes = parse(cfg.sweep or '')
  mode = cfg.sweep_mode
  n_seeds = cfg.seeds
  if mode not in ('grid', 'zip'):
    raise ConfigError(f"config.sweep_mode must be 'grid' or 'zip', got {mode!r}")
  if not isinstance(n_seeds, int) or isinstance(n_seeds, bool) or n_seeds < 1:
    raise ConfigError(f'config.seeds must be an integer >= 1, got {n_seeds!r}')
  if n_seeds > 1 and 'seed' in axes:
    raise ConfigError('config.sweep.seed and config.seeds both set the seeds; use one of them')
  if cfg.seed + n_seeds > SEED_LIMIT:
    raise ConfigError(f'config.seeds={n_seeds} from config.seed={cfg.seed} reaches seed {cfg.seed + n_seeds - 1}, '
                      f'past the largest, 2**32 - 1 (JAX and NumPy read seeds as 32-bit numbers)')
  base = copy.deepcopy(cfg)
  schema = config_lib.base()
  allowed = sweepable(base)
  _check_axes(base, axes, mode, allowed, schema)

  # Everyone shares the data order and augmentation of the base config's seed.
  if base.data.seed < 0:
    with base.unlocked():
      base.data.seed = base.seed
  # A swept `seed` is the seed axis: grid points x seeds, the seeds innermost.
  swept_seed = 'seed' in axes
  seeds = axes.pop('seed') if swept_seed else [base.seed + i for i in range(n_seeds)]
  if mode == 'zip' and axes and swept_seed:
    raise ConfigError("config.sweep_mode='zip' with a swept seed: use config.seeds for the seed axis")
  n_points = (len(next(iter(axes.values()))) if mode == 'zip' else math.prod(map(len, axes.values()))) if axes else 1
  # Counted before anything is built: a sweep of 100,000 students is refused at once, not after its configs.
  what = ' with '.join((['config.sweep'] if axes or swept_seed else []) +
                       ([f'config.seeds={n_seeds}'] if n_seeds > 1 else []))
  check_unroll(base, n_points * len(seeds), what)
  points = (list(zip(*axes.values())) if mode == 'zip' else list(itertools.product(*axes.values()))) if axes \
      else [()]
  students, flats = _students(base, axes, points, seeds)
  traced = _traced(flats, points, seeds, axes, allowed, schema)
  _check_distinct(students, traced)
  return Sweep(axes=axes, mode=mode, seeds=list(seeds), students=students, traced=traced,
               labels=parse(cfg.sweep_labels or '', 'config.sweep_labels', numbers=False))


def _check_axes(base, axes: dict, mode: str, allowed: set, schema):
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
    for v in values:
      check_number(f'config.sweep.{path}', v)
    if path == 'seed' and any(not isinstance(v, int) for v in values):
      raise ConfigError(f'config.sweep.seed: seeds must be integers, got {values}')
    repeated = next((v for i, v in enumerate(values) if v in values[:i]), None)
    if repeated is not None and (mode == 'grid' or path == 'seed'):  # a zip's axis may repeat beside another's
      raise ConfigError(f'config.sweep.{path}: the value {_fmt(repeated)} is given twice, which would train '
                        'identical students; give each value once')
    is_alias = '.' not in path and path not in schema
    if path not in allowed and not is_alias:
      if isinstance(current, ml_collections.ConfigDict) or not _is_number(current):
        raise ConfigError(f'config.sweep: {path!r} is not a number and cannot be swept')
      raise ConfigError(f'config.sweep: {path!r} changes shapes or code and cannot be swept (one program serves '
                        f'the sweep); sweepable here: {", ".join(sorted(allowed))}')
  if mode == 'zip' and len({len(v) for v in axes.values()}) > 1:
    lengths = ', '.join(f'{k}: {len(v)}' for k, v in axes.items())
    raise ConfigError(f"config.sweep_mode='zip' needs axes of one length, got {lengths}")


def _students(base, axes: dict, points: list, seeds: list) -> tuple[list, list]:
  """The students (grid points x seeds, the seeds innermost) and each grid point's flattened config. A point's
  config is copied per seed through pickle, which keeps its FieldReferences (aliases) and is several times faster
  than `copy.deepcopy` of a ConfigDict (100,000 students: minutes otherwise)."""
  students, flats = [], []
  for point in points:
    values = dict(zip(axes, point))
    c = copy.deepcopy(base)
    for path, v in values.items():
      _set(c, path, v)
    flats.append(flatten(c.to_dict()))
    try:
      frozen = pickle.dumps(c)
    except (pickle.PicklingError, TypeError, AttributeError):  # a value pickle cannot copy (a local function, ...)
      frozen = None
    for seed in seeds:
      s = pickle.loads(frozen) if frozen is not None else copy.deepcopy(c)
      s.seed = seed
      name = ' '.join([f'{k}={_fmt(v)}' for k, v in values.items()] +
                      ([f'seed={seed}'] if len(seeds) > 1 else [])) or 'run'
      students.append(Student(len(students), name, values, seed, s))
  return students, flats


def _traced(flats: list, points: list, seeds: list, axes: dict, allowed: set, schema) -> dict:
  """config path -> [S] array of the step-read numbers that differ between students (grid points x seeds)."""
  traced = {}
  for path in flats[0]:
    if path == 'seed':  # the seed axis, innermost
      if len(set(seeds)) > 1:
        traced['seed'] = np.asarray([seed for _ in points for seed in seeds], np.int64)
      continue
    column = [f[path] for f in flats]
    if all(v == column[0] for v in column[1:]):
      continue
    if path in allowed:
      traced[path] = np.repeat(np.asarray(column, np.float32), len(seeds))
    elif not ('.' not in path and path not in schema):  # an alias's own value is read by nothing
      raise ConfigError(f'config.sweep: sweeping {", ".join(axes)} changes {path!r}, which changes shapes or code '
                        'and cannot be swept')
  return traced


def _check_distinct(students: list, traced: dict):
  """Two students that read the same value of every swept number would train identically: refused, naming them."""
  if len(students) < 2:
    return
  rows = list(zip(*(column.tolist() for column in traced.values()))) if traced else [()] * len(students)
  first = {}
  for i, row in enumerate(rows):
    j = first.setdefault(row, i)
    if j != i:
      a, b = students[j], students[i]
      same = a.name if a.name != 'run' else 'the same config'
      raise ConfigError(f'config.sweep: students {j} and {i} are the same ({same}) and would train identically; '
                        'give each value once')


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
