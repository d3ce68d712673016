"""A paper's table in one program: methods x student architectures as groups of students, one teachers' pass per
step. Every student equals that student trained alone (unrolled and vmapped groups, a staged method whose group is
longer than the others, two architectures, CRD's memory bank); resume; records; results; every refusal."""

import csv
import json
import os

import jax
import numpy as np
import pytest

from kdjax import api
from kdjax import checkpoint as ckpt_lib
from kdjax import errors
from kdjax import results
from kdjax import step as step_lib
from kdjax import sweep as sweep_lib
from kdjax import train
from kdjax import trainer as trainer_lib
from tests.util import config_module, digits_config, random_teacher

RTOL, ATOL = 2e-5, 2e-6  # float32 round-off, as tests/test_sweep.py
TABLE = 'method=kd,crd,ab; student.model=resnet8,cnn_small'


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
  return random_teacher(str(tmp_path_factory.mktemp('table_teacher')), 'resnet8')


def _config(teacher_dir, sweep=TABLE, **overrides):
  overrides.setdefault('epochs', 2)
  cfg = digits_config('resnet8', {'ce': 1.0}, **overrides)
  cfg.teacher.update(model='resnet8', checkpoint=teacher_dir)
  cfg.figures = False
  cfg.sweep = sweep
  cfg.sweep_skip_inapplicable = True  # AB cannot pair cnn_small's single stage with resnet8's three
  cfg.distill.crd.nce_k = 64
  # 5 steps an epoch: few steps keep the students' float32 round-off from growing (XLA:CPU at -O0, the tests'
  # setting, fuses a bigger program's convolutions otherwise than a single student's, and training amplifies it).
  cfg.data.train_examples = 320
  return cfg


@pytest.fixture(scope='module')
def table(teacher_dir, tmp_path_factory):
  work = str(tmp_path_factory.mktemp('table') / 'run')
  return work, train.run(_config(teacher_dir), work)


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL), a, b)


def _assert_close_norm(a, b, rel=1e-3):
  """Each leaf within `rel` of the other in norm: the optimizer's momentum sums gradients whose float32 round-off
  (another fusion of the convolutions' backward pass in a bigger program) is relative to the gradient's scale, not
  to each element's (elements near 0 differ by more than `rtol` of themselves)."""
  def check(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert np.linalg.norm(x - y) <= rel * np.linalg.norm(y) + 1e-9, (np.linalg.norm(x - y), np.linalg.norm(y))
  jax.tree.map(check, a, b)


def _alone(student: sweep_lib.Student, workdir):
  alone = student.cfg
  with alone.unlocked():
    alone.sweep, alone.seeds = '', 1
  return train.run(alone, workdir)


def test_the_groups_of_a_table(table):
  _, out = table
  sweep = out.trainer.sweep
  assert [g.name for g in sweep.groups] == ['method=kd model=resnet8', 'method=kd model=cnn_small',
                                            'method=crd model=resnet8', 'method=crd model=cnn_small',
                                            'method=ab model=resnet8']
  assert [s.values for s in sweep.students][1] == {'method': 'kd', 'student.model': 'cnn_small'}
  assert sweep.skipped[0][0] == {'method': 'ab', 'student.model': 'cnn_small'}
  assert 'student cnn_small, teacher resnet8' in sweep.skipped[0][1]
  # AB's 2-epoch pre-training stage (digits) makes its group 4 epochs long; the program runs the longest.
  assert [g.sweep.base.epochs for g in sweep.groups] == [2, 2, 2, 2, 4] and sweep.base.epochs == 4
  assert sweep.groups[4].sweep.base.distill.init.epochs == 2
  assert isinstance(out.state, step_lib.TableState) and len(out.state.groups) == 5


@pytest.mark.slow
def test_every_student_of_a_table_trains_as_alone(table, tmp_path):
  _, out = table
  sweep, ours = out.trainer.sweep, _host(out.state)
  # kd on the second architecture, CRD (memory bank, sampled negatives) and the staged AB, whose group trains on
  # after the others stopped (their states kept from then on).
  for i in (1, 2, 4):
    alone = _alone(sweep.students[i], str(tmp_path / f'alone{i}'))
    one = step_lib.student(_host(alone.state), 0)
    mine = out.trainer.student_state(ours, i)
    _assert_close(mine.params, one.params)
    _assert_close(mine.state, one.state)  # BatchNorm statistics, CRD's memory banks
    _assert_close_norm(mine.opt_state, one.opt_state)
    assert out['students'][i]['test_accuracy'] == pytest.approx(alone['test_accuracy'], abs=1 / 360 + 1e-9)


def test_records_and_results_of_a_table(table):
  work, out = table
  lines = [json.loads(l) for l in open(os.path.join(work, 'metrics.jsonl'))]
  epochs = [l for l in lines if 'epoch' in l]
  # One record per student per epoch of its own group: the 2-epoch groups stop at 2, AB's goes on to 4.
  assert sorted((l['student'], l['epoch']) for l in epochs) == (
      [(s, e) for s in range(4) for e in (1, 2)] + [(4, e) for e in (1, 2, 3, 4)])
  kd = [l for l in epochs if l['student'] == 0][0]
  assert 'loss_kd' in kd and 'loss_crd' not in kd and 'loss_ab' not in kd
  ab = [l for l in epochs if l['student'] == 4][0]
  assert 'loss_ab' in ab and 'loss_crd' not in ab
  rows = list(csv.DictReader(open(os.path.join(work, 'results.csv'))))
  assert [(r['method'], r['student.model']) for r in rows] == [
      ('kd', 'resnet8'), ('kd', 'cnn_small'), ('crd', 'resnet8'), ('crd', 'cnn_small'), ('ab', 'resnet8')]
  assert [r['epochs'] for r in rows] == ['2', '2', '2', '2', '4']
  for row, s in zip(rows, out['students']):
    assert float(row['last_test_accuracy']) == pytest.approx(s['test_accuracy'])
  saved = json.load(open(os.path.join(work, 'sweep.json')))
  assert [g['epochs'] for g in saved['groups']] == [2, 2, 2, 2, 4]
  assert saved['skipped'][0]['values'] == {'method': 'ab', 'student.model': 'cnn_small'}


@pytest.mark.slow
def test_a_table_resumes_exactly(table, teacher_dir, tmp_path, monkeypatch):
  _, reference = table
  work = str(tmp_path / 'work')
  original = trainer_lib.Trainer.train_chunk
  calls = {'n': 0}

  def interrupted(self, ts, epoch, start):
    calls['n'] += 1
    if calls['n'] == 13:  # 5 steps an epoch: inside the third epoch, after the 2-epoch groups ended
      os.kill(os.getpid(), 15)
    return original(self, ts, epoch, start)

  monkeypatch.setattr(trainer_lib.Trainer, 'train_chunk', interrupted)
  with pytest.raises(errors.Preempted):
    train.run(_config(teacher_dir), work)
  monkeypatch.setattr(trainer_lib.Trainer, 'train_chunk', original)
  meta = ckpt_lib.read_meta(work)
  assert meta['students'] == 5 and not meta['complete'] and 10 < meta['step'] < 15
  resumed = train.run(_config(teacher_dir), work)
  jax.tree.map(np.testing.assert_array_equal, _host(resumed.state), _host(reference.state))
  epochs = [json.loads(l) for l in open(os.path.join(work, 'metrics.jsonl'))]
  epochs = [(l['student'], l['epoch']) for l in epochs if 'epoch' in l]
  assert len(epochs) == len(set(epochs)) == 4 * 2 + 4


@pytest.mark.slow
def test_vmapped_groups_train_as_alone(teacher_dir, tmp_path):
  cfg = _config(teacher_dir, 'method=kd,crd', epochs=1, students_loop='vmap')
  cfg.seeds = 2
  out = train.run(cfg, str(tmp_path / 'vmap'))
  sweep = out.trainer.sweep
  assert [s.name for s in sweep.students] == ['method=kd seed=0', 'method=kd seed=1', 'method=crd seed=0',
                                              'method=crd seed=1']
  assert out.trainer.parts.students_loop == 'vmap'
  alone = _alone(sweep.students[3], str(tmp_path / 'alone'))
  one = step_lib.student(_host(alone.state), 0)
  mine = out.trainer.student_state(_host(out.state), 3)
  _assert_close(mine.params, one.params)
  _assert_close(mine.state, one.state)
  _assert_close_norm(mine.opt_state, one.opt_state)


def test_overrides_per_group():
  cfg = _config('unused', 'method=kd,dkd; student.model=resnet8,cnn_small')
  cfg.sweep_overrides = 'student.model=cnn_small: optimizer.lr=0.01; method=dkd: distill.dkd.beta=2.0'
  sweep = sweep_lib.expand(cfg)
  lr = {g.name: g.sweep.base.optimizer.lr for g in sweep.groups}
  assert lr == {'method=kd model=resnet8': 0.05, 'method=kd model=cnn_small': 0.01,
                'method=dkd model=resnet8': 0.05, 'method=dkd model=cnn_small': 0.01}
  assert sweep.groups[2].sweep.base.distill.dkd.beta == 2.0
  assert dict(sweep.groups[2].sweep.base.distill.losses) == {'ce': 1.0, 'dkd': 1.0}
  # A numeric axis crosses every group: each group is a sweep of its own over it.
  cfg = _config('unused', 'method=kd,dkd; optimizer.lr=0.05,0.1')
  cfg.seeds = 2
  sweep = sweep_lib.expand(cfg)
  assert [g.size for g in sweep.groups] == [4, 4] and sweep.size == 8
  assert sweep.students[5].name == 'method=dkd optimizer.lr=0.05 seed=1'
  assert [s.index for s in sweep.students] == list(range(8))  # numbered across groups, seeds included
  np.testing.assert_allclose(sweep.groups[1].sweep.traced['optimizer.lr'], [0.05, 0.05, 0.1, 0.1])


@pytest.mark.parametrize('sweep, overrides, message', [
    ('method=kd,nosuch', '', "config.sweep.method: unknown method 'nosuch'"),
    ('student.model=resnet8,nosuch', '', "config.sweep.student.model: unknown model 'nosuch'"),
    ('method=kd,dkd,kd', '', "config.sweep.method: 'kd' is given twice"),
    ('method=kd; method=dkd', '', "config.sweep: 'method' is given twice"),
    ('method=; optimizer.lr=0.1', '', 'config.sweep.method is empty: give at least one name'),
    ('student.model', '', "config.sweep: 'student.model' is not 'field=value,value,...'"),
    ('method=kd,dkd; distill.dkd.beta=1,2', '',
     'config.sweep: distill.dkd.beta is an option that the group method=kd does not read'),
    ('method=kd,dkd', 'method=crd: optimizer.lr=0.1', 'config.sweep_overrides: method=crd is not a value'),
    ('method=kd,dkd', 'method=dkd: optimizer.lrr=0.1', "config.sweep_overrides: no such config field 'optimizer.lrr'"),
    ('method=kd,dkd', 'method=dkd: batch_size=32', 'config.sweep_overrides: batch_size is shared by every group'),
    ('method=kd,dkd', 'method=dkd: optimizer.lr=fast', 'config.sweep_overrides: optimizer.lr=fast (for method=dkd) '
     'is not a Python literal'),
    ('optimizer.lr=0.1', 'method=dkd: optimizer.lr=0.1', 'config.sweep_overrides sets fields per method'),
])
def test_bad_tables_are_refused_by_name(sweep, overrides, message):
  cfg = _config('unused', sweep)
  cfg.sweep_overrides = overrides
  with pytest.raises(errors.ConfigError, match='^' + message.replace('(', r'\(').replace(')', r'\)')):
    sweep_lib.expand(cfg)


def test_an_inapplicable_method_is_refused_before_anything_compiles(teacher_dir, tmp_path):
  cfg = _config(teacher_dir)
  cfg.sweep_skip_inapplicable = False
  work = tmp_path / 'refused'
  with pytest.raises(errors.ConfigError, match=r'^config.sweep: method=ab model=cnn_small: ab: .*\(student '
                     r'cnn_small, teacher resnet8\) \(or set config.sweep_skip_inapplicable=true'):
    train.run(cfg, str(work))
  assert not work.exists()


def test_the_api_takes_one_group():
  cfg = _config('unused', 'method=kd,dkd')
  with pytest.raises(errors.ConfigError, match='^config.sweep: method= and student.model= axes make a program'):
    api.init(cfg, None)


def test_table_results_text(table):
  work, _ = table
  text = results.table_text(results.load_run(work))
  lines = text.splitlines()
  assert lines[0].startswith('| method |') and 'resnet8' in lines[0] and 'cnn_small' in lines[0]
  ab = next(l for l in lines if l.startswith('| ab '))
  assert 'n/a' in ab  # AB on cnn_small was left out


@pytest.mark.slow
def test_the_digits_table_config_and_the_report(tmp_path):
  """`configs/cifar100.py:table,resnet32x4,digits` (CI's stand-in of the CIFAR-100 table) runs as one program, and
  the report tool redraws its table."""
  import subprocess
  import sys
  cfg = config_module('cifar100.py').get_config('table,resnet32x4,digits')
  assert cfg.sweep == 'method=ce,kd,dkd,crd,fitnet,ab; student.model=resnet8,cnn_small'
  teacher = random_teacher(str(tmp_path / 'teacher'), 'resnet20')
  with cfg.unlocked():
    cfg.teacher.checkpoint, cfg.epochs, cfg.figures, cfg.tensorboard = teacher, 1, True, False
    # Three of its six methods (the program's compile time grows with its groups; kd and crd train in the table of
    # the tests above): the plain row, a feature method the second student cannot take, the staged one.
    cfg.sweep = 'method=ce,fitnet,ab; student.model=resnet8,cnn_small'
  work = tmp_path / 'table'
  out = train.run(cfg, str(work))
  names = [g.name for g in out.trainer.sweep.groups]
  assert names[:2] == ['method=ce model=resnet8', 'method=ce model=cnn_small'] and len(names) == 4
  assert [v for v, _ in out.trainer.sweep.skipped] == [{'method': 'fitnet', 'student.model': 'cnn_small'},
                                                       {'method': 'ab', 'student.model': 'cnn_small'}]
  text = (work / 'table.md').read_text()
  assert text.startswith('| method | resnet20 → resnet8 | resnet20 → cnn_small |')
  assert text.count('| n/a') == 2
  rows = {l.split(' | ')[0][2:]: l for l in text.splitlines() if l.startswith('| ')}
  assert all('-' not in rows[m].split(' | ')[1] for m in ('ce', 'fitnet', 'ab'))  # resnet8
  assert (work / 'figures' / 'table.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  report = subprocess.run([sys.executable, '-m', 'kdjax.tools.report', str(work), '--out', str(tmp_path / 'out')],
                          capture_output=True, text=True, check=False)
  assert report.returncode == 0, report.stderr
  assert 'resnet20 → cnn_small' in report.stdout and 'n/a' in report.stdout
  assert (tmp_path / 'out' / 'table' / 'table.md').read_text() == text


def test_paper_table_marks_the_best_and_the_published_numbers(tmp_path):
  """The paper-style table from a results history alone: mean ± std over seeds of the best test accuracy, the best
  of each column in bold, RepDistiller's and mdistiller's numbers in parentheses on CIFAR-100."""
  work = tmp_path / 'w'
  work.mkdir()
  students, history = [], []
  acc = {('kd', 'resnet8x4'): (0.73, 0.74), ('dkd', 'resnet8x4'): (0.76, 0.77), ('kd', 'ShuffleV1'): (0.74, 0.75)}
  for (method, model), values in acc.items():
    for seed, a in enumerate(values):
      i = len(students)
      students.append({'index': i, 'name': f'{method} {model} {seed}', 'seed': seed,
                       'values': {'method': method, 'student.model': model}})
      history.append({'epoch': 1, 'student': i, 'test_accuracy': a - 0.01})
      history.append({'epoch': 2, 'student': i, 'test_accuracy': a})
  sweep = {'axes': {'method': ['kd', 'dkd'], 'student.model': ['resnet8x4', 'ShuffleV1']}, 'mode': 'grid',
           'seeds': [0, 1], 'students': students,
           'skipped': [{'values': {'method': 'dkd', 'student.model': 'ShuffleV1'}, 'why': 'test'}]}
  (work / 'sweep.json').write_text(json.dumps(sweep))
  (work / 'metrics.jsonl').write_text('\n'.join(json.dumps(h) for h in history) + '\n')
  (work / 'config.json').write_text(json.dumps({'teacher': {'model': 'resnet32x4'}, 'student': {'model': 'resnet8x4'},
                                                'data': {'name': 'cifar100'}}))
  lines = results.paper_table(results.load_run(str(work))).splitlines()
  assert lines[0] == '| method | resnet32x4 → resnet8x4 | resnet32x4 → ShuffleV1 |'
  assert lines[2] == '| kd | 73.50 ± 0.71 (73.33) | **74.50 ± 0.71** (74.07) |'
  assert lines[3] == '| dkd | **76.50 ± 0.71** (76.32) | n/a (76.45) |'


@pytest.mark.slow
def test_accelerator_benchmark_smoke():
  """benchmarks/accelerator.py --smoke: the accelerator script's code path on the CPU, every row measured."""
  import subprocess
  import sys
  out = subprocess.run([sys.executable, 'benchmarks/accelerator.py', '--smoke'], capture_output=True, text=True,
                       check=False, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.splitlines()
  for row in ('kdjax vs PyTorch eager (KD pair)', 'sweep: students vmapped vs unrolled',
              'table: students vmapped vs unrolled', '4 steps in a rolled scan vs single steps',
              'float32 vs bfloat16 activations', 'teacher-output cache on vs off'):
    line = next(l for l in lines if l.startswith(row))
    assert float(line.split()[-1]) > 0, line  # B / A: both measured
  assert any(l.startswith('auto settings these figures would change: ') for l in lines)


@pytest.mark.slow
def test_a_table_killed_mid_epoch_resumes_bit_identical(tmp_path):
  """launch.py on a table of KD (1 epoch) and AB (its 2-epoch stage first: 3 epochs): SIGKILL inside AB's third
  epoch, after KD's group ended; the rerun resumes from the newest finalized step and ends with every array and
  record of an uninterrupted run, one record per student per epoch of its own group."""
  import signal
  from tests import test_crash_resume as crash
  teacher = random_teacher(str(tmp_path / 'teacher'), 'resnet20')
  run = ['--config=configs/cifar100.py:kd,resnet20,resnet8,digits', "--config.sweep=method=kd,ab",
         f'--config.teacher.checkpoint={teacher}', '--config.epochs=1', '--config.data.train_examples=320',
         '--config.checkpoint_every_epochs=1', '--config.eval_every_epochs=1', *crash.FIGURES_OFF]
  reference = str(tmp_path / 'reference')
  crash._run(run, reference, tmp_path / 'reference.log')
  work = str(tmp_path / 'killed')
  # 5 steps an epoch, one a dispatch: the first dispatch from the 12th on that starts inside an epoch is epoch 3's
  # second step; epoch 1's checkpoint at least is finalized (epoch 2's save waited for it).
  rc, text = crash.Attempt(run, work, tmp_path / 'a1.log', KDJAX_TEST_KILL_MID_EPOCH=12).wait()
  assert rc == -signal.SIGKILL, text[-3000:]
  assert [(r['student'], r['epoch']) for r in crash._epochs(work)] == [(0, 1), (1, 1), (1, 2)]
  expected = crash._finalized(work)[-1]
  assert expected in (5, 10)
  text = crash._run(run, work, tmp_path / 'final.log')
  assert crash._resumed_from(text) == expected
  assert sorted((r['student'], r['epoch']) for r in crash._epochs(work)) == [(0, 1), (1, 1), (1, 2), (1, 3)]
  crash._assert_same_run(work, reference)
