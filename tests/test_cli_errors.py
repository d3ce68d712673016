"""Bad input through launch.py as a user types it: one line, exit status 2, no traceback, and a finished run's files
untouched. (Runs killed with kill -9 and rerun: tests/test_crash_resume.py.)"""

import hashlib
import os
import subprocess
import sys

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config=configs/teacher.py:mlp,digits', '--config.epochs=3', '--config.figures=false',
        '--config.tensorboard=false']


def _env():
  env = dict(os.environ)
  env.pop('JAX_PLATFORMS', None)
  env.pop('XLA_FLAGS', None)  # one CPU device at XLA's default level, as a user's run
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


@pytest.mark.slow
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
