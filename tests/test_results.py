"""The results layer on hand-written workdirs: results.csv, the table, the pivot, figures and the report CLI."""

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from kdjax import results
from kdjax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
ALPHAS = [0.1, 0.5]
TEMPERATURES = [1.0, 4.0, 8.0]
SEEDS = [0, 1]
EPOCHS = 5


def _write(workdir, history, sweep=None, summary=None, extra_lines=()):
  os.makedirs(workdir, exist_ok=True)
  if sweep is not None:
    with open(os.path.join(workdir, 'sweep.json'), 'w') as f:
      json.dump(sweep, f)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    for record in history:
      f.write(json.dumps(record) + '\n')
    for line in extra_lines:
      f.write(line + '\n')
  if summary is not None:
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f)
  return str(workdir)


def _epoch_record(rng, epoch, student, val=True, agreement=True):
  r = {'epoch': epoch, 'step': 10 * epoch, 'student': student, 'train_loss': float(rng.uniform(0.1, 2)),
       'train_accuracy': float(rng.uniform(0.3, 1)), 'loss_ce': 0.5, 'loss_kd': 0.3, 'img_per_s': 1000.0,
       'epoch_seconds': 1.0, 'test_loss': float(rng.uniform(0.1, 2)), 'test_accuracy': float(rng.uniform(0.3, 1)),
       'test_top5': 1.0}
  if val:
    r.update(val_loss=float(rng.uniform(0.1, 2)), val_accuracy=float(rng.uniform(0.3, 1)), val_top5=1.0)
  if agreement:
    r['test_agreement'] = float(rng.uniform(0.5, 1))
    r['test_top5_agreement'] = float(rng.uniform(0.8, 1))
    r['test_teacher_kl'] = float(rng.uniform(0.05, 2))
  return r


@pytest.fixture
def grid(tmp_path):
  """A 2 x 3 grid (alpha x distill.temperature) x 2 seeds, 5 evaluated epochs of random accuracies."""
  rng = np.random.default_rng(0)
  students = []
  for a in ALPHAS:
    for t in TEMPERATURES:
      for s in SEEDS:
        students.append({'index': len(students), 'name': f'alpha={a:g} distill.temperature={t:g} seed={s}',
                         'values': {'alpha': a, 'distill.temperature': t}, 'seed': s})
  history = [_epoch_record(rng, e, s['index']) for e in range(1, EPOCHS + 1) for s in students]
  sweep = {'axes': {'alpha': ALPHAS, 'distill.temperature': TEMPERATURES}, 'mode': 'grid', 'seeds': SEEDS,
           'labels': {'alpha': 'α (label weight)'}, 'students': students}
  summary = {'select_split': 'val', 'wall_seconds': 75.0, 'students': []}
  workdir = _write(tmp_path / 'grid', history, sweep, summary, extra_lines=[json.dumps({'summary': summary})])
  return workdir, students, history


def _expected(history, index):
  """Best/last numbers of one student, computed independently of kdjax.results."""
  records = sorted((r for r in history if r['student'] == index), key=lambda r: r['epoch'])
  val = np.array([r['val_accuracy'] for r in records])
  test = np.array([r['test_accuracy'] for r in records])
  best = int(np.argmax(val))  # the first epoch that reaches the maximum
  return {'best_val_accuracy': val[best], 'best_epoch': records[best]['epoch'], 'last_val_accuracy': val[-1],
          'test_accuracy_at_best': test[best], 'best_test_accuracy': test.max(), 'last_test_accuracy': test[-1],
          'last_test_agreement': records[-1]['test_agreement'],
          'last_test_top5_agreement': records[-1]['test_top5_agreement'],
          'last_test_teacher_kl': records[-1]['test_teacher_kl'], 'epochs': records[-1]['epoch']}


def _table_rows(text):
  """The cells of the first table in `text` (columns are separated by two or more spaces)."""
  lines = text.splitlines()
  start = next(i for i, l in enumerate(lines) if set(l.replace(' ', '')) == {'-'}) - 1
  rows = []
  for line in lines[start:]:
    if not line.strip():
      break
    rows.append(re.split(r' {2,}', line.strip()))
  return rows[0], rows[2:]


def test_csv_has_one_row_per_student_with_best_last_and_at_best(grid):
  workdir, students, history = grid
  path = results.write_csv(results.load_run(workdir))
  assert path == os.path.join(workdir, 'results.csv')
  with open(path) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(students)
  assert list(rows[0])[:5] == ['index', 'name', 'alpha', 'distill.temperature', 'seed']
  # The fixture must tell best from last, or the checks below could pass with either.
  assert any(_expected(history, s['index'])['best_epoch'] != EPOCHS for s in students)
  for row, student in zip(rows, students):
    assert int(row['index']) == student['index'] and row['name'] == student['name']
    assert float(row['alpha']) == student['values']['alpha']
    assert float(row['distill.temperature']) == student['values']['distill.temperature']
    assert int(row['seed']) == student['seed']
    for column, value in _expected(history, student['index']).items():
      assert float(row[column]) == pytest.approx(value), (student['name'], column)


def test_table_shows_mean_and_sample_std_over_seeds_and_the_pivot(grid):
  workdir, students, history = grid
  text = results.grid_table(results.load_run(workdir))
  assert text.splitlines()[0] == (f'{workdir}: 12 student(s); grid over α (label weight), distill.temperature; '
                                  'seeds 0, 1; model selection on val; wall 1:15')
  header, rows = _table_rows(text)
  assert header == ['α (label weight)', 'distill.temperature', 'n', 'last test acc', 'best test acc',
                    'best val acc', 'last val acc', 'agreement', 'top-5 agreement', 'KL to teacher']
  assert len(rows) == len(ALPHAS) * len(TEMPERATURES)
  means = np.zeros((len(ALPHAS), len(TEMPERATURES)))
  for i, a in enumerate(ALPHAS):
    for j, t in enumerate(TEMPERATURES):
      expected = [_expected(history, s['index']) for s in students if s['values'] == {'alpha': a,
                                                                                      'distill.temperature': t}]
      row = next(r for r in rows if r[:2] == [f'{a:g}', f'{t:g}'])
      assert row[2] == str(len(SEEDS))
      for cell, column in zip(row[3:], ['last_test_accuracy', 'best_test_accuracy', 'best_val_accuracy',
                                        'last_val_accuracy', 'last_test_agreement', 'last_test_top5_agreement']):
        values = 100 * np.array([e[column] for e in expected])
        assert cell == f'{values.mean():.2f} ± {np.std(values, ddof=1):.2f}', column
      kl = np.array([e['last_test_teacher_kl'] for e in expected])  # in nats, not in %
      assert row[-1] == f'{kl.mean():.4f} ± {np.std(kl, ddof=1):.4f}'
      means[i, j] = 100 * np.mean([e['last_test_accuracy'] for e in expected])

  v0, v1, matrix = results.pivot(results.load_run(workdir))
  assert v0 == ALPHAS and v1 == TEMPERATURES
  np.testing.assert_allclose(matrix, means)
  pivot_text = text.split('mean last test accuracy (%)\n', 1)[1]
  header, rows = _table_rows(pivot_text)
  assert header == ['α (label weight) \\ distill.temperature'] + [f'{t:g}' for t in TEMPERATURES]
  assert rows == [[f'{a:g}'] + [f'{x:.2f}' for x in line] for a, line in zip(ALPHAS, means)]


def test_resumed_history_keeps_the_last_occurrence(tmp_path):
  rng = np.random.default_rng(1)
  first = [_epoch_record(rng, e, 0, val=False, agreement=False) for e in (1, 2, 3)]
  for r in first[:2]:
    del r['student']  # an older file: no student key means student 0
  resumed = [_epoch_record(rng, e, 0, val=False, agreement=False) for e in (3, 4)]
  resumed[0]['test_accuracy'] = 0.99  # the re-run epoch 3 is the best, and it must be the one kept
  workdir = _write(tmp_path / 'resumed', first + resumed, extra_lines=[json.dumps({'summary': {}})])
  run = results.load_run(workdir)
  assert [(r['epoch'], r['student']) for r in run.history] == [(1, 0), (2, 0), (3, 0), (4, 0)]
  assert run.history[2] == resumed[0]
  (row,) = results.student_rows(run)
  assert row['best_test_accuracy'] == 0.99 and row['best_epoch'] == 3
  assert row['last_test_accuracy'] == resumed[1]['test_accuracy'] and row['epochs'] == 4


def test_single_run_without_sweep_json(tmp_path):
  rng = np.random.default_rng(2)
  history = [_epoch_record(rng, e, 0, val=False, agreement=False) for e in (1, 2, 3)]
  for r in history:
    del r['student']
  workdir = _write(tmp_path / 'teacher_run', history)
  run = results.load_run(workdir)
  assert run.axes == {} and run.select_split == 'test' and run.wall_seconds is None
  assert [s['name'] for s in run.students] == ['teacher_run']
  (row,) = results.student_rows(run)
  tests = [r['test_accuracy'] for r in history]
  assert row['best_test_accuracy'] == max(tests) and row['last_test_accuracy'] == tests[-1]
  assert row['best_epoch'] == 1 + int(np.argmax(tests)) and 'best_val_accuracy' not in row
  header, rows = _table_rows(results.grid_table(run))
  assert header == ['n', 'last test acc', 'best test acc']
  assert rows == [['1', f'{100 * tests[-1]:.2f}', f'{100 * max(tests):.2f}']]
  paths = results.figures(run)
  assert [os.path.basename(p) for p in paths] == ['curves.png']


def test_unfinished_sweep_and_a_line_cut_short(tmp_path):
  students = [{'index': i, 'name': f'lr={lr:g} seed=0', 'values': {'optimizer.lr': lr}, 'seed': 0}
              for i, lr in enumerate([0.01, 0.1])]
  sweep = {'axes': {'optimizer.lr': [0.01, 0.1]}, 'mode': 'grid', 'seeds': [0], 'students': students}
  workdir = _write(tmp_path / 'unfinished', [], sweep)
  os.remove(os.path.join(workdir, 'metrics.jsonl'))
  run = results.load_run(workdir)  # sweep.json alone: started, nothing evaluated yet
  assert run.history == [] and [r['epochs'] for r in results.student_rows(run)] == [None, None]
  assert _table_rows(results.grid_table(run))[1] == [['0.01', '0', '-', '-'], ['0.1', '0', '-', '-']]

  rng = np.random.default_rng(3)
  record = _epoch_record(rng, 1, 0, val=False, agreement=False)
  _write(workdir, [record], sweep, extra_lines=['{"epoch": 2, "stud'])
  assert results.load_run(workdir).history == [record]


def test_figures_are_valid_pngs(grid, tmp_path):
  from matplotlib import image

  workdir, _, _ = grid
  paths = results.figures(results.load_run(workdir))
  assert sorted(os.path.basename(p) for p in paths) == ['curves.png', 'heatmap.png']
  rng = np.random.default_rng(4)
  students = [{'index': 3 * i + s, 'name': f'lr={lr:g} seed={s}', 'values': {'optimizer.lr': lr}, 'seed': s}
              for i, lr in enumerate([0.01, 0.1, 1.0]) for s in range(3)]
  sweep = {'axes': {'optimizer.lr': [0.01, 0.1, 1.0]}, 'mode': 'grid', 'seeds': [0, 1, 2], 'students': students}
  one_axis = _write(tmp_path / 'lr', [_epoch_record(rng, e, s['index']) for e in (1, 2) for s in students], sweep)
  run = results.load_run(one_axis)
  assert run.select_split == 'val'  # no summary.json: val, since the history has val accuracies
  paths += results.figures(run, str(tmp_path / 'out'))
  assert sorted(os.path.basename(p) for p in paths[2:]) == ['curves.png', 'sweep.png']
  assert all(os.path.dirname(p) == str(tmp_path / 'out') for p in paths[2:])
  for path in paths:
    with open(path, 'rb') as f:
      assert f.read(8) == PNG_SIGNATURE, path
    pixels = image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 0 and pixels.shape[1] > 0, path


def test_compare_has_one_row_per_workdir_and_grid_point(grid, tmp_path):
  workdir, _, _ = grid
  rng = np.random.default_rng(5)
  single = _write(tmp_path / 'single', [_epoch_record(rng, 1, 0, val=False, agreement=False)])
  header, rows = _table_rows(results.compare([workdir, single]))
  assert header[:4] == ['run', 'α (label weight)', 'distill.temperature', 'n']
  assert [r[0] for r in rows] == ['grid'] * len(ALPHAS) * len(TEMPERATURES) + ['single']
  assert rows[-1][:4] == ['single', '-', '-', '1']  # fields the run does not sweep show '-'


def _report(*args):
  return subprocess.run([sys.executable, '-m', 'kdjax.tools.report', *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)


def test_report_cli_prints_tables_and_writes_files(grid, tmp_path):
  workdir, students, _ = grid
  rng = np.random.default_rng(6)
  single = _write(tmp_path / 'single', [_epoch_record(rng, 1, 0, val=False, agreement=False)])
  out = tmp_path / 'out'
  r = _report(workdir, single, '--out', str(out))
  assert r.returncode == 0, r.stderr
  assert r.stdout.count('best test acc') == 3  # two tables and the comparison
  assert 'mean last test accuracy (%)' in r.stdout and 'α (label weight)' in r.stdout
  with open(out / 'grid' / 'results.csv') as f:
    assert len(list(csv.DictReader(f))) == len(students)
  assert {'heatmap.png', 'curves.png', 'results.csv'} <= set(os.listdir(out / 'grid'))
  assert not os.path.exists(os.path.join(workdir, 'results.csv'))  # --out leaves the workdir alone

  r = _report(single)
  assert r.returncode == 0, r.stderr
  assert os.path.exists(os.path.join(single, 'results.csv'))
  assert os.path.exists(os.path.join(single, 'figures', 'curves.png'))


@pytest.mark.parametrize('kind', ['empty', 'missing'])
def test_report_cli_rejects_a_non_workdir_in_one_line(tmp_path, kind):
  path = tmp_path / kind
  if kind == 'empty':
    path.mkdir()
  r = _report(str(path))
  assert r.returncode == 2
  lines = r.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith('error:') and str(path) in lines[0], r.stderr
  with pytest.raises(ConfigError, match='not a kdjax workdir' if kind == 'empty' else 'does not exist'):
    results.load_run(str(path))
