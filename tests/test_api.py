"""The public API (kdjax/api.py): the README's example runs as written; a step on user batches is the run loop's
step; K steps in one call are K calls; bad input is one line."""

import os
import re

import jax
import numpy as np
import pytest

from kdjax import api
from kdjax import step as step_lib
from kdjax import train
from kdjax.data import device as device_data
from kdjax.errors import ConfigError
from tests.util import digits_config, random_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_example() -> str:
  text = open(os.path.join(ROOT, 'README.md')).read()
  section = text[text.index('### Training on your own batches'):]
  return re.search(r'```python\n(.*?)```', section, re.S).group(1)


def test_the_readme_example_runs_as_written(capsys):
  code = _readme_example()
  assert len(code.splitlines()) <= 25
  namespace = {}
  exec(compile(code, 'README.md', 'exec'), namespace)
  printed = capsys.readouterr().out
  # The toy task (is the top half brighter than the bottom?) is learnt by the teacher and by its KD student.
  assert namespace['teacher_acc'] > 0.8 and namespace['student_acc'] > 0.7, printed
  assert 'teacher' in printed and 'student' in printed


@pytest.fixture(scope='module')
def kd_run(tmp_path_factory):
  """A KD run of the run loop (one epoch of 4 single-step dispatches), its teacher a random cnn_small."""
  tmp = tmp_path_factory.mktemp('api')
  teacher = random_teacher(str(tmp / 'teacher'), 'cnn_small')
  cfg = digits_config('mlp', {'ce': 0.1, 'kd': 0.9}, epochs=1, steps_per_dispatch=1, data__train_examples=256,
                      teacher__model='cnn_small', teacher__checkpoint=teacher, distill__cache_teacher='off')
  return cfg, train.run(cfg, str(tmp / 'run'))


def _run_batches(cfg, ds):
  """The run loop's batches of epoch 0, as a user would hand them over: uint8 images, labels, indices."""
  perm = np.asarray(device_data.epoch_permutation(step_lib.seed_key(cfg.seed, 0), 0, len(ds.train)))
  b = cfg.batch_size
  for s in range(len(ds.train) // b):
    idx = perm[s * b:(s + 1) * b]
    yield {'images': ds.train.images[idx], 'labels': ds.train.labels[idx], 'indices': idx}


def test_a_step_on_user_batches_is_the_run_loops_step(kd_run):
  cfg, outcome = kd_run
  ds = outcome.trainer.ds
  program = api.init(cfg, ds)  # the teacher read from config.teacher.checkpoint
  state = program.state
  for batch in _run_batches(cfg, ds):
    state, metrics = program.train_step(state, program.teacher_vars, batch)
  assert int(state.step) == int(outcome.state.step) == 4
  jax.tree.map(np.testing.assert_array_equal, jax.device_get((state.params, state.state, state.opt_state)),
               jax.device_get((outcome.state.params, outcome.state.state, outcome.state.opt_state)))
  # The same evaluation as the run's: its test accuracy from the final state.
  assert program.accuracy(state, ds.test.images, ds.test.labels)[0] == pytest.approx(outcome['test_accuracy'])


def test_k_steps_in_one_call_are_k_calls(kd_run):
  cfg, outcome = kd_run
  program = api.init(cfg, outcome.trainer.ds)
  batches = list(_run_batches(cfg, outcome.trainer.ds))
  one_by_one = program.state
  for batch in batches:
    one_by_one, _ = program.train_step(one_by_one, program.teacher_vars, batch)
  stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
  at_once, metrics = program.train_step(program.state, program.teacher_vars, stacked)
  assert metrics['loss'].shape == (4, 1)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(at_once.params), jax.device_get(one_by_one.params))


def test_bad_input_is_one_line(kd_run):
  cfg, outcome = kd_run
  ds = outcome.trainer.ds
  program = api.init(cfg, ds)
  batch = next(_run_batches(cfg, ds))
  state, tv = program.state, program.teacher_vars
  cases = [
      (dict(batch, images=batch['images'][:, :6]), r"batch\['images'\] must be \[B, 8, 8, 1\]"),
      (dict(batch, images=batch['images'].astype(np.int32)), r"batch\['images'\] must be uint8"),
      (dict(batch, labels=batch['labels'] + 10), r"batch\['labels'\] must lie in \[0, 10\)"),
      (dict(batch, labels=batch['labels'][:5]), r"batch\['labels'\] must be integers \[64\]"),
      ({'images': batch['images']}, "batch must be a dict with 'images' and 'labels'"),
  ]
  for bad, message in cases:
    with pytest.raises(ConfigError, match=message) as e:
      program.train_step(state, tv, bad)
    assert '\n' not in str(e.value)
  other = api.init(digits_config('mlp', epochs=1, student__kwargs={'hidden': (16,)}), ds)
  with pytest.raises(ConfigError, match=r"state is not this program's: .*Dense_0.*is float32\[1, 16\]"):
    program.train_step(other.state, tv, batch)
  with pytest.raises(ConfigError, match='pass teacher_vars='):
    api.init(digits_config('mlp', {'ce': 0.1, 'kd': 0.9}, teacher__model='cnn_small'), ds)
  crd = digits_config('mlp', {'ce': 1.0, 'crd': 0.8}, teacher__model='cnn_small')
  crd.distill.crd.nce_k = 100
  program = api.init(crd, ds, teacher_vars=program.teacher_vars)
  with pytest.raises(ConfigError, match=r"batch\['indices'\] is needed by crd"):
    program.train_step(program.state, program.teacher_vars, {'images': batch['images'], 'labels': batch['labels']})
