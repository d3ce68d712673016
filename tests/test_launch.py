"""launch.py as a user runs it: overrides, typos, the config string, and a quiet CPU start."""

import json
import os
import subprocess
import sys

import pytest

from tests.util import FAST_COMPILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*args, env_extra=None, timeout=300):
  env = dict(os.environ)
  env.pop('JAX_PLATFORMS', None)  # let kdjax.platform choose, as on a user's machine without a GPU
  env['XLA_FLAGS'] = FAST_COMPILE  # no fake devices: one CPU device, as on a user's machine
  env.update(env_extra or {})
  return subprocess.run([sys.executable, os.path.join(ROOT, 'launch.py'), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_override_takes_effect_and_runs_quietly_on_cpu(tmp_path):
  r = _launch('--config=configs/teacher.py:mlp,digits', f'--workdir={tmp_path}', '--config.epochs=2',
              '--config.optimizer.lr=0.02', '--config.batch_size=32')
  assert r.returncode == 0, r.stderr[-3000:]
  cfg = json.load(open(tmp_path / 'config.json'))
  assert cfg['optimizer']['lr'] == 0.02 and cfg['epochs'] == 2 and cfg['batch_size'] == 32
  assert cfg['student']['model'] == 'mlp'
  assert cfg['data']['name'] == 'digits'
  epochs = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl') if '"epoch"' in l]
  assert [e['epoch'] for e in epochs] == [1, 2]
  assert 'on cpu: 1 device(s)' in r.stderr
  for noise in ('Traceback', 'CUDA', 'cuInit'):
    assert noise not in r.stderr + r.stdout
  assert 'done: last test acc' in r.stderr
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(tmp_path / 'tensorboard'))
  assert (tmp_path / 'summary.json').exists() and (tmp_path / 'checkpoints').is_dir()


def test_typo_in_override_names_the_field(tmp_path):
  r = _launch('--config=configs/teacher.py:mlp,digits', f'--workdir={tmp_path}', '--config.optimzer.lr=1')
  assert r.returncode != 0
  assert 'optimzer' in r.stderr and 'Traceback' not in r.stderr
  assert not (tmp_path / 'config.json').exists()


def test_missing_dataset_is_one_clear_line(tmp_path):
  r = _launch('--config=configs/teacher.py:resnet8,cifar10', f'--workdir={tmp_path / "w"}',
              f'--config.data.data_dir={tmp_path / "tfds"}')
  assert r.returncode == 2
  errors = [l for l in r.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1 and 'Traceback' not in r.stderr
  assert "dataset 'cifar10' is not prepared in" in errors[0] and str(tmp_path / 'tfds') in errors[0]
  assert 'tfds build cifar10' in errors[0]


def _table(text: str) -> dict:
  """{run: test accuracy} of a quickstart table (the header, a rule, then one line per run)."""
  lines = text.strip().splitlines()
  assert lines[0].split() == ['run', 'model', 'losses', 'test', 'acc'] and set(lines[1]) <= {'-', ' '}
  return {l.split()[0]: float(l.split()[-1]) for l in lines[2:]}


# The README's quickstart figures differ from CPU to CPU by a test image or so (float32 sums in another order).
README_TOLERANCE = 3 / 360  # 3 of the 360 digits test images


@pytest.mark.slow
def test_quickstart_gives_the_readme_table(tmp_path):
  """The whole quickstart, as a user runs it (XLA's default optimisation level), against the README's table."""
  readme = open(os.path.join(ROOT, 'README.md')).read()
  block = readme.split('The quickstart prints')[1].split('```')[1]
  claimed = _table(block)
  r = _launch('--config=configs/quickstart.py', f'--workdir={tmp_path}', env_extra={'XLA_FLAGS': ''}, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  got = _table(r.stdout)
  assert list(got) == list(claimed) == ['teacher', 'scratch', 'kd']
  for run, acc in claimed.items():
    assert got[run] == pytest.approx(acc, abs=README_TOLERANCE + 1e-9), (run, got, claimed)
  # The KD run read the teacher that the suite trained first.
  kd_config = json.load(open(tmp_path / 'kd' / 'config.json'))
  assert kd_config['teacher']['checkpoint'] == str(tmp_path / 'teacher')


def test_sigterm_during_startup_exits_143_with_one_line(tmp_path):
  import signal
  import time
  proc = subprocess.Popen([sys.executable, 'launch.py', '--config=configs/kd_cifar10.py:digits',
                           f'--workdir={tmp_path}'], cwd=ROOT, stderr=subprocess.PIPE, text=True)
  time.sleep(4)  # importing JAX / reading the data: before any training
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143
  lines = [l for l in err.splitlines() if l.startswith('error:')]
  assert lines == ['error: stopped by signal 15 before training started; nothing was saved, rerun the same '
                   'command to start']
  assert 'Traceback' not in err and not os.path.exists(tmp_path / 'checkpoints' / '0')
