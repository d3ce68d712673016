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

Two axes change the program, not just numbers (a paper's table in one program): `method=kd,dkd,crd` (each value a
method's reference recipe for the pair: `distill.method_config`) and `student.model=resnet8x4,ShuffleV1` (its
`student.kwargs` reset to the model's defaults). Their combinations (by `sweep_mode`, among themselves) are the
program's groups; each group is a sweep of the numeric axes and seeds as above (combined by `sweep_mode` among
themselves, and every group gets all of them). `sweep_overrides` sets fields per group ('student.model=ShuffleV1:
optimizer.lr=0.01'). The students of a group are stacked and vmapped or unrolled as in any sweep; the groups are
unrolled in one program and share the batch and the teachers' forward pass (kdjax/trainer.py).
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
# The sweep axes that change the program (the students' code or shapes): one group of students per combination.
PROGRAM_AXES = ('method', 'student.model')
# Top-level config fields (and sections) that may differ between the groups of one program; every other field is
# shared (the data, the batch, the teachers, the evaluation and checkpoint schedule).
GROUP_FIELDS = ('student', 'distill', 'optimizer', 'schedule', 'epochs', 'sweep', 'sweep_overrides', 'alpha',
                'label_alpha', 'seed')


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
  groups: list = dataclasses.field(default_factory=list)  # `Group`s of a sweep with program axes; [] otherwise
  skipped: list = dataclasses.field(default_factory=list)  # (program values, why) left out as inapplicable

  @property
  def size(self) -> int:
    return len(self.students)

  @property
  def base(self) -> ml_collections.ConfigDict:
    """The config every shared field is read from (the first student's; with groups, the longest group's
    `epochs`)."""
    if self.groups:
      return self.groups[0].shared
    return self.students[0].cfg

  def parts(self) -> list:
    """The program's groups: `groups`, or this sweep as the one group of a sweep without program axes."""
    return self.groups or [Group(0, {}, 'run', self, 0)]

  def to_json(self) -> dict:
    out = {'axes': self.axes, 'mode': self.mode, 'seeds': self.seeds, 'labels': self.labels,
           'students': [{'index': s.index, 'name': s.name, 'values': s.values, 'seed': s.seed}
                        for s in self.students]}
    if self.groups:
      out['groups'] = [{'index': g.index, 'values': g.values, 'name': g.name, 'students': g.sweep.size,
                        'offset': g.offset, 'epochs': g.sweep.base.epochs} for g in self.groups]
    if self.skipped:
      out['skipped'] = [{'values': v, 'why': why} for v, why in self.skipped]
    return out


@dataclasses.dataclass
class Group:
  """The students of one program point (a method and a student architecture): a sweep of their own, whose students
  are numbered from `offset` in the whole program."""
  index: int
  values: dict          # program axis -> value ({'method': 'dkd', 'student.model': 'resnet8x4'})
  name: str
  sweep: Sweep
  offset: int
  shared: Any = None    # the program's shared config (the first group's, with the longest `epochs`)

  @property
  def size(self) -> int:
    return self.sweep.size


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


def _items(spec: str) -> list:
  """The non-empty ';'-separated items of a sweep string, stripped."""
  return [i for i in (t.strip() for t in spec.split(';')) if i]


def parse(spec: str, what: str = 'config.sweep', numbers: bool = True) -> dict:
  """'field=v1,v2; field2=v3' -> {'field': [v1, v2], 'field2': [v3]} (numbers), in order."""
  if not isinstance(spec, str):
    raise ConfigError(f"{what} must be a string like 'alpha=0.1,0.9; distill.temperature=1,4', got {spec!r}")
  out = {}
  for item in _items(spec):
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
  identically, and more students than the step unrolls. With program axes (`method=`, `student.model=`), one
  group of such students per program point (`Sweep.groups`)."""
  check_numbers(cfg)
  program, numeric = split_program_axes(cfg.sweep or '')
  if not program:
    if (cfg.sweep_overrides or '').strip():
      raise ConfigError('config.sweep_overrides sets fields per method or student model, but config.sweep has no '
                        f'{" or ".join(a + "=" for a in PROGRAM_AXES)} axis')
    return _expand(cfg)
  return _expand_program(cfg, program, numeric)


def split_program_axes(spec: str) -> tuple[dict, str]:
  """({program axis: [names]}, the rest of the sweep string) from `config.sweep`."""
  if not isinstance(spec, str):
    return {}, spec
  program, rest = {}, []
  for field, values in parse(spec, numbers=False).items():
    if field not in PROGRAM_AXES:
      rest.append(f'{field}={values}')
      continue
    program[field] = [v.strip() for v in values.split(',') if v.strip()]
    if not program[field]:
      raise ConfigError(f'config.sweep.{field} is empty: give at least one name')
  return program, '; '.join(rest)


def parse_overrides(spec: str, program: dict) -> list:
  """`config.sweep_overrides` 'AXIS=VALUE: field=literal, field=literal; ...' -> [(axis, value, {field: value})]."""
  import ast
  out = []
  for item in _items(spec or ''):
    head, colon, body = item.partition(':')
    axis, eq, value = (t.strip() for t in head.partition('='))
    if not colon or not eq or axis not in PROGRAM_AXES:
      raise ConfigError(f"config.sweep_overrides: {item!r} is not 'AXIS=VALUE: field=value, ...' with AXIS one of "
                        f'{", ".join(PROGRAM_AXES)}')
    if value not in program.get(axis, ()):
      raise ConfigError(f'config.sweep_overrides: {axis}={value} is not a value of the sweep\'s {axis} axis '
                        f'({", ".join(program.get(axis, ())) or "none"})')
    settings = {}
    for setting in filter(None, (t.strip() for t in body.split(','))):
      field, eq, literal = (t.strip() for t in setting.partition('='))
      if not eq or not field:
        raise ConfigError(f'config.sweep_overrides: {setting!r} (for {axis}={value}) is not field=value')
      try:
        settings[field] = ast.literal_eval(literal)
      except (ValueError, SyntaxError):
        raise ConfigError(f'config.sweep_overrides: {field}={literal} (for {axis}={value}) is not a Python '
                          'literal (a number, a string in quotes, a tuple)') from None
    out.append((axis, value, settings))
  return out


def _program_config(cfg, values: dict, overrides: list, numeric: str):
  """One program point's config: the base with its student model and its method's reference recipe."""
  from kdjax import distill
  from kdjax import models
  c = copy.deepcopy(cfg)
  c.sweep, c.sweep_overrides = numeric, ''
  if 'student.model' in values:
    name = values['student.model']
    if name not in models.names():
      raise ConfigError(f'config.sweep.student.model: unknown model {name!r}; registered models: '
                        f'{", ".join(models.names())}')
    c.student.model = name
    c.student.kwargs = {}
  if 'method' in values:
    try:
      distill.method_config(c, values['method'])
    except ConfigError as e:
      raise ConfigError(f'config.sweep.method: {e}') from None
  for axis, value, settings in overrides:
    if values.get(axis) != value:
      continue
    for path, v in settings.items():
      try:
        get(c, path)
      except KeyError:
        raise ConfigError(f'config.sweep_overrides: no such config field {path!r} (for {axis}={value})') from None
      if path.split('.')[0] not in GROUP_FIELDS:
        raise ConfigError(f'config.sweep_overrides: {path} is shared by every group of the program and cannot be '
                          f'set for {axis}={value}')
      _set(c, path, v)
  return c


def _expand_program(cfg, program: dict, numeric: str) -> Sweep:
  mode = cfg.sweep_mode
  if mode not in ('grid', 'zip'):
    raise ConfigError(f"config.sweep_mode must be 'grid' or 'zip', got {mode!r}")
  if mode == 'zip' and len({len(v) for v in program.values()}) > 1:
    lengths = ', '.join(f'{k}: {len(v)}' for k, v in program.items())
    raise ConfigError(f"config.sweep_mode='zip' needs axes of one length, got {lengths}")
  for field, names in program.items():  # a zip's axis may repeat a name beside another axis's
    repeated = next((v for i, v in enumerate(names) if v in names[:i]), None)
    if repeated is not None and (mode == 'grid' or len(program) == 1):
      raise ConfigError(f'config.sweep.{field}: {repeated!r} is given twice, which would train identical '
                        'students; give each once')
  points = list(zip(*program.values())) if mode == 'zip' else list(itertools.product(*program.values()))
  repeated = next((p for i, p in enumerate(points) if p in points[:i]), None)
  if repeated is not None:
    raise ConfigError(f'config.sweep: the point {" ".join(f"{k}={v}" for k, v in zip(program, repeated))} is '
                      'given twice, which would train identical students; give each once')
  overrides = parse_overrides(cfg.sweep_overrides, program)
  if cfg.teacher.model and 'epochs' not in cfg.teacher.recipe:
    # Every group's teacher trains the base's length (a staged method's run is longer): said explicitly, the same
    # teacher (and cache entry) as without it.
    cfg = copy.deepcopy(cfg)
    cfg.teacher.recipe = {**cfg.teacher.recipe.to_dict(), 'epochs': cfg.epochs}
  configs = [(values, _program_config(cfg, values, overrides, numeric))
             for values in (dict(zip(program, point)) for point in points)]
  _check_numeric_axes(configs, numeric)
  groups, total = [], 0
  for values, c in configs:
    sub = _expand(c)
    total += sub.size
    name = ' '.join(f'{k.split(".")[-1] if k == "student.model" else k}={v}' for k, v in values.items())
    groups.append(Group(len(groups), values, name, sub, 0))
  check_unroll(cfg, total, f'config.sweep ({len(groups)} groups)')
  return assemble(groups, program, mode)


def _check_numeric_axes(configs: list, numeric: str):
  """A numeric axis applies to every group: one that some group's methods do not read is refused, naming them."""
  axes = parse(numeric) if numeric else {}
  readable = [sweepable(c) for _, c in configs]
  from kdjax import distill
  for path in axes:
    parts = path.split('.')
    if len(parts) != 3 or parts[0] != 'distill' or parts[1] not in distill.SECTIONS:
      continue
    missing = [values for (values, _), ok in zip(configs, readable) if path not in ok]
    if missing and len(missing) < len(configs):
      where = ' '.join(f'{k}={v}' for k, v in missing[0].items())
      raise ConfigError(f'config.sweep: {path} is an option that the group {where} does not read (its method has '
                        'no such option); a numeric axis applies to every group: sweep it in a program of the '
                        'methods that read it')


def assemble(groups: list, program: dict, mode: str, skipped: list = ()) -> Sweep:
  """The whole program's sweep from its groups: the students numbered across groups, named and valued by their
  program point too; the shared config checked equal across groups."""
  if not groups:
    raise ConfigError('config.sweep: no group of students is left to train')
  students, offset = [], 0
  first = groups[0].sweep
  for i, g in enumerate(groups):
    g.index, g.offset = i, offset
    local0 = g.sweep.students[0].index  # read once: the loop renumbers the first student too
    for s in g.sweep.students:
      s.index = offset + s.index - local0
      s.values = {**g.values, **{k: v for k, v in s.values.items() if k not in g.values}}
      s.name = g.name if s.name == 'run' else f'{g.name} {s.name}'
      students.append(s)
    offset += g.sweep.size
  shared = copy.deepcopy(groups[0].sweep.base)
  shared.epochs = max(g.sweep.base.epochs for g in groups)
  _check_shared(groups)
  for g in groups:
    g.shared = shared
  # A zip's program axis may repeat a name (`method=ce,deit_hard; student.model=vit,vit`): each listed once.
  axes = {**{k: list(dict.fromkeys(v)) for k, v in program.items()}, **first.axes}
  return Sweep(axes=axes, mode=mode, seeds=first.seeds, students=students, traced={}, labels=first.labels,
               groups=list(groups), skipped=list(skipped))


def without(sweep: Sweep, drop: dict) -> Sweep:
  """`sweep` without the groups `drop` ({group index: why}), renumbered."""
  keep = _local([g for g in sweep.groups if g.index not in drop])
  skipped = list(sweep.skipped) + [(g.values, drop[g.index]) for g in sweep.groups if g.index in drop]
  program = {k: v for k, v in sweep.axes.items() if k in PROGRAM_AXES}
  return assemble(keep, program, sweep.mode, skipped)


def subset(sweep: Sweep, names: list) -> Sweep:
  """A program of `sweep`'s groups named `names` alone (copies: `sweep` is left as it is), numbered from 0 in
  `sweep`'s order; each student trains as in `sweep` (its own config, seed and keys)."""
  unknown = set(names) - {g.name for g in sweep.groups}
  if unknown:
    raise ConfigError(f'config.sweep: no group {sorted(unknown)[0]} in this table')
  keep = _local([copy.deepcopy(g) for g in sweep.groups if g.name in names])
  program = {k: [v for v in values if any(g.values.get(k) == v for g in keep)]
             for k, values in sweep.axes.items() if k in PROGRAM_AXES}
  return assemble(keep, program, sweep.mode)


def _local(groups: list) -> list:
  """`groups` with their students back to group-local numbering and names (as `assemble` takes them)."""
  for g in groups:
    for j, s in enumerate(g.sweep.students):
      s.index = j
      s.name = s.name[len(g.name) + 1:] if s.name.startswith(g.name + ' ') else ('run' if s.name == g.name
                                                                                    else s.name)
  return groups


def _check_shared(groups: list):
  """Every field outside GROUP_FIELDS is the program's: the same in every group, or refused naming it."""
  from kdjax import teacher as teacher_lib
  # A teacher trained first is the one its recipe (over the run's own fields) trains: compared resolved.
  teacher_run = lambda c: teacher_lib.cache_dir(c, c.data.name) if c.teacher.model and not c.teacher.checkpoint \
      else None
  base = groups[0].sweep.base
  first = flatten(base.to_dict())
  for g in groups[1:]:
    other = flatten(g.sweep.base.to_dict())
    if teacher_run(base) != teacher_run(g.sweep.base):
      raise ConfigError(f'config.sweep: {groups[0].name} and {g.name} would train different teachers first (the '
                        'teacher inherits the run\'s optimizer and schedule unless teacher.recipe sets them); set '
                        'teacher.recipe, or give teacher.checkpoint')
    for path in sorted(set(first) | set(other)):
      if (path.split('.')[0] in GROUP_FIELDS or path.startswith('teacher.recipe') or
          first.get(path) == other.get(path)):
        continue
      raise ConfigError(f'config.sweep: {groups[0].name} and {g.name} differ in {path} ({first.get(path)!r} vs '
                        f'{other.get(path)!r}), which every group of one program shares (the data, the batch, the '
                        'teachers); run them as separate programs')


def _expand(cfg) -> Sweep:
  """The students of a sweep without program axes."""
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
