"""Crashes of real processes: launch.py runs killed with SIGKILL (no handler, no `finally`, no wait for Orbax's
asynchronous save) at chosen moments, then rerun to the end: each rerun resumes from the newest finalized checkpoint,
and the last one ends exactly as an uninterrupted run (every saved array equal, one record per epoch).

The moments are placed, not drawn at random (tests/crash_driver.py): once an epoch is recorded in metrics.jsonl;
inside a checkpoint write (its files written to Orbax's temporary directory, not yet renamed); mid-epoch (at the
start of a dispatch that is not an epoch's first). Device-resident data and the streaming pipeline both."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, 'tests', 'crash_driver.py')
FIGURES_OFF = ['--config.figures=false', '--config.tensorboard=false']
# 12 epochs of 22 steps, a checkpoint and an evaluation each epoch: time for three crashes in one run.
DEVICE_RUN = ['--config=configs/teacher.py:mlp,digits', '--config.epochs=12', '--config.checkpoint_every_epochs=1',
              '--config.eval_every_epochs=1', *FIGURES_OFF]
TIMEOUT = 300


def _env(**extra):
  env = dict(os.environ, **extra)
  env.pop('JAX_PLATFORMS', None)
  env.pop('XLA_FLAGS', None)  # one CPU device at XLA's default level, as a user's run
  # Relaunches share compiled programs, as a user's relaunches would with a compilation cache.
  env['JAX_COMPILATION_CACHE_DIR'] = os.path.join(os.environ.get('TMPDIR', '/tmp'), 'kdjax_test_jax_cache')
  return env


_STARTED = []


@pytest.fixture(autouse=True)
def _no_process_left():
  """Whatever a test ends with, none of its runs lives on (one waiting in a stopped save would, forever)."""
  yield
  while _STARTED:
    proc = _STARTED.pop()
    if proc.poll() is None:
      proc.kill()
      proc.wait()


class Attempt:
  """One run of launch.py (through the driver, which places a fault when told) with its log in a file."""

  def __init__(self, args, workdir, log, **faults):
    self.log_path = log
    self.log = open(log, 'w')
    self.proc = subprocess.Popen([sys.executable, DRIVER, *args, f'--workdir={workdir}'], cwd=ROOT,
                                 env=_env(**{k: str(v) for k, v in faults.items()}), stdout=self.log,
                                 stderr=subprocess.STDOUT)
    _STARTED.append(self.proc)

  def wait(self, timeout=TIMEOUT):
    try:
      self.proc.wait(timeout=timeout)
    finally:
      if self.proc.poll() is None:
        self.proc.kill()
        self.proc.wait()
      self.log.close()
    return self.proc.returncode, open(self.log_path).read()

  def until(self, ready, what, timeout=TIMEOUT):
    """Polls `ready()` until true; fails naming `what` if the run ends or `timeout` passes first."""
    end = time.time() + timeout
    while not ready():
      if self.proc.poll() is not None or time.time() > end:
        self.wait(1)
        pytest.fail(f'{what} never happened (exit {self.proc.returncode}):\n{open(self.log_path).read()[-3000:]}')
      time.sleep(0.01)

  def kill(self):
    assert self.proc.poll() is None, 'the run ended before its kill'
    self.proc.send_signal(signal.SIGKILL)
    rc, text = self.wait()
    assert rc == -signal.SIGKILL, text[-3000:]
    return text


def _alive(pid):
  try:
    return open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[0] != 'Z'
  except OSError:
    return False


def _run(args, workdir, log):
  rc, text = Attempt(args, workdir, log).wait()
  assert rc == 0, text[-3000:]
  return text


def _finalized(workdir):
  """The finalized checkpoint steps (Orbax renames a step's directory to its number once it is complete)."""
  path = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(path) if n.isdigit()) if os.path.isdir(path) else []


def _epochs(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  return [json.loads(l) for l in open(path).read().splitlines() if '"epoch"' in l]


def _recorded(workdir):
  """Whether a whole epoch record is in metrics.jsonl (read while the run writes it: a line may be half written)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  return os.path.exists(path) and any('"epoch"' in l and l.endswith('\n') for l in open(path))


def _state(workdir):
  """Every array of the run's latest checkpoint (parameters, optimizer state, statistics) as NumPy."""
  import jax
  import orbax.checkpoint as ocp
  step = _finalized(workdir)[-1]
  with ocp.PyTreeCheckpointer() as c:
    tree = c.restore(os.path.join(workdir, 'checkpoints', str(step), 'state'))
  return step, [np.asarray(a) for a in jax.tree.leaves(tree)]


def _resumed_from(text):
  marks = [l.split('resuming from the checkpoint at step ')[1] for l in text.splitlines()
           if 'resuming from the checkpoint at step ' in l]
  assert len(marks) == 1, text[-3000:]
  return int(marks[0].split()[0])


def _assert_same_run(work, reference):
  (step_a, ours), (step_b, ref) = _state(work), _state(reference)
  assert step_a == step_b
  assert len(ours) == len(ref)
  for a, b in zip(ours, ref):
    np.testing.assert_array_equal(a, b)
  strip = lambda rs: [{k: v for k, v in r.items() if k not in ('img_per_s', 'epoch_seconds')} for r in rs]
  assert strip(_epochs(work)) == strip(_epochs(reference))


@pytest.mark.slow
def test_kill_loop_ends_as_an_uninterrupted_run(tmp_path):
  """Three SIGKILLs of one run, each rerun resuming from the newest finalized step, then its end:
  1. once an epoch is recorded and a checkpoint finalized (the test's kill lands wherever the run then is);
  2. inside a checkpoint write: the driver stops the run's second save in Orbax's commit, after the step's files
     are written to '<step>.orbax-checkpoint-tmp-*' and before the rename that finalizes them, and tells the test,
     which sends SIGKILL; the half-saved step must neither be used nor block the rerun that saves it again;
  3. mid-epoch: the driver's process sends itself SIGKILL as a dispatch inside an epoch starts, two epochs after
     the rerun started (one step a dispatch on CPU)."""
  reference = str(tmp_path / 'reference')
  _run(DEVICE_RUN, reference, tmp_path / 'reference.log')
  work = str(tmp_path / 'killed')
  expected = None  # the step each rerun must resume from: the newest finalized one when the last attempt died

  # 1. After an epoch record and a finalized checkpoint.
  a = Attempt(DEVICE_RUN, work, tmp_path / 'a1.log')
  a.until(lambda: _recorded(work) and _finalized(work), 'an epoch record and a finalized checkpoint')
  a.kill()
  expected = _finalized(work)[-1]
  assert expected > 0

  # 2. Inside a checkpoint write.
  marker = str(tmp_path / 'saving')
  a = Attempt(DEVICE_RUN, work, tmp_path / 'a2.log', KDJAX_TEST_HANG_AT_SAVE=2, KDJAX_TEST_MARKER=marker)
  a.until(lambda: os.path.exists(marker), 'the second checkpoint save')
  tmp_dir = open(marker).read()
  assert os.path.dirname(tmp_dir) == os.path.join(work, 'checkpoints') and '.orbax-checkpoint-tmp' in tmp_dir
  assert os.listdir(os.path.join(tmp_dir, 'state'))  # its files are written
  text = a.kill()
  assert _resumed_from(text) == expected
  half_saved = int(os.path.basename(tmp_dir).split('.')[0])
  assert os.path.isdir(tmp_dir) and half_saved not in _finalized(work)
  expected = _finalized(work)[-1]
  assert expected < half_saved

  # 3. Mid-epoch.
  a = Attempt(DEVICE_RUN, work, tmp_path / 'a3.log', KDJAX_TEST_KILL_MID_EPOCH=52)  # 2 epochs on
  rc, text = a.wait()
  assert rc == -signal.SIGKILL, text[-3000:]
  assert _resumed_from(text) == expected
  assert half_saved in _finalized(work)  # saved again, this time to the end
  expected = _finalized(work)[-1]

  text = _run(DEVICE_RUN, work, tmp_path / 'final.log')
  assert _resumed_from(text) == expected >= half_saved
  assert [r['epoch'] for r in _epochs(work)] == list(range(1, 13))
  _assert_same_run(work, reference)


@pytest.fixture(scope='module')
def jpegs(tmp_path_factory):
  from kdjax.tools import jpeg_folder
  return jpeg_folder.write(str(tmp_path_factory.mktemp('jpegs')), 3, 8, 4, side=12)


@pytest.mark.slow
def test_streamed_run_killed_mid_epoch_resumes_bit_identical(jpegs, tmp_path):
  """The streaming pipeline (Grain, one worker process: it dies with the run): SIGKILL mid-epoch, then the rerun
  reads the batches the uninterrupted run read from the checkpoint's stream position, and ends with its arrays."""
  run = ['--config=configs/teacher.py:mlp,digits', '--config.data.name=folder', f'--config.data.dir={jpegs}',
         '--config.data.pipeline=stream', '--config.data.image_size=8', '--config.data.resize=10',
         '--config.data.workers=1', '--config.batch_size=8', '--config.eval_batch_size=8', '--config.epochs=4',
         '--config.steps_per_dispatch=1', '--config.checkpoint_every_epochs=1', '--config.eval_every_epochs=2',
         *FIGURES_OFF]  # 24 training images: 3 steps an epoch, one a dispatch
  reference = str(tmp_path / 'reference')
  _run(run, reference, tmp_path / 'reference.log')
  work = str(tmp_path / 'killed')
  marker = str(tmp_path / 'children')
  rc, text = Attempt(run, work, tmp_path / 'a1.log', KDJAX_TEST_KILL_MID_EPOCH=7, KDJAX_TEST_MARKER=marker).wait()
  assert rc == -signal.SIGKILL, text[-3000:]
  # Its Grain worker (and multiprocessing's resource tracker) did not outlive it.
  children = [int(p) for p in open(marker).read().split()]
  assert children
  end = time.time() + 30
  while [p for p in children if _alive(p)]:
    assert time.time() < end, f'processes {[p for p in children if _alive(p)]} outlived the killed run'
    time.sleep(0.1)
  # The first dispatch from the 7th on that starts inside an epoch is the 8th, epoch 3's second step: epochs 1 and 2
  # are recorded, and at least epoch 1's checkpoint is finalized (the second save waited for the first).
  assert [r['epoch'] for r in _epochs(work)] == [1, 2]
  expected = _finalized(work)[-1]
  assert expected in (3, 6)
  text = _run(run, work, tmp_path / 'final.log')
  assert _resumed_from(text) == expected
  assert [r['epoch'] for r in _epochs(work)] == [1, 2, 3, 4]
  _assert_same_run(work, reference)
