"""Sweeps: many students in one program train exactly as each would alone; devices, resume, the teacher-output cache,
results and every refusal."""

import csv
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from kdjax import checkpoint as ckpt_lib
from kdjax import trainer as trainer_lib
from kdjax import config_lib
from kdjax import errors
from kdjax import step as step_lib
from kdjax import memory
from kdjax import sweep as sweep_lib
from kdjax import train
from tests.util import digits_config, random_teacher

# float32 round-off: a vmapped step batches the same arithmetic differently from the single one.
RTOL, ATOL = 2e-5, 2e-6


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
  return random_teacher(str(tmp_path_factory.mktemp('sweep_teacher')), 'cnn_small')


def _kd_config(teacher_dir, losses=None, **overrides):
  # A student with dropout, and CRD: extra trainable heads, memory banks (state) and sampled negatives.
  overrides.setdefault('epochs', 1)
  cfg = digits_config('mlp', losses or {'ce': 0.5, 'kd': 0.5, 'crd': 0.8}, **overrides)
  cfg.student.kwargs = {'hidden': (32,), 'dropout': 0.2}
  cfg.teacher.update(model='cnn_small', checkpoint=teacher_dir)
  cfg.distill.crd.nce_k = 64
  cfg.figures = False
  return cfg


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL), a, b)


def _single(cfg, student: sweep_lib.Student, workdir):
  """Student `student` of a sweep, trained alone: its own config, the sweep's data seed."""
  alone = student.cfg
  with alone.unlocked():
    alone.sweep, alone.seeds, alone.students_loop = '', 1, 'auto'
  return train.run(alone, workdir)


@pytest.mark.parametrize('loop', ['unroll', pytest.param('vmap', marks=pytest.mark.slow)])
def test_every_student_trains_exactly_as_alone(teacher_dir, tmp_path, loop):
  """An MLP student with dropout and CRD (its memory bank is state), unrolled (the CPU's choice) and vmapped."""
  cfg = _kd_config(teacher_dir)
  cfg.sweep = 'distill.temperature=2,4; optimizer.lr=0.05,0.1'
  cfg.sweep_mode = 'zip'
  cfg.seeds = 2
  cfg.students_loop = loop
  summary = train.run(cfg, str(tmp_path / 'sweep'))
  assert summary.trainer.parts.students_loop == loop
  sweep = summary.trainer.sweep
  assert [s.name for s in sweep.students] == [
      'distill.temperature=2 optimizer.lr=0.05 seed=0', 'distill.temperature=2 optimizer.lr=0.05 seed=1',
      'distill.temperature=4 optimizer.lr=0.1 seed=0', 'distill.temperature=4 optimizer.lr=0.1 seed=1']
  stacked = _host(summary.state)
  for i in (0, 3):  # the first, and the one differing in every swept value and the seed
    alone = _single(cfg, sweep.students[i], str(tmp_path / f'alone{i}'))
    one = step_lib.student(_host(alone.state), 0)
    ours = step_lib.student(stacked, i)
    _assert_close(ours.params, one.params)                   # student + CRD heads
    _assert_close(ours.state, one.state)                     # BatchNorm-free MLP: CRD memory banks
    _assert_close(ours.opt_state, one.opt_state)
    assert summary['students'][i]['test_accuracy'] == pytest.approx(alone['test_accuracy'], abs=1 / 360 + 1e-9)
  # The students really differ (different seeds and hyperparameters).
  p = stacked.params['student']['head']['kernel']
  assert not np.allclose(p[0], p[1]) and not np.allclose(p[0], p[2])


@pytest.mark.slow
def test_a_batchnorm_conv_student_trains_as_alone_vmapped_and_unrolled(teacher_dir, tmp_path):
  """A tiny conv student with BatchNorm: its parameters, running statistics and optimizer state in a sweep, vmapped
  and unrolled, are those of the same student trained alone."""
  cfg = _kd_config(teacher_dir, {'ce': 0.5, 'kd': 0.5})
  cfg.student.model, cfg.student.kwargs = 'cnn_small', {'channels': (4, 8), 'hidden': (16,)}
  cfg.sweep, cfg.sweep_mode = 'distill.temperature=2,4; optimizer.lr=0.05,0.1', 'zip'
  runs = {}
  for loop in ('vmap', 'unroll'):
    cfg.students_loop = loop
    summary = train.run(cfg, str(tmp_path / loop))
    assert summary.trainer.parts.students_loop == loop
    runs[loop] = (summary, step_lib.student(_host(summary.state), 1))
  alone = _single(cfg, runs['vmap'][0].trainer.sweep.students[1], str(tmp_path / 'alone'))
  one = step_lib.student(_host(alone.state), 0)
  stats = one.state['student']['batch_stats']
  assert len(jax.tree.leaves(stats)) == 4  # mean and var of both BatchNorm layers
  for loop, (summary, ours) in runs.items():
    _assert_close(ours.params, one.params)
    _assert_close(ours.state, one.state)  # the BatchNorm running statistics
    _assert_close(ours.opt_state, one.opt_state)
    assert summary['students'][1]['test_accuracy'] == pytest.approx(alone['test_accuracy'], abs=1 / 360 + 1e-9)
  # The statistics moved from their initial values (mean 0, var 1): the comparison is of trained ones.
  assert not np.allclose(jax.tree.leaves(stats)[0], 0.0)


@pytest.mark.slow
def test_sweep_on_four_devices_matches_one(teacher_dir, tmp_path):
  def run(num_devices, mesh_students, name):
    cfg = _kd_config(teacher_dir, {'ce': 0.5, 'kd': 0.5}, num_devices=num_devices)
    cfg.sweep = 'distill.temperature=2,4; optimizer.lr=0.05,0.1'
    cfg.mesh_students = mesh_students
    s = train.run(cfg, str(tmp_path / name))
    assert s.trainer.mesh.devices.shape == (mesh_students or 1, num_devices // (mesh_students or 1))
    return _host(s.state.params)

  one = run(1, 0, 'one')
  _assert_close(run(4, 4, 'students4'), one)  # every device trains its own student
  _assert_close(run(4, 2, 'grid2x2'), one)    # 2 students x 2 batch halves


@pytest.mark.slow
def test_teacher_cache_gives_the_same_students(teacher_dir, tmp_path):
  def run(mode):
    cfg = _kd_config(teacher_dir, {'ce': 0.5, 'kd': 0.5})
    cfg.distill.cache_teacher = mode
    s = train.run(cfg, str(tmp_path / mode))
    table = s.trainer.teacher_table
    assert (table is not None) == (mode == 'on')
    if table is not None:  # KD reads the logits alone: the feature maps are not kept
      assert [a.shape for a in table if a is not None] == [(1437, 10)]
    return _host(s.state.params)

  _assert_close(run('on'), run('off'))


@pytest.mark.slow
def test_sweep_resumes_exactly(teacher_dir, tmp_path, monkeypatch):
  def cfg():
    c = _kd_config(teacher_dir, {'ce': 0.5, 'kd': 0.5}, epochs=2)
    c.sweep = 'distill.temperature=2,4'
    return c

  reference = _host(train.run(cfg(), str(tmp_path / 'ref')).state.params)
  work = str(tmp_path / 'work')
  original = trainer_lib.Trainer.train_chunk
  calls = {'n': 0}

  def interrupted(self, ts, epoch, start):
    calls['n'] += 1
    if calls['n'] == 30:  # mid second epoch
      os.kill(os.getpid(), 15)
    return original(self, ts, epoch, start)

  monkeypatch.setattr(trainer_lib.Trainer, 'train_chunk', interrupted)
  with pytest.raises(errors.Preempted):
    train.run(cfg(), work)
  monkeypatch.setattr(trainer_lib.Trainer, 'train_chunk', original)
  assert ckpt_lib.read_meta(work)['students'] == 2 and not ckpt_lib.read_meta(work)['complete']
  resumed = train.run(cfg(), work)
  jax.tree.map(np.testing.assert_array_equal, _host(resumed.state.params), reference)
  rows = list(csv.DictReader(open(os.path.join(work, 'results.csv'))))
  assert [r['distill.temperature'] for r in rows] == ['2', '4'] and all(r['epochs'] == '2' for r in rows)


@pytest.mark.slow
def test_results_files(teacher_dir, tmp_path):
  cfg = _kd_config(teacher_dir, {'ce': 0.5, 'kd': 0.5}, epochs=2)
  config_lib.alpha_losses(cfg, 0.5)
  cfg.sweep = 'alpha=0.1,0.9'
  cfg.seeds = 2
  cfg.figures = True
  work = tmp_path / 'res'
  summary = train.run(cfg, str(work))
  sweep = summary.trainer.sweep
  # alpha is tied to both weights: the step reads them as arrays.
  np.testing.assert_allclose(sweep.traced['distill.losses.kd'], [0.1, 0.1, 0.9, 0.9])
  np.testing.assert_allclose(sweep.traced['distill.losses.ce'], [0.9, 0.9, 0.1, 0.1])
  lines = [json.loads(l) for l in open(work / 'metrics.jsonl')]
  epochs = [l for l in lines if 'epoch' in l]
  assert sorted((l['epoch'], l['student']) for l in epochs) == [(e, s) for e in (1, 2) for s in range(4)]
  last = {l['student']: l for l in epochs if l['epoch'] == 2}
  for i, s in enumerate(summary['students']):  # each student's record is its own evaluation
    assert last[i]['test_accuracy'] == pytest.approx(s['test_accuracy']) and 'test_agreement' in last[i]
  rows = list(csv.DictReader(open(work / 'results.csv')))
  assert [(r['alpha'], r['seed']) for r in rows] == [('0.1', '0'), ('0.1', '1'), ('0.9', '0'), ('0.9', '1')]
  for row, s in zip(rows, summary['students']):
    assert float(row['last_test_accuracy']) == pytest.approx(s['test_accuracy'])
  for name in ('sweep.png', 'curves.png'):
    assert (work / 'figures' / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert json.load(open(work / 'summary.json'))['num_students'] == 4


@pytest.mark.parametrize('sweep, message', [
    ('batch_size=32,64', "config.sweep: 'batch_size' changes shapes or code and cannot be swept"),
    ('student.model=1,2', "config.sweep.student.model: unknown model '1'"),
    ('distill.simkd.factor=1,2', "config.sweep: 'distill.simkd.factor' changes shapes or code"),
    ('distill.dkd.warmup_epochs=1,2', "config.sweep: 'distill.dkd.warmup_epochs' changes shapes or code"),
    ('optimizr.lr=0.1', "config.sweep: no such config field 'optimizr.lr'"),
    ('alpha=', 'config.sweep.alpha is empty'),
    ('distill.temperature=1,hot', "config.sweep.distill.temperature: values must be numbers, got 'hot'"),
    ('seed=0,1.5', 'config.sweep.seed: seeds must be integers'),
    ('distill.temperature', "config.sweep: 'distill.temperature' is not 'field=value,value,...'"),
    ('optimizer.lr=0.1; optimizer.lr=0.2', "config.sweep: 'optimizer.lr' is given twice"),
])
def test_bad_sweeps_are_refused_by_name(sweep, message):
  cfg = digits_config('mlp', {'ce': 0.1, 'kd': 0.9})
  cfg.teacher.model = 'cnn_small'
  config_lib.alpha_losses(cfg, 0.9)
  cfg.sweep = sweep
  with pytest.raises(errors.ConfigError) as e:
    sweep_lib.expand(cfg)
  assert str(e.value).startswith(message) and '\n' not in str(e.value)


def test_other_sweep_refusals():
  cfg = digits_config('mlp')
  cfg.sweep, cfg.sweep_mode = 'optimizer.lr=0.1,0.2; optimizer.momentum=0.9', 'zip'
  with pytest.raises(errors.ConfigError, match=r"^config.sweep_mode='zip' needs axes of one length, got "
                                               r'optimizer.lr: 2, optimizer.momentum: 1$'):
    sweep_lib.expand(cfg)
  cfg.sweep_mode = 'diagonal'
  with pytest.raises(errors.ConfigError, match=r"^config.sweep_mode must be 'grid' or 'zip'"):
    sweep_lib.expand(cfg)
  cfg.sweep_mode, cfg.sweep, cfg.seeds = 'grid', 'seed=1,2', 3
  with pytest.raises(errors.ConfigError, match='both set the seeds'):
    sweep_lib.expand(cfg)
  cfg.sweep, cfg.seeds = '', 0
  with pytest.raises(errors.ConfigError, match=r'^config.seeds must be an integer >= 1, got 0$'):
    sweep_lib.expand(cfg)
  # The options of a method the losses do not use are not read by the step either.
  cfg.seeds, cfg.sweep = 1, 'distill.dkd.beta=1,2'
  with pytest.raises(errors.ConfigError, match="'distill.dkd.beta' changes shapes or code"):
    sweep_lib.expand(cfg)
  cfg.distill.losses = {'ce': 1.0, 'dkd': 1.0}
  assert list(sweep_lib.expand(cfg).traced) == ['distill.dkd.beta']


def test_a_sweep_too_large_for_memory_is_refused_before_training(teacher_dir, tmp_path, monkeypatch):
  cfg = _kd_config(teacher_dir, {'ce': 0.5, 'kd': 0.5})
  cfg.sweep = 'distill.temperature=2,4'
  monkeypatch.setattr(memory, 'available', lambda n, budget=0.0: 1 << 16)  # a 64 KiB device
  with pytest.raises(errors.ConfigError, match=r'^the sweep of 2 students needs about [0-9.]+ GiB per device '
                                               r'\(train state .* but 0.00 GiB are available'):
    train.run(cfg, str(tmp_path))
  assert not os.path.exists(tmp_path / 'checkpoints' / '0') and not os.path.exists(tmp_path / 'metrics.jsonl')


@pytest.mark.slow
def test_launch_refuses_a_bad_sweep_in_one_line(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, 'launch.py', '--config=configs/kd_cifar10.py:digits',
                         f'--workdir={tmp_path}', '--config.sweep=batch_size=32,64'],
                        cwd=root, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  errors_out = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert errors_out == ["error: config.sweep: 'batch_size' changes shapes or code and cannot be swept (one program "
                        'serves the sweep); sweepable here: distill.label_smoothing, distill.losses.ce, '
                        'distill.losses.kd, distill.temperature, optimizer.lr, optimizer.momentum, '
                        'optimizer.weight_decay, schedule.length_epochs, seed']
  assert not os.path.exists(tmp_path / 'config.json')  # refused before anything was written
  assert 'Traceback' not in proc.stderr


@pytest.mark.slow
def test_vmapped_and_unrolled_students_agree(teacher_dir, tmp_path):
  # The accelerators batch the students with vmap; the CPU unrolls them. Both are the same computation.
  def run(loop):
    cfg = _kd_config(teacher_dir)
    cfg.sweep, cfg.students_loop = 'distill.temperature=2,4; optimizer.momentum=0.5,0.9', loop
    s = train.run(cfg, str(tmp_path / loop))
    assert s.trainer.parts.students_loop == loop
    return _host(s.state)

  vmapped, unrolled = run('vmap'), run('unroll')
  _assert_close(vmapped.params, unrolled.params)
  _assert_close(vmapped.state, unrolled.state)
