"""The whole loop on real data (digits): teacher training, KD from a frozen teacher, resume, devices, errors."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from kdjax import checkpoint as ckpt_lib
from kdjax import trainer as trainer_lib
from kdjax import errors
from kdjax import train
from tests.util import digits_config, load_digits_model


def _params(summary):
  return jax.tree.map(np.asarray, jax.device_get(summary.state.params))


@pytest.fixture
def teacher_run(digits_teacher):
  return digits_teacher


def test_teacher_learns_digits(teacher_run):
  workdir, summary = teacher_run
  assert summary['test_accuracy'] >= 0.95
  # Every test example counted exactly once although 360 is not a multiple of the eval batch (100).
  assert summary.trainer.evaluate(summary.state)[0]['test_count'] == 360
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
  summary = train.run(cfg, str(tmp_path))
  exp = summary.trainer
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
    train.run(cfg, str(tmp_path / 'a'))

  cfg.teacher.checkpoint = teacher_dir
  cfg.teacher.model = 'mlp'
  with pytest.raises(errors.CheckpointMismatchError, match="holds a 'cnn_small' network, but config.teacher.model "
                     "is 'mlp'"):
    train.run(cfg, str(tmp_path / 'b'))

  # A cnn_small teacher with 5 classes for a 10-class dataset.
  from kdjax import models
  import jax.numpy as jnp
  m = models.create('cnn_small', num_classes=5)
  variables = m.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  ckpt_lib.save_model(str(tmp_path / 'five'), variables, {'model': 'cnn_small', 'num_classes': 5})
  cfg.teacher.model = 'cnn_small'
  cfg.teacher.checkpoint = str(tmp_path / 'five')
  with pytest.raises(errors.CheckpointMismatchError, match='has 5 classes, but the dataset and config need 10'):
    train.run(cfg, str(tmp_path / 'c'))


def test_kd_without_teacher_is_rejected(tmp_path):
  cfg = digits_config('mlp', {'ce': 0.1, 'kd': 0.9}, epochs=1)
  with pytest.raises(errors.ConfigError, match=r"^config.distill.losses: kd need\(s\) a teacher, but config.teacher.model is empty$"):
    train.run(cfg, str(tmp_path))
  cfg = digits_config('mlp', {'ce': 0.1, 'kdd': 0.9}, epochs=1)
  with pytest.raises(errors.ConfigError, match=r"^config.distill.losses: unknown loss term 'kdd'; known: "):
    train.run(cfg, str(tmp_path / 'b'))


RESUME_CFG = dict(model='mlp', epochs=4, steps_per_dispatch=5)  # 22 steps/epoch: dispatches of 5, the last short


def _interrupt_at_dispatch(monkeypatch, n, action):
  calls = {'n': 0}
  original = trainer_lib.Trainer.train_chunk

  def chunk(self, ts, epoch, start):
    calls['n'] += 1
    if calls['n'] == n:
      action()
    return original(self, ts, epoch, start)

  monkeypatch.setattr(trainer_lib.Trainer, 'train_chunk', chunk)


def test_resume_after_sigterm_and_after_crash_matches_uninterrupted(tmp_path, monkeypatch):
  reference = _params(train.run(digits_config(**RESUME_CFG), str(tmp_path / 'ref')))

  # SIGTERM in the middle of epoch 2: the handler lets the dispatch finish, saves that step and stops cleanly.
  work = str(tmp_path / 'term')
  _interrupt_at_dispatch(monkeypatch, 7, lambda: os.kill(os.getpid(), signal.SIGTERM))
  with pytest.raises(errors.Preempted, match='rerun the same command to resume'):
    train.run(digits_config(**RESUME_CFG), work)
  # Epoch 1 is 5 dispatches (22 steps); dispatch 7 ends at step 10 of epoch 2.
  assert ckpt_lib.read_meta(work)['step'] == 32
  monkeypatch.undo()
  resumed = _params(train.run(digits_config(**RESUME_CFG), work))
  jax.tree.map(np.testing.assert_array_equal, reference, resumed)

  # A crash during epoch 3: the run restarts from the checkpoint at the end of epoch 2. (An exception: the run's
  # `finally` still runs. SIGKILLs of real processes: tests/test_crash_resume.py.)
  work = str(tmp_path / 'crash')

  def crash():
    raise KeyboardInterrupt

  _interrupt_at_dispatch(monkeypatch, 12, crash)
  with pytest.raises(KeyboardInterrupt):
    train.run(digits_config(**RESUME_CFG), work)
  assert ckpt_lib.read_meta(work)['step'] == 44
  monkeypatch.undo()
  resumed = _params(train.run(digits_config(**RESUME_CFG), work))
  jax.tree.map(np.testing.assert_array_equal, reference, resumed)


@pytest.mark.slow
def test_four_devices_match_one(tmp_path):
  assert jax.device_count() >= 4
  results = {}
  for n in (1, 4):
    cfg = digits_config('cnn_small', epochs=1, num_devices=n)
    results[n] = train.run(cfg, str(tmp_path / str(n)))
  one, four = (_params(results[n]) for n in (1, 4))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), one, four)
  assert results[1]['test_accuracy'] == pytest.approx(results[4]['test_accuracy'], abs=1 / 360 + 1e-9)
  stats1 = jax.device_get(results[1].state.state)
  stats4 = jax.device_get(results[4].state.state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), stats1, stats4)


def test_four_devices_match_one_step_by_step_at_8_images_per_device():
  """Each step on 4 devices is the 1-device step to round-off, at 8 images per device, and the BatchNorm running
  mean is the global batch mean (NumPy), not a per-device one. (Over many steps round-off may still grow: a ReLU /
  max-pool network is piecewise, and a 1-device run nudged by 1e-7 diverges from itself as much; README "Devices".)"""
  from kdjax import data as data_lib
  from kdjax import step as step_lib
  from kdjax.data import device as device_data
  assert jax.device_count() >= 4
  states = {}
  for n in (1, 4):
    cfg = digits_config('cnn_small', epochs=1, num_devices=n, batch_size=32)
    exp = trainer_lib.build(cfg, data_lib.load(cfg.data))
    ts = exp.init_state()
    init = jax.device_get(ts.params)
    for s in range(2):
      ts, _ = exp.train_chunk(ts, 0, s)
      states[n, s] = jax.device_get((ts.params, ts.state))
  for s in range(2):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), states[1, s], states[4, s])
  # Step 1's BatchNorm_0 running mean (Flax: 0.9 * 0 + 0.1 * batch mean) against the batch mean of the first conv.
  ds = exp.ds
  idx = np.asarray(device_data.epoch_permutation(exp.source.data_rng, 0, len(ds.train)))[:32]
  x = (ds.train.images[idx].astype(np.float64) / 255.0 - np.asarray(ds.mean)) / np.asarray(ds.std)  # [32, 8, 8, 1]
  kernel = np.asarray(init['student']['backbone']['Conv_0']['kernel'][0], np.float64)  # [3, 3, 1, C]
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  conv = sum(np.einsum('nhwi,io->nhwo', xp[:, i:i + 8, j:j + 8], kernel[i, j]) for i in range(3) for j in range(3))
  global_mean = 0.1 * conv.mean(axis=(0, 1, 2))
  per_device = 0.1 * conv.reshape(4, 8, 8, 8, -1).mean(axis=(1, 2, 3))
  assert np.max(np.abs(per_device - global_mean)) > 1e-3  # the check tells a per-device mean apart
  for n in (1, 4):
    mean = states[n, 0][1]['student']['batch_stats']['backbone']['BatchNorm_0']['mean'][0]
    np.testing.assert_allclose(mean, global_mean, rtol=0, atol=1e-6)


def _epoch_records(workdir):
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert 'summary' in lines[-1] and sum('summary' in l for l in lines) == 1
  return [l for l in lines if 'epoch' in l]


@pytest.mark.slow
def test_records_are_written_once_per_epoch_whatever_the_interruptions(tmp_path, monkeypatch):
  ref_dir = str(tmp_path / 'ref')
  train.run(digits_config(**RESUME_CFG), ref_dir)
  reference = _epoch_records(ref_dir)

  # SIGTERM mid-epoch 2, then a crash after epoch 3's record was written but before its checkpoint was saved.
  work = str(tmp_path / 'work')
  _interrupt_at_dispatch(monkeypatch, 7, lambda: os.kill(os.getpid(), signal.SIGTERM))
  with pytest.raises(errors.Preempted):
    train.run(digits_config(**RESUME_CFG), work)
  monkeypatch.undo()
  original_save = ckpt_lib.Checkpointer.save

  def save(self, step, *args, **kw):
    if step == 66:
      raise KeyboardInterrupt  # killed between the record and the checkpoint
    return original_save(self, step, *args, **kw)

  monkeypatch.setattr(ckpt_lib.Checkpointer, 'save', save)
  with pytest.raises(KeyboardInterrupt):
    train.run(digits_config(**RESUME_CFG), work)
  monkeypatch.undo()
  assert [r['epoch'] for r in _epoch_records_partial(work)] == [1, 2, 3]  # epoch 3 recorded, not checkpointed
  train.run(digits_config(**RESUME_CFG), work)
  records = _epoch_records(work)
  assert [r['epoch'] for r in records] == [1, 2, 3, 4]
  for ours, ref in zip(records, reference):
    # Epoch 2 was cut by the SIGTERM: its train metrics still cover the whole epoch (partial sums checkpointed).
    for key in ('train_loss', 'train_accuracy', 'loss_ce', 'test_accuracy'):
      assert ours[key] == pytest.approx(ref[key], rel=1e-5), (ours['epoch'], key)


def _epoch_records_partial(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl')) if '"epoch"' in l]


def test_nonfinite_loss_stops_a_run_and_saves_nothing_after(tmp_path):
  cfg = digits_config('mlp', epochs=2, optimizer__lr=1e6)
  with pytest.raises(errors.NonFiniteError, match=r'^training diverged: non-finite loss term\(s\) ce at step \d+ '
                                                  r'\(epoch 1\); nothing was saved after the last good checkpoint '
                                                  r'\(step None\)'):
    train.run(cfg, str(tmp_path))
  assert ckpt_lib.Checkpointer(str(tmp_path)).latest_step() is None


def test_a_diverging_student_of_a_sweep_is_frozen_and_the_others_train(tmp_path, caplog):
  cfg = digits_config('mlp', epochs=2)
  cfg.sweep = 'optimizer.lr=0.05,1e6'
  with caplog.at_level('WARNING'):
    summary = train.run(cfg, str(tmp_path))
  params = _params(summary)
  assert all(np.isfinite(a).all() for a in jax.tree.leaves(params))
  good, bad = summary['students']
  assert good['test_accuracy'] > 0.8 and np.isfinite(bad['test_accuracy'])
  # The warning names the student and the step; it diverged in epoch 1 ...
  warnings = [r.getMessage() for r in caplog.records if 'diverged' in r.getMessage()]
  assert len(warnings) == 1, warnings
  assert warnings[0].startswith("student 'optimizer.lr=1e+06' diverged: ") and 'trains no further' in warnings[0]
  step = int(warnings[0].split(' at step ')[1].split(';')[0])
  epoch_end = summary.trainer.steps_per_epoch
  assert 1 <= step <= epoch_end
  # ... so its parameters at the end of epoch 1 are its final ones, while the other student trained on.
  ckpt = ckpt_lib.open_for_reading(str(tmp_path))
  try:
    at_epoch_1 = jax.tree.map(np.asarray, ckpt.restore(epoch_end, ckpt_lib.abstract(summary.state)).params)
  finally:
    ckpt.close()
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[1], b[1]), at_epoch_1, params)
  assert not np.array_equal(at_epoch_1['student']['head']['kernel'][0], params['student']['head']['kernel'][0])


def test_a_second_process_on_the_same_workdir_is_refused(tmp_path):
  with train.workdir_lock(str(tmp_path)):
    with pytest.raises(errors.WorkdirInUse, match=rf'^workdir {tmp_path} is in use by process {os.getpid()} '):
      train.run(digits_config('mlp', epochs=1), str(tmp_path))
  assert not os.path.exists(tmp_path / 'config.json')
  with pytest.raises(errors.ConfigError, match='^--workdir is empty'):
    train.run(digits_config('mlp', epochs=1), '')


@pytest.mark.slow
def test_resuming_with_another_config_is_refused_by_field(tmp_path):
  work = str(tmp_path / 'run')
  train.run(digits_config('mlp', epochs=1), work)
  before = {p: open(os.path.join(work, p), 'rb').read() for p in ('config.json', 'metrics.jsonl')}
  changed = digits_config('mlp', epochs=1, batch_size=32, optimizer__lr=0.1)
  with pytest.raises(errors.ConfigError, match=r"^\S+ holds a run with another config \(batch_size: 64 -> 32; "
                                               r"optimizer.lr: 0.05 -> 0.1\); resume it with its own config"):
    train.run(changed, work)
  assert before == {p: open(os.path.join(work, p), 'rb').read() for p in before}  # nothing rewritten
  # More epochs may change: the run goes on from its checkpoint.
  longer = train.run(digits_config('mlp', epochs=2), work)
  assert [r['epoch'] for r in _epoch_records(work)] == [1, 2] and longer['test_accuracy'] > 0.8
  # --restart sets the old run aside and starts anew.
  train.run(changed, work, restart=True)
  aside = [n for n in os.listdir(work) if n.startswith('previous-')]
  assert len(aside) == 1
  old = json.load(open(os.path.join(work, aside[0], 'config.json')))
  assert (old['batch_size'], old['epochs']) == (64, 2)  # the resumed run's record, moved, not deleted
  assert json.load(open(os.path.join(work, 'config.json')))['batch_size'] == 32


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, caplog):
  work = str(tmp_path / 'run')
  reference = _params(train.run(digits_config('mlp', epochs=3), str(tmp_path / 'ref')))
  train.run(digits_config('mlp', epochs=3), work)
  latest = os.path.join(work, 'checkpoints', '66', 'state')
  files = [os.path.join(d, f) for d, _, fs in os.walk(latest) for f in fs]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, 'r+b') as f:  # a save cut short: the array data truncated
    f.truncate(os.path.getsize(biggest) // 3)
  caplog.set_level('WARNING')
  resumed = _params(train.run(digits_config('mlp', epochs=3), work))
  assert any('checkpoint step 66' in r.getMessage() and 'is damaged' in r.getMessage() for r in caplog.records)
  jax.tree.map(np.testing.assert_array_equal, reference, resumed)  # epoch 3 redone from step 44: the same run
  assert [n for n in os.listdir(os.path.join(work, 'checkpoints')) if n.startswith('damaged-66-')]
  assert [r['epoch'] for r in _epoch_records(work)] == [1, 2, 3]


@pytest.mark.slow
def test_a_damaged_cached_teacher_is_set_aside_and_trained_again(tmp_path, caplog):
  cfg = digits_config('mlp', {'ce': 0.1, 'kd': 0.9}, epochs=1)
  cfg.teacher.update(model='mlp', kwargs={'hidden': (16,)}, cache_dir=str(tmp_path / 'cache'), recipe={'epochs': 1})
  train.run(cfg, str(tmp_path / 'a'))
  (cached,) = os.listdir(tmp_path / 'cache')
  state = tmp_path / 'cache' / cached / 'checkpoints' / '22' / 'state'
  for d, _, fs in os.walk(state):
    for f in fs:
      if os.path.getsize(os.path.join(d, f)) > 1000:
        open(os.path.join(d, f), 'r+b').truncate(100)
  caplog.set_level('WARNING')
  summary = train.run(cfg, str(tmp_path / 'b'))
  assert any('is damaged' in r.getMessage() and 'trained again' in r.getMessage() for r in caplog.records)
  assert sorted(n.split('.damaged-')[0] for n in os.listdir(tmp_path / 'cache')) == [cached, cached]
  assert ckpt_lib.read_meta(str(tmp_path / 'cache' / cached))['complete']  # the new teacher, finished
  assert np.isfinite(summary['test_accuracy'])


@pytest.mark.slow
def test_an_unfinished_explicit_teacher_is_refused(tmp_path, monkeypatch):
  teacher = str(tmp_path / 'teacher')
  _interrupt_at_dispatch(monkeypatch, 30, lambda: os.kill(os.getpid(), signal.SIGTERM))
  with pytest.raises(errors.Preempted):
    train.run(digits_config('mlp', epochs=2), teacher)
  monkeypatch.undo()
  cfg = digits_config('mlp', {'ce': 0.1, 'kd': 0.9}, epochs=1)
  cfg.teacher.update(model='mlp', kwargs={'hidden': (32,)}, checkpoint=teacher)
  with pytest.raises(errors.CheckpointMismatchError, match=rf'^teacher checkpoint {teacher} is an unfinished run '
                                                           r'\(step 30 of 44\)'):
    train.run(cfg, str(tmp_path / 's'))
  cfg.teacher.accept_incomplete = True
  assert train.run(cfg, str(tmp_path / 's'))['test_accuracy'] > 0.5


@pytest.mark.slow
def test_a_run_from_before_a_new_config_field_still_resumes(tmp_path):
  work = str(tmp_path / 'run')
  train.run(digits_config('mlp', epochs=1), work)
  saved = json.load(open(os.path.join(work, 'config.json')))
  del saved['teacher']['accept_incomplete']  # as written by a kdjax that had no such field
  json.dump(saved, open(os.path.join(work, 'config.json'), 'w'))
  assert train.run(digits_config('mlp', epochs=2), work)['test_accuracy'] > 0.8


def test_teacher_cache_key_reads_only_the_teacher_recipe(monkeypatch):
  """Fields added to the schema later (another method's options, a new switch) and student-side settings keep a
  cached teacher's key; a change to what the teacher trains with does not."""
  from kdjax import config_lib
  from kdjax import teacher as teacher_lib
  base = digits_config('cnn_small', {'ce': 1.0, 'kd': 1.0})
  base.teacher.model = 'cnn_small'
  key = teacher_lib.cache_dir(base, 'digits')
  schema = config_lib.base

  def grown():
    c = schema()
    c.distill.new_method = {'weight': 3.0}
    c.new_switch = 'auto'
    return c

  monkeypatch.setattr(config_lib, 'base', grown)
  assert teacher_lib.cache_dir(base, 'digits') == key
  monkeypatch.setattr(config_lib, 'base', schema)
  student_side = base.copy_and_resolve_references()
  student_side.distill.temperature = 8.0
  student_side.distill.dkd.beta = 2.0
  student_side.students_loop = 'vmap'
  assert teacher_lib.cache_dir(student_side, 'digits') == key
  for change in ({'optimizer': {'lr': 0.01}}, {'epochs': 7}, {'distill': {'label_smoothing': 0.1}}):
    other = base.copy_and_resolve_references()
    other.teacher.recipe = change
    assert teacher_lib.cache_dir(other, 'digits') != key, change
  other = base.copy_and_resolve_references()
  other.teacher.seed = 1
  assert teacher_lib.cache_dir(other, 'digits') != key
