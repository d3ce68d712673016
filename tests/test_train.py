"""The whole loop on real data (digits): teacher training, KD from a frozen teacher, resume, devices, errors."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from kdjax import checkpoint as ckpt_lib
from kdjax import errors
from kdjax import train
from tests.util import digits_config, load_digits_model


def _params(summary):
  return jax.tree.map(np.asarray, jax.device_get(summary['state'].params))


@pytest.fixture
def teacher_run(digits_teacher):
  return digits_teacher


def test_teacher_learns_digits(teacher_run):
  workdir, summary = teacher_run
  assert summary['test_accuracy'] >= 0.95
  # Every test example counted exactly once although 360 is not a multiple of the eval batch (100).
  assert summary['experiment'].evaluate(summary['state'])[0]['test_count'] == 360
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  epochs = [l for l in lines if 'epoch' in l]
  assert [l['epoch'] for l in epochs] == list(range(1, 16))
  assert epochs[-1]['train_loss'] < epochs[0]['train_loss']
  assert 'summary' in lines[-1] and os.path.exists(os.path.join(workdir, 'summary.json'))
  meta = ckpt_lib.read_meta(workdir)
  assert meta['model'] == 'cnn_small' and meta['num_classes'] == 10 and meta['complete']


def test_kd_keeps_teacher_frozen_and_learns(teacher_run, tmp_path):
  teacher_dir, _ = teacher_run
  cfg = digits_config('mlp', {'ce': 0.1, 'kd': 0.9}, epochs=3)
  cfg.teacher.model = 'cnn_small'
  cfg.teacher.checkpoint = teacher_dir
  before = load_digits_model(teacher_dir, 'cnn_small')
  summary = train.train_and_evaluate(cfg, str(tmp_path))
  exp = summary['experiment']
  after_in_memory = jax.tree.map(np.asarray, exp.teacher_vars)
  after_on_disk = load_digits_model(teacher_dir, 'cnn_small')
  for after in (after_in_memory, after_on_disk):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), before, after)
  assert 'batch_stats' in before  # the statistics are compared too, not just the weights
  assert summary['test_accuracy'] > 0.8
  record = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')][0]
  assert {'loss_ce', 'loss_kd'} <= set(record)  # every term's value is logged


def test_teacher_errors(teacher_run, tmp_path):
  teacher_dir, _ = teacher_run
  cfg = digits_config('mlp', {'ce': 0.1, 'kd': 0.9}, epochs=1)
  cfg.teacher.model = 'cnn_small'
  cfg.teacher.checkpoint = str(tmp_path / 'nowhere')
  with pytest.raises(errors.CheckpointNotFoundError, match='nowhere.*does not exist'):
    train.train_and_evaluate(cfg, str(tmp_path / 'a'))

  cfg.teacher.checkpoint = teacher_dir
  cfg.teacher.model = 'mlp'
  with pytest.raises(errors.CheckpointMismatchError, match="holds a 'cnn_small' network, but config.teacher.model "
                     "is 'mlp'"):
    train.train_and_evaluate(cfg, str(tmp_path / 'b'))

  # A cnn_small teacher with 5 classes for a 10-class dataset.
  from kdjax import models
  import jax.numpy as jnp
  m = models.create('cnn_small', num_classes=5)
  variables = m.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  ckpt_lib.save_model(str(tmp_path / 'five'), variables, {'model': 'cnn_small', 'num_classes': 5})
  cfg.teacher.model = 'cnn_small'
  cfg.teacher.checkpoint = str(tmp_path / 'five')
  with pytest.raises(errors.CheckpointMismatchError, match='has 5 classes, but the dataset and config need 10'):
    train.train_and_evaluate(cfg, str(tmp_path / 'c'))


def test_kd_without_teacher_is_rejected(tmp_path):
  cfg = digits_config('mlp', {'ce': 0.1, 'kd': 0.9}, epochs=1)
  with pytest.raises(errors.ConfigError, match=r"\['kd'\] need a teacher"):
    train.train_and_evaluate(cfg, str(tmp_path))
  cfg = digits_config('mlp', {'ce': 0.1, 'kdd': 0.9}, epochs=1)
  with pytest.raises(errors.ConfigError, match=r"unknown loss term\(s\) \['kdd'\]"):
    train.train_and_evaluate(cfg, str(tmp_path / 'b'))


RESUME_CFG = dict(model='mlp', epochs=4, steps_per_dispatch=5)  # 22 steps/epoch: dispatches of 5, the last short


def _interrupt_at_dispatch(monkeypatch, n, action):
  calls = {'n': 0}
  original = train.Experiment.train_chunk

  def chunk(self, ts, epoch, start):
    calls['n'] += 1
    if calls['n'] == n:
      action()
    return original(self, ts, epoch, start)

  monkeypatch.setattr(train.Experiment, 'train_chunk', chunk)


def test_resume_after_sigterm_and_after_crash_matches_uninterrupted(tmp_path, monkeypatch):
  reference = _params(train.train_and_evaluate(digits_config(**RESUME_CFG), str(tmp_path / 'ref')))

  # SIGTERM in the middle of epoch 2: the handler lets the dispatch finish, saves that step and stops cleanly.
  work = str(tmp_path / 'term')
  _interrupt_at_dispatch(monkeypatch, 7, lambda: os.kill(os.getpid(), signal.SIGTERM))
  with pytest.raises(errors.Preempted, match='rerun the same command to resume'):
    train.train_and_evaluate(digits_config(**RESUME_CFG), work)
  # Epoch 1 is 5 dispatches (22 steps); dispatch 7 ends at step 10 of epoch 2.
  assert ckpt_lib.read_meta(work)['step'] == 32
  monkeypatch.undo()
  resumed = _params(train.train_and_evaluate(digits_config(**RESUME_CFG), work))
  jax.tree.map(np.testing.assert_array_equal, reference, resumed)

  # A crash (no handler runs) during epoch 3: the run restarts from the checkpoint at the end of epoch 2.
  work = str(tmp_path / 'crash')

  def crash():
    raise KeyboardInterrupt

  _interrupt_at_dispatch(monkeypatch, 12, crash)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(digits_config(**RESUME_CFG), work)
  assert ckpt_lib.read_meta(work)['step'] == 44
  monkeypatch.undo()
  resumed = _params(train.train_and_evaluate(digits_config(**RESUME_CFG), work))
  jax.tree.map(np.testing.assert_array_equal, reference, resumed)


def test_four_devices_match_one(tmp_path):
  assert jax.device_count() >= 4
  results = {}
  for n in (1, 4):
    cfg = digits_config('cnn_small', epochs=1, num_devices=n)
    results[n] = train.train_and_evaluate(cfg, str(tmp_path / str(n)))
  one, four = (_params(results[n]) for n in (1, 4))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), one, four)
  assert results[1]['test_accuracy'] == pytest.approx(results[4]['test_accuracy'], abs=1 / 360 + 1e-9)
  stats1 = jax.device_get(results[1]['state'].state)
  stats4 = jax.device_get(results[4]['state'].state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), stats1, stats4)
