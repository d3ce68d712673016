"""One student over many processes: launch.py as 2 processes x 2 CPU devices (tests/test_multihost.py's machinery),
one student spread over all 4 devices, so that every gradient and every BatchNorm statistic is reduced across the
processes, not only within one. Against one device for a conv network with BatchNorm, and a streamed run against
the same run in one process on 4 devices."""

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.test_multihost import ROOT, TOL, Processes, _env

DIGITS = ['--config=configs/teacher.py:cnn_small,digits', '--config.epochs=1', '--config.num_devices=0',
          '--config.tensorboard=false', '--config.figures=false']


def _ok(results):
  for rc, text in results:
    assert rc == 0, text[-3000:]
  assert 'Traceback' not in ''.join(text for _, text in results)
  return results


def _state(workdir):
  """{path: array} of every array of the run's latest checkpoint (parameters, optimizer state, statistics)."""
  import jax
  import orbax.checkpoint as ocp
  from etils import epath
  root = os.path.join(workdir, 'checkpoints')
  step = max(int(n) for n in os.listdir(root) if n.isdigit())
  path = os.path.join(root, str(step), 'state')
  handler = ocp.PyTreeCheckpointHandler()
  try:
    saved = handler.metadata(epath.Path(path)).tree
  finally:
    handler.close()
  with ocp.PyTreeCheckpointer() as c:  # as NumPy: a checkpoint of 2 processes names devices this process lacks
    tree = c.restore(path, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved))
  return step, {jax.tree_util.keystr(p): np.asarray(a) for p, a in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_states_close(got, want):
  (step_a, a), (step_b, b) = got, want
  assert step_a == step_b and sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_allclose(a[key], b[key], err_msg=key, **TOL)


@pytest.mark.slow
def test_one_bn_student_over_two_processes_equals_one_device(tmp_path):
  """cnn_small (BatchNorm after each conv), 64 images a step: 16 on each of the 4 devices, 32 in each process. The
  reference is this config on one device, where each BatchNorm statistic is of the whole batch; the 2 x 2 run
  matches it to float32 round-off only if its batch statistics and gradients are reduced over both processes: a
  statistic of one process's 32-image half differs from the whole batch's far beyond round-off (per-device means
  are told apart at 1e-3 by tests/test_train.py's step-by-step check), and 22 steps carry the difference on."""
  from kdjax import train
  from tests.test_configs import load_config
  from tests.util import load_digits_model
  cfg = load_config('teacher.py', 'cnn_small,digits')
  cfg.update(epochs=1, num_devices=1, tensorboard=False, figures=False)
  one = train.run(cfg, str(tmp_path / 'one'))
  assert one.trainer.mesh.devices.size == 1
  with Processes([*DIGITS, f'--workdir={tmp_path / "two"}']) as p:
    results = _ok(p.wait())
  assert '2 processes' in results[0][1] and '4 device(s)' in results[0][1]
  got, want = (load_digits_model(str(tmp_path / w), 'cnn_small') for w in ('two', 'one'))
  assert any('BatchNorm' in k for k in got['batch_stats']['backbone'])
  import jax
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(x, y, err_msg=jax.tree_util.keystr(path), **TOL)
  _assert_states_close(_state(str(tmp_path / 'two')), _state(str(tmp_path / 'one')))  # the optimizer state too


@pytest.fixture(scope='module')
def jpegs(tmp_path_factory):
  from kdjax.tools import jpeg_folder
  return jpeg_folder.write(str(tmp_path_factory.mktemp('jpegs')), 3, 8, 4, side=12)


@pytest.mark.slow
def test_streamed_two_processes_equal_one_process_on_four_devices(jpegs, tmp_path):
  """The streaming pipeline: each of 2 processes reads its strided half of every global batch (4 of 8 images) and
  places it on its 2 devices; one process on 4 devices reads whole batches. Same parameters, optimizer state and
  evaluation to round-off."""
  run = ['--config=configs/teacher.py:mlp,digits', '--config.data.name=folder', f'--config.data.dir={jpegs}',
         '--config.data.pipeline=stream', '--config.data.image_size=8', '--config.data.resize=10',
         '--config.batch_size=8', '--config.eval_batch_size=8', '--config.epochs=2', '--config.num_devices=0',
         '--config.tensorboard=false', '--config.figures=false']  # 24 training images: 3 steps an epoch
  env = dict(_env(), XLA_FLAGS=_env()['XLA_FLAGS'].replace('device_count=2', 'device_count=4'))
  r = subprocess.run([sys.executable, 'launch.py', *run, f'--workdir={tmp_path / "one"}'], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert '4 device(s)' in r.stderr and 'processes' not in r.stderr
  with Processes([*run, f'--workdir={tmp_path / "two"}']) as p:
    results = _ok(p.wait())
  assert '2 processes' in results[0][1] and "data.pipeline='stream'" in results[0][1]
  _assert_states_close(_state(str(tmp_path / 'two')), _state(str(tmp_path / 'one')))
  import json
  summaries = [json.load(open(tmp_path / w / 'summary.json')) for w in ('two', 'one')]
  assert summaries[0]['test_count'] == summaries[1]['test_count'] == 12
  assert summaries[0]['test_accuracy'] == pytest.approx(summaries[1]['test_accuracy'], abs=1 / 12 + 1e-9)
