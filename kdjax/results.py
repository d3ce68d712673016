"""Results of a run or a sweep, read back from the files in its workdir: results.csv, the console table, figures.

Everything here works from `sweep.json`, `metrics.jsonl` and `summary.json` alone (no JAX, no checkpoints), so a
finished, unfinished or older workdir can be redrawn at any time (`python -m kdjax.tools.report WORKDIR`).

Per-student numbers are computed from the metrics history rather than taken from summary.json: the history is
complete for unfinished and resumed runs too, and it gives every epoch, which `best_test_accuracy` (the number
RepDistiller reports) needs. summary.json supplies only the model-selection split and the wall time.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections.abc import Sequence

import numpy as np

from kdjax import atomic
from kdjax.errors import ConfigError

SPLITS = ('train', 'val', 'test')
# A swept field whose name equals one of these columns gets a prefix in the rows, so it cannot overwrite a metric.
# The last value of each of these, where a run has it, is a column `last_<key>` of results.csv and of the tables
# (header, whether it is a fraction shown in %): the agreement with the teacher, the accuracy of each head of a
# student with a distillation token.
_LAST_METRICS = {'test_agreement': ('agreement', True), 'test_top5_agreement': ('top-5 agreement', True),
                 'test_teacher_kl': ('KL to teacher', False), 'test_cls_head_accuracy': ('cls head acc', True),
                 'test_dist_head_accuracy': ('dist head acc', True)}
_ROW_COLUMNS = ('index', 'name', 'seed', 'best_epoch', 'epochs', 'test_accuracy_at_best', 'best_test_accuracy',
                'last_test_accuracy') + tuple(f'last_{k}' for k in _LAST_METRICS)
_MAX_CURVES_WITH_LEGEND = 10


@dataclasses.dataclass
class Run:
  """What a workdir holds. `history`: one record per (epoch, student), the last written wins, sorted that way."""
  workdir: str
  axes: dict[str, list]
  mode: str
  seeds: list
  labels: dict[str, str]
  students: list[dict]
  history: list[dict]
  select_split: str
  wall_seconds: float | None
  models: dict = dataclasses.field(default_factory=dict)  # {'teacher': ..., 'student': ..., 'dataset': ...}
  skipped: list = dataclasses.field(default_factory=list)  # program points left out as inapplicable

  @property
  def has_val(self) -> bool:
    return any('val_accuracy' in r for r in self.history)

  @property
  def last_metrics(self) -> list[str]:
    """The keys of `_LAST_METRICS` that some record of this run has."""
    return [k for k in _LAST_METRICS if any(k in r for r in self.history)]

  def label(self, field: str) -> str:
    return self.labels.get(field) or field


def _read_text(path: str) -> str:
  try:
    with open(path, encoding='utf-8') as f:
      return f.read()
  except UnicodeDecodeError as e:
    raise ConfigError(f'{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start:,})') from None
  except OSError as e:
    raise ConfigError(f'cannot read {path}: {e.strerror or e}') from None


def _read_json(path: str):
  try:
    return json.loads(_read_text(path))
  except json.JSONDecodeError as e:
    raise ConfigError(f'{path} is not valid JSON ({e})') from None


def _read_history(path: str) -> list[dict]:
  lines = [l for l in _read_text(path).splitlines() if l.strip()]
  latest = {}
  for n, line in enumerate(lines):
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      if n == len(lines) - 1:
        break  # a line cut short by a crash mid-write: the epochs before it are intact
      raise ConfigError(f'{path}:{n + 1} is not valid JSON ({e})') from None
    if not isinstance(record, dict) or 'epoch' not in record:
      continue  # the {"summary": ...} line, or anything else that is not an epoch record
    try:
      record = dict(record, student=_count(record.get('student', 0)), epoch=_count(record['epoch']))
    except ValueError:
      raise ConfigError(f'{path}:{n + 1} is not an epoch record: epoch {record["epoch"]!r}, student '
                        f'{record.get("student", 0)!r} (whole numbers >= 0 expected)') from None
    bad = [k for k, v in record.items() if k.endswith(_NUMERIC_SUFFIXES) and v is not None and not _number(v)]
    if bad:
      raise ConfigError(f'{path}:{n + 1}: {bad[0]} is {record[bad[0]]!r}, not a number')
    latest[(record['epoch'], record['student'])] = record  # after a resume an epoch comes again: the last wins
  return [latest[k] for k in sorted(latest)]


_NUMERIC_SUFFIXES = ('accuracy', 'agreement', 'loss', '_kl')


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _count(value) -> int:
  """A whole number >= 0 (an epoch, a student index) from JSON (3, 3.0 or '3'), or ValueError."""
  try:
    n = int(value)
  except (TypeError, ValueError, OverflowError):
    raise ValueError(value) from None
  if isinstance(value, bool) or n < 0 or (isinstance(value, float) and value != n):
    raise ValueError(value)
  return n


def _sweep_fields(sweep, path: str) -> tuple:
  """(axes, students, mode, labels, seeds) of sweep.json, each of the type the results need, or one line."""
  fields = {'axes': dict, 'students': list, 'mode': str, 'labels': dict, 'seeds': list}
  for key, kind in fields.items():
    value = sweep.get(key)
    if value is not None and not isinstance(value, kind):
      raise ConfigError(f'{path}: {key!r} holds a {type(value).__name__}, not a {kind.__name__}')
  for field, values in (sweep.get('axes') or {}).items():
    if not isinstance(values, list):
      raise ConfigError(f'{path}: the axis {field!r} holds a {type(values).__name__}, not a list of values')
  for i, student in enumerate(sweep.get('students') or []):
    if not isinstance(student, dict) or not isinstance(student.get('values') or {}, dict):
      raise ConfigError(f'{path}: student {i} is not an object with a "values" object')
    if 'index' in student and (isinstance(student['index'], bool) or not isinstance(student['index'], int)):
      raise ConfigError(f'{path}: student {i} has the index {student["index"]!r}, not a whole number')
  return (dict(sweep.get('axes') or {}), [dict(s) for s in sweep.get('students') or []], sweep.get('mode') or 'grid',
          dict(sweep.get('labels') or {}), list(sweep.get('seeds') or []))


def load_run(workdir: str) -> Run:
  """Reads a workdir; one with neither metrics.jsonl nor sweep.json is a `ConfigError`."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if not os.path.exists(workdir):
    raise ConfigError(f'{workdir} does not exist')
  if not os.path.isdir(workdir):
    raise ConfigError(f'{workdir} is not a directory')
  sweep_path, metrics_path = (os.path.join(workdir, n) for n in ('sweep.json', 'metrics.jsonl'))
  if not os.path.exists(sweep_path) and not os.path.exists(metrics_path):
    raise ConfigError(f'{workdir} is not a kdjax workdir: no metrics.jsonl or sweep.json')
  history = _read_history(metrics_path) if os.path.exists(metrics_path) else []

  if os.path.exists(sweep_path):
    sweep = _read_json(sweep_path)
    if not isinstance(sweep, dict):
      raise ConfigError(f'{sweep_path} does not hold an object')
    axes, students, mode, labels, seeds = _sweep_fields(sweep, sweep_path)
  else:  # an older single run: its seed, if anywhere, is in config.json
    config_path = os.path.join(workdir, 'config.json')
    seed = None
    if os.path.exists(config_path):
      config = _read_json(config_path)
      seed = config.get('seed') if isinstance(config, dict) else None
    axes, mode, labels, seeds = {}, 'grid', {}, [seed] if seed is not None else []
    students = [{'index': 0, 'name': os.path.basename(workdir), 'values': {}, 'seed': seed}]
  for i, s in enumerate(students):
    s.setdefault('index', i)
    s['values'] = dict(s.get('values') or {})
    s.setdefault('seed', None)
    s.setdefault('name', f'student {s["index"]}')
  # Students the history names but sweep.json does not (a hand-edited or older file) still get their rows.
  known = {s['index'] for s in students}
  for index in sorted({r['student'] for r in history} - known):
    students.append({'index': index, 'name': f'student {index}', 'values': {}, 'seed': None})
  students.sort(key=lambda s: s['index'])

  models, skipped = {}, []
  config_path = os.path.join(workdir, 'config.json')
  if os.path.exists(config_path):
    config = _read_json(config_path)
    if isinstance(config, dict):
      section = lambda name: config.get(name) if isinstance(config.get(name), dict) else {}
      models = {'teacher': section('teacher').get('model') or '', 'student': section('student').get('model') or '',
                'dataset': section('data').get('name') or ''}
  if os.path.exists(sweep_path):
    skipped = [s.get('values') for s in (_read_json(sweep_path).get('skipped') or []) if isinstance(s, dict)]
  summary_path = os.path.join(workdir, 'summary.json')
  summary = _read_json(summary_path) if os.path.exists(summary_path) else {}
  summary = summary if isinstance(summary, dict) else {}
  select = summary.get('select_split') or ('val' if any('val_accuracy' in r for r in history) else 'test')
  if select not in SPLITS:
    raise ConfigError(f'{summary_path}: select_split is {select!r}, not one of {", ".join(SPLITS)}')
  if summary.get('wall_seconds') is not None and not _number(summary['wall_seconds']):
    raise ConfigError(f'{summary_path}: wall_seconds is {summary["wall_seconds"]!r}, not a number')
  return Run(workdir=workdir, axes=axes, mode=mode, seeds=seeds, labels=labels, students=students,
             history=history, select_split=select, wall_seconds=summary.get('wall_seconds'), models=models,
             skipped=[v for v in skipped if isinstance(v, dict)])


def _field_column(field: str) -> str:
  return f'swept.{field}' if field in _ROW_COLUMNS or field.startswith(('best_', 'last_')) else field


def _last(records: list[dict], key: str):
  values = [r[key] for r in records if r.get(key) is not None]
  return values[-1] if values else None


def student_rows(run: Run) -> list[dict]:
  """One row per student: its swept values, seed, and best / last / at-best accuracies from its history."""
  sel = run.select_split
  by_student = {s['index']: [] for s in run.students}
  for r in run.history:
    by_student.setdefault(r['student'], []).append(r)
  rows = []
  for s in run.students:
    records = sorted(by_student[s['index']], key=lambda r: r['epoch'])
    row = {'index': s['index'], 'name': s['name']}
    for field in run.axes:
      row[_field_column(field)] = s['values'].get(field)
    row['seed'] = s['seed']
    evaluated = [r for r in records if r.get(f'{sel}_accuracy') is not None]
    # The first epoch that reaches the maximum, as a checkpoint manager keeping the best one would.
    best = max(evaluated, key=lambda r: r[f'{sel}_accuracy'], default=None)
    tests = [r['test_accuracy'] for r in records if r.get('test_accuracy') is not None]
    row.update({
        f'best_{sel}_accuracy': best[f'{sel}_accuracy'] if best else None,
        'best_epoch': best['epoch'] if best else None,
        f'last_{sel}_accuracy': _last(records, f'{sel}_accuracy'),
        'test_accuracy_at_best': best.get('test_accuracy') if best else None,
        'best_test_accuracy': max(tests) if tests else None,
        'last_test_accuracy': tests[-1] if tests else None,
    })
    for key in run.last_metrics:
      row[f'last_{key}'] = _last(records, key)
    row['epochs'] = records[-1]['epoch'] if records else None
    rows.append(row)
  return rows


def write_csv(run: Run, path: str | None = None) -> str:
  """Writes results.csv (one row per student; an empty cell where a student has no such number yet)."""
  path = path or os.path.join(run.workdir, 'results.csv')
  rows = student_rows(run)
  columns = list(dict.fromkeys(k for row in rows for k in row))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with atomic.writing(path, newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns, restval='')
    writer.writeheader()
    writer.writerows(rows)
  return path


# ------------------------------------------------------------------------------------------------ grouping

def _key(value):
  """A hashable, type-tolerant key for a swept value (1 and 1.0 are the same grid point)."""
  if isinstance(value, bool) or value is None or isinstance(value, str):
    return value
  if isinstance(value, (int, float)):
    return float(value)
  if isinstance(value, (list, tuple)):
    return tuple(_key(v) for v in value)
  return json.dumps(value, sort_keys=True)


def _fmt_value(value) -> str:
  if isinstance(value, float):
    return f'{value:g}'
  if isinstance(value, (list, tuple, dict)):
    return json.dumps(value, separators=(',', ':'))
  return '-' if value is None else str(value)


@dataclasses.dataclass
class _Point:
  """One grid point: its swept values, its students (the seeds) and their rows."""
  values: dict
  rows: list[dict]

  def stat(self, column: str) -> list[float]:
    return [float(r[column]) for r in self.rows if r.get(column) is not None]

  @property
  def n(self) -> int:
    return sum(1 for r in self.rows if r.get('epochs') is not None)


def _points(run: Run) -> list[_Point]:
  """Students grouped by their swept values (the seeds of one grid point together), in sweep order."""
  points = {}
  students = {s['index']: s for s in run.students}
  for row in student_rows(run):
    values = {f: students[row['index']]['values'].get(f) for f in run.axes}
    key = tuple(_key(v) for v in values.values())
    points.setdefault(key, _Point(values, [])).rows.append(row)
  return list(points.values())


def _mean_std(values: list[float], percent: bool = True) -> str:
  if not values:
    return '-'
  scale, digits = (100, 2) if percent else (1, 4)
  mean = scale * float(np.mean(values))
  if len(values) == 1:
    return f'{mean:.{digits}f}'
  return f'{mean:.{digits}f} ± {scale * float(np.std(values, ddof=1)):.{digits}f}'


def _metric_columns(has_val: bool, last_metrics) -> list[tuple[str, str]]:
  """(header, row column) of the table's metric columns; `last_metrics`: the `_LAST_METRICS` keys to show."""
  columns = [('last test acc', 'last_test_accuracy'), ('best test acc', 'best_test_accuracy')]
  if has_val:
    columns += [('best val acc', 'best_val_accuracy'), ('last val acc', 'last_val_accuracy')]
  columns += [(_LAST_METRICS[k][0], f'last_{k}') for k in _LAST_METRICS if k in last_metrics]
  return columns


def _val_rows(run: Run, point: _Point) -> list[dict]:
  """The rows with best/last val accuracy even when the run selects on test (the table shows val if it exists)."""
  if run.select_split == 'val' or not run.has_val:
    return point.rows
  out = []
  for row in point.rows:
    records = [r for r in run.history if r['student'] == row['index'] and r.get('val_accuracy') is not None]
    vals = [r['val_accuracy'] for r in records]
    out.append(dict(row, best_val_accuracy=max(vals) if vals else None, last_val_accuracy=_last(records,
                                                                                               'val_accuracy')))
  return out


def _format_table(rows: list[list[str]]) -> str:
  """Columns padded to their widest cell, a dashed line under the header (the style of runner.format_table)."""
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ['  '.join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
  lines.insert(1, '  '.join('-' * w for w in widths))
  return '\n'.join(lines)


def _point_cells(run: Run, point: _Point, metrics: list[tuple[str, str]]) -> list[str]:
  rows = _val_rows(run, point)
  cells = [str(point.n)]
  for _, column in metrics:
    percent = _LAST_METRICS.get(column[len('last_'):], ('', True))[1]
    cells.append(_mean_std([float(r[column]) for r in rows if r.get(column) is not None], percent))
  return cells


def _fmt_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'


def _title(run: Run) -> str:
  parts = [f'{len(run.students)} student(s)']
  if run.axes:
    parts.append(f"{run.mode} over {', '.join(run.label(f) for f in run.axes)}")
  if len(run.seeds) > 1:
    parts.append(f"seeds {', '.join(str(s) for s in run.seeds)}")
  parts.append(f'model selection on {run.select_split}')
  if run.wall_seconds is not None:
    parts.append(f'wall {_fmt_seconds(run.wall_seconds)}')
  return f"{run.workdir}: {'; '.join(parts)}"


def pivot(run: Run) -> tuple[list, list, np.ndarray]:
  """For two swept axes: (first axis values, second axis values, mean last test accuracy in % or NaN)."""
  if len(run.axes) != 2:
    raise ConfigError(f'a pivot needs exactly two swept axes; {run.workdir} has {len(run.axes)}')
  (f0, v0), (f1, v1) = run.axes.items()
  index0 = {_key(v): i for i, v in enumerate(v0)}
  index1 = {_key(v): j for j, v in enumerate(v1)}
  matrix = np.full((len(v0), len(v1)), np.nan)
  for point in _points(run):
    i, j = index0.get(_key(point.values[f0])), index1.get(_key(point.values[f1]))
    values = point.stat('last_test_accuracy')
    if i is not None and j is not None and values:
      matrix[i, j] = 100 * float(np.mean(values))
  return list(v0), list(v1), matrix


def grid_table(run: Run) -> str:
  """The console table: one row per grid point, accuracies in % as mean ± sample std over its seeds."""
  metrics = _metric_columns(run.has_val, run.last_metrics)
  rows = [[run.label(f) for f in run.axes] + ['n'] + [h for h, _ in metrics]]
  for point in _points(run):
    rows.append([_fmt_value(point.values[f]) for f in run.axes] + _point_cells(run, point, metrics))
  text = [_title(run), _format_table(rows)]
  if len(run.axes) == 2:
    (f0, f1) = run.axes
    v0, v1, matrix = pivot(run)
    cells = [[f'{run.label(f0)} \\ {run.label(f1)}'] + [_fmt_value(v) for v in v1]]
    for value, line in zip(v0, matrix):
      cells.append([_fmt_value(value)] + ['-' if math.isnan(x) else f'{x:.2f}' for x in line])
    text += ['', 'mean last test accuracy (%)', _format_table(cells)]
  return '\n'.join(text)


def compare(runs: Sequence[Run | str]) -> str:
  """Several workdirs side by side: one row per (workdir, grid point), the columns of `grid_table`."""
  runs = [r if isinstance(r, Run) else load_run(r) for r in runs]
  names = [os.path.basename(r.workdir) for r in runs]
  if len(set(names)) < len(names):
    names = [os.path.relpath(r.workdir) for r in runs]
  fields = list(dict.fromkeys(f for r in runs for f in r.axes))
  labels = {}
  for r in runs:
    labels.update({f: l for f, l in r.labels.items() if l})
  metrics = _metric_columns(any(r.has_val for r in runs), {k for r in runs for k in r.last_metrics})
  rows = [['run'] + [labels.get(f, f) for f in fields] + ['n'] + [h for h, _ in metrics]]
  for name, run in zip(names, runs):
    for point in _points(run):
      rows.append([name] + [_fmt_value(point.values[f]) if f in run.axes else '-' for f in fields] +
                  _point_cells(run, point, metrics))
  return _format_table(rows)


# ------------------------------------------------------------------------------------------------ tables

def is_table(run: Run) -> bool:
  """A run whose sweep has program axes (method=, student.model=): a paper-style table."""
  return 'method' in run.axes or 'student.model' in run.axes


def _table_cells(run: Run) -> tuple[list, list, dict]:
  """(methods, student models, {(method, model): [best test accuracy of each seed]}); 'ce' (the student alone)
  first, as the papers print it."""
  methods = list(run.axes.get('method') or [None])
  methods.sort(key=lambda m: m != 'ce')
  columns = list(run.axes.get('student.model') or [run.models.get('student')])
  students = {s['index']: s for s in run.students}
  cells = {}
  for row in student_rows(run):
    values = students[row['index']]['values']
    key = (values.get('method'), values.get('student.model', columns[0]))
    if row.get('best_test_accuracy') is not None:
      cells.setdefault(key, []).append(100 * float(row['best_test_accuracy']))
  return methods, columns, cells


def paper_table(run: Run, markdown: bool = True) -> str:
  """Rows methods, columns teacher -> student pairs, cells the best test accuracy (%, as RepDistiller and
  mdistiller report it) as mean ± std over seeds, the best per column in bold (markdown) or marked *; the published
  number in parentheses where one exists for the pair (kdjax/published.py, CIFAR-100); n/a where the method could
  not apply to the pair."""
  from kdjax import published
  methods, columns, cells = _table_cells(run)
  teacher = run.models.get('teacher') or '?'
  na = {(v.get('method'), v.get('student.model', columns[0])) for v in run.skipped}
  best = {c: max((np.mean(cells[(m, c)]) for m in methods if cells.get((m, c))), default=None) for c in columns}
  header = ['method'] + [f'{teacher} → {c}' for c in columns]
  rows = []
  for m in methods:
    line = [m or '-']
    for c in columns:
      values = cells.get((m, c))
      if (m, c) in na:
        text = 'n/a'
      elif not values:
        text = '-'
      else:
        text = _mean_std([v / 100 for v in values])
        if np.mean(values) == best[c]:
          text = f'**{text}**' if markdown else f'{text} *'
      ref = published.cifar100(m, teacher, c) if run.models.get('dataset') == 'cifar100' and m else None
      line.append(text if ref is None else f'{text} ({ref:.2f})')
    rows.append(line)
  if markdown:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    return '\n'.join(lines + ['| ' + ' | '.join(r) + ' |' for r in rows])
  return _format_table([header] + rows)


def table_text(run: Run) -> str:
  """table.md: the paper-style table with what its cells are."""
  seeds = max((len(v) for v in _table_cells(run)[2].values()), default=0)
  return '\n'.join([
      paper_table(run), '',
      f'Best test accuracy (%) over the epochs, mean ± std over {seeds} seed(s); best per column in bold; in '
      'parentheses the published number (CIFAR-100: RepDistiller, mdistiller) where the recipe is the paper\'s; '
      'n/a: the method cannot apply to the pair.', ''])


def _gains_heatmap(run: Run, path: str) -> bool:
  """figures/table.png: each cell's mean best test accuracy minus the 'ce' row's (the student alone) in its column,
  or the accuracy itself without a 'ce' row."""
  methods, columns, cells = _table_cells(run)
  mean = lambda m, c: float(np.mean(cells[(m, c)])) if cells.get((m, c)) else np.nan
  matrix = np.array([[mean(m, c) for c in columns] for m in methods])
  gains = 'ce' in methods
  if gains:
    matrix = matrix - matrix[methods.index('ce')][None, :]
  if np.isnan(matrix).all():
    return False
  fig = _new_figure((2.0 + 1.3 * len(columns), 1.0 + 0.45 * len(methods)))
  ax = fig.add_subplot()
  lim = np.nanmax(np.abs(matrix)) or 1.0
  image = ax.imshow(np.ma.masked_invalid(matrix), cmap='RdBu' if gains else 'viridis', aspect='auto',
                    vmin=-lim if gains else None, vmax=lim if gains else None)
  fig.colorbar(image, ax=ax, label='gain over ce (points)' if gains else 'best test accuracy (%)')
  for i in range(matrix.shape[0]):
    for j in range(matrix.shape[1]):
      if not math.isnan(matrix[i, j]):
        ax.text(j, i, f'{matrix[i, j]:+.2f}' if gains else f'{matrix[i, j]:.2f}', ha='center', va='center',
                fontsize=8)
  ax.set_xticks(range(len(columns)), [str(c) for c in columns])
  ax.set_yticks(range(len(methods)), [str(m) for m in methods])
  ax.set_title(f"teacher {run.models.get('teacher') or '?'}: " + ('gain over the student alone (ce)' if gains
                                                                else 'best test accuracy (%)'))
  _save_figure(fig, path)
  return True


# ------------------------------------------------------------------------------------------------ figures

def _curve_groups(run: Run) -> list[tuple[str, list[int]]]:
  """(legend label, student indices) per curve: every student, or with many students one curve per grid point."""
  if len(run.students) <= _MAX_CURVES_WITH_LEGEND or not run.axes:
    return [(s['name'], [s['index']]) for s in run.students]
  groups = []
  for point in _points(run):
    label = ' '.join(f'{run.label(f)}={_fmt_value(v)}' for f, v in point.values.items())
    groups.append((f'{label} (n={len(point.rows)})', [r['index'] for r in point.rows]))
  return groups


def _curve(run: Run, students: list[int], key: str) -> tuple[list[int], list[float]]:
  """A metric against epoch, averaged over the given students at each epoch that has it."""
  wanted = set(students)
  per_epoch = {}
  for r in run.history:
    if r['student'] in wanted and r.get(key) is not None:
      per_epoch.setdefault(r['epoch'], []).append(float(r[key]))
  epochs = sorted(per_epoch)
  return epochs, [float(np.mean(per_epoch[e])) for e in epochs]


def _new_figure(size):
  # A bare Figure (no pyplot) draws with the Agg canvas whatever the session's backend, and holds no global
  # state: nothing to close, and a notebook's backend is left alone.
  from matplotlib.figure import Figure
  return Figure(figsize=size, layout='constrained')


def _save_figure(fig, path: str):
  with atomic.writing(path, 'wb') as f:  # the format named by the extension, as savefig(path) would choose it
    fig.savefig(f, format=os.path.splitext(path)[1][1:] or 'png', dpi=120)


def _colors(n: int):
  from matplotlib import colormaps
  cmap = colormaps['tab10' if n <= 10 else 'viridis']
  return [cmap(i if n <= 10 else i / max(n - 1, 1)) for i in range(n)]


def _numeric(values: list) -> bool:
  return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _heatmap(run: Run, path: str) -> bool:
  v0, v1, matrix = pivot(run)
  if np.isnan(matrix).all():
    return False
  f0, f1 = run.axes
  fig = _new_figure((1.2 + 0.9 * len(v1), 1.0 + 0.6 * len(v0)))
  ax = fig.add_subplot()
  image = ax.imshow(np.ma.masked_invalid(matrix), cmap='viridis', aspect='auto')
  fig.colorbar(image, ax=ax, label='last test accuracy (%)')
  lo, hi = np.nanmin(matrix), np.nanmax(matrix)
  for i in range(matrix.shape[0]):
    for j in range(matrix.shape[1]):
      if not math.isnan(matrix[i, j]):
        dark = hi > lo and (matrix[i, j] - lo) / (hi - lo) < 0.5
        ax.text(j, i, f'{matrix[i, j]:.2f}', ha='center', va='center', fontsize=8,
                color='white' if dark else 'black')
  ax.set_xticks(range(len(v1)), [_fmt_value(v) for v in v1])
  ax.set_yticks(range(len(v0)), [_fmt_value(v) for v in v0])
  ax.set_xlabel(run.label(f1))
  ax.set_ylabel(run.label(f0))
  ax.set_title('mean last test accuracy (%)')
  _save_figure(fig, path)
  return True


def _sweep_plot(run: Run, path: str) -> bool:
  (field,) = run.axes
  points = [(p.values[field], p.stat('last_test_accuracy')) for p in _points(run)]
  points = [(v, acc) for v, acc in points if acc]
  if not points:
    return False
  values = [v for v, _ in points]
  numeric = _numeric(values)
  x = [float(v) for v in values] if numeric else list(range(len(values)))
  means = [100 * float(np.mean(acc)) for _, acc in points]
  stds = [100 * float(np.std(acc, ddof=1)) if len(acc) > 1 else 0.0 for _, acc in points]
  fig = _new_figure((6, 4))
  ax = fig.add_subplot()
  ax.errorbar(x, means, yerr=stds, marker='o', capsize=4)
  if numeric and min(x) > 0 and max(x) / min(x) >= 50:
    ax.set_xscale('log')
  if not numeric:
    ax.set_xticks(x, [_fmt_value(v) for v in values])
  ax.set_xlabel(run.label(field))
  ax.set_ylabel('last test accuracy (%)')
  ax.set_title('mean ± std over seeds' if any(len(acc) > 1 for _, acc in points) else 'last test accuracy')
  ax.grid(alpha=0.3)
  _save_figure(fig, path)
  return True


def _curves(run: Run, path: str):
  from matplotlib.lines import Line2D
  from matplotlib.ticker import MaxNLocator
  groups = _curve_groups(run)
  fig = _new_figure((12, 4.5 + 0.2 * min(len(groups), _MAX_CURVES_WITH_LEGEND) / 3))
  loss_ax, acc_ax = fig.subplots(1, 2)
  styles = dict(zip(SPLITS, ('-', '--', ':')))
  used = set()
  for (label, students), color in zip(groups, _colors(len(groups))):
    for ax, metric in ((loss_ax, 'loss'), (acc_ax, 'accuracy')):
      first = True
      for split in SPLITS:
        epochs, ys = _curve(run, students, f'{split}_{metric}')
        if epochs:
          used.add(split)
          ax.plot(epochs, ys, styles[split], color=color, marker='.' if len(epochs) < 3 else None,
                  label=label if first and ax is loss_ax else None)
          first = False
  for ax, name in ((loss_ax, 'loss'), (acc_ax, 'accuracy')):
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel('epoch')
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
  split_handles = [Line2D([], [], color='black', linestyle=styles[s], label=s) for s in SPLITS if s in used]
  if split_handles:
    acc_ax.legend(handles=split_handles, loc='lower right', fontsize=8)
  if len(groups) <= _MAX_CURVES_WITH_LEGEND and loss_ax.get_legend_handles_labels()[0]:
    fig.legend(loc='outside lower center', ncols=min(len(groups), 3), fontsize=8)
  _save_figure(fig, path)


def figures(run: Run, outdir: str | None = None) -> list[str]:
  """Draws the figures of a run (default WORKDIR/figures/); returns the paths written.

  Two swept axes: heatmap.png; one: sweep.png (each only once some student has a test accuracy); always
  curves.png, the loss and accuracy of every student (or grid point) against epoch.
  """
  outdir = outdir or os.path.join(run.workdir, 'figures')
  os.makedirs(outdir, exist_ok=True)
  written = []
  if len(run.axes) == 2 and _heatmap(run, os.path.join(outdir, 'heatmap.png')):
    written.append(os.path.join(outdir, 'heatmap.png'))
  if len(run.axes) == 1 and _sweep_plot(run, os.path.join(outdir, 'sweep.png')):
    written.append(os.path.join(outdir, 'sweep.png'))
  if is_table(run) and _gains_heatmap(run, os.path.join(outdir, 'table.png')):
    written.append(os.path.join(outdir, 'table.png'))
  _curves(run, os.path.join(outdir, 'curves.png'))
  written.append(os.path.join(outdir, 'curves.png'))
  return written


def finish(workdir: str) -> str:
  """Writes results.csv and the figures of a workdir; returns the table to print."""
  run = load_run(workdir)
  write_csv(run)
  figures(run)
  return report_text(run)


def report_text(run: Run, outdir: str | None = None) -> str:
  """The console text of a run: its grid table and, for a table (program axes), the paper-style table, also
  written to table.md (in `outdir`, default the workdir)."""
  text = grid_table(run)
  if is_table(run):
    with atomic.writing(os.path.join(outdir or run.workdir, 'table.md')) as f:
      f.write(table_text(run))
    text += '\n\n' + paper_table(run, markdown=False)
  return text
