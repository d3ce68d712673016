"""Bad input through launch.py as a user types it: one line, exit status 2, no traceback, and a finished run's files
untouched. Then the kill loop: kill -9 at random moments of a tiny run, rerun, and end as an uninterrupted run."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config=configs/teacher.py:mlp,digits', '--config.epochs=3', '--config.figures=false',
        '--config.tensorboard=false']


def _env():
  env = dict(os.environ)
  env.pop('JAX_PLATFORMS', None)
  env.pop('XLA_FLAGS', None)  # one CPU device at XLA's default level: the kill loop's runs train for 40 epochs
  # Relaunches share compiled programs, as a user's relaunches would with a compilation cache.
  env['JAX_COMPILATION_CACHE_DIR'] = os.path.join(os.environ.get('TMPDIR', '/tmp'), 'kdjax_test_jax_cache')
  return env


def _launch(*args, timeout=300):
  return subprocess.run([sys.executable, 'launch.py', *args], cwd=ROOT, env=_env(), capture_output=True,
                        text=True, timeout=timeout)


def _digest(workdir):
  """Hashes of config.json and every checkpoint file: what a refused command must not touch."""
  out = {}
  for d, _, files in os.walk(workdir):
    for f in files:
      path = os.path.join(d, f)
      if f == 'config.json' or f'{os.sep}checkpoints{os.sep}' in path:
        out[os.path.relpath(path, workdir)] = hashlib.sha1(open(path, 'rb').read()).hexdigest()
  return out


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('finished'))
  r = _launch(*TINY, f'--workdir={workdir}')
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir


ROWS = [
    (['--config=configs/nope.py'], 'error: config file configs/nope.py does not exist'),
    (['--config=configs/kd_cifar10.py:digitz'], "error: --config=configs/kd_cifar10.py:digitz: configs/kd_cifar10.py: "
                                                "unknown config string item 'digitz'"),
    (['--config=configs/cifar100.py:kd,a,b,c'], "error: --config=configs/cifar100.py:kd,a,b,c: config string"),
    (['--config=configs/mnist.py:mlp,svhn'], "error: --config=configs/mnist.py:mlp,svhn: configs/mnist.py: data must"),
    ([*TINY, '--config.optimzer.lr=1'], "error: invalid config override --config.optimzer.lr=1: no such field"),
    ([*TINY, '--config.epochs=0'], 'error: config.epochs must be >= 1, got 0'),
    ([*TINY, '--config.batch_size=0'], 'error: config.batch_size must be >= 1, got 0'),
    ([*TINY, '--config.dtype=float16'], "error: config.dtype must be one of 'float32', 'bfloat16'"),
    ([*TINY, '--config.data.augment=crop_flipp'], "error: config.data.augment must be one of"),
    ([*TINY, '--config.sweep=batch_size=32,64'], "error: config.sweep: 'batch_size' changes shapes or code"),
    ([*TINY, '--config.sweep=optimizer.lr='], 'error: config.sweep.optimizer.lr is empty'),
    ([*TINY, '--config.optimizer.lr=0.5'], 'error: '),  # the finished run's workdir with another lr: refused
    ([*TINY, '--config.data.val_fraction=0.2'], 'error: '),
]


@pytest.mark.parametrize('args, first_words', ROWS, ids=[' '.join(a[1:]) or a[0] for a, _ in ROWS])
def test_bad_command_is_one_line_and_touches_nothing(args, first_words, finished):
  before = _digest(finished)
  r = _launch(*args, f'--workdir={finished}')
  lines = [l for l in r.stderr.splitlines() if l.startswith('error:')]
  assert r.returncode == 2, r.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith(first_words), r.stderr[-2000:]
  if first_words == 'error: ':  # a resume with a changed field names it
    assert 'holds a run with another config' in lines[0]
  assert 'Traceback' not in r.stderr
  assert _digest(finished) == before


def _state(workdir):
  """Every array of the run's latest checkpoint (parameters, optimizer state, statistics) as NumPy."""
  import jax
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, 'checkpoints')
  step = max(int(n) for n in os.listdir(path) if n.isdigit())
  with ocp.PyTreeCheckpointer() as c:
    tree = c.restore(os.path.join(path, str(step), 'state'))
  return step, [np.asarray(a) for a in jax.tree.leaves(tree)]


def test_kill_loop_ends_as_an_uninterrupted_run(tmp_path):
  # Long enough that no attempt finishes before its kill; a checkpoint (and evaluation) every epoch, so kills land
  # in checkpoint writes too.
  run = [*TINY, '--config.epochs=40', '--config.checkpoint_every_epochs=1', '--config.eval_every_epochs=1']
  reference = str(tmp_path / 'reference')
  assert _launch(*run, f'--workdir={reference}').returncode == 0
  rng = random.Random(0)
  work = str(tmp_path / 'killed')
  for _ in range(3):  # kill -9 at random moments: start-up, training, evaluation, checkpoint writes
    proc = subprocess.Popen([sys.executable, 'launch.py', *run, f'--workdir={work}'], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(1.0, 5.0))
    assert proc.poll() is None, 'the run ended before its kill; the loop needs longer runs'
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  r = _launch(*run, f'--workdir={work}')
  assert r.returncode == 0, r.stderr[-3000:]
  (step_a, ours), (step_b, ref) = _state(work), _state(reference)
  assert step_a == step_b
  for a, b in zip(ours, ref):
    np.testing.assert_array_equal(a, b)
  strip = lambda rs: [{k: v for k, v in r.items() if k not in ('img_per_s', 'epoch_seconds')} for r in rs]
  records = lambda w: [json.loads(l) for l in open(os.path.join(w, 'metrics.jsonl')) if '"epoch"' in l]
  assert strip(records(work)) == strip(records(reference))
