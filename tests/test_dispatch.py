"""K steps per dispatch (rolled lax.scan or unrolled) train exactly what K single-step dispatches train."""

import jax
import numpy as np
import pytest

from kdjax import data as data_lib
from kdjax import trainer as trainer_lib
from kdjax import sharding
from kdjax import step as step_lib
from kdjax import train
from tests.util import digits_config


def _epoch(k: int, loop: str):
  """One epoch of digits (22 steps) in dispatches of `k` steps; (numpy train state, per-step metric sums)."""
  cfg = digits_config('mlp', epochs=1, steps_per_dispatch=k, steps_loop=loop)
  exp = trainer_lib.build(cfg, data_lib.load(cfg.data), sharding.make_mesh(1))
  assert exp.k == k and exp.steps_loop == loop
  ts, sums = exp.init_state(), []
  for start in range(0, exp.steps_per_epoch, k):  # 22 = 5 x 4 + 2: the last dispatch masks two steps
    ts, m = exp.train_chunk(ts, 0, start)
    sums.append(jax.device_get(m))
  total = {key: np.sum([s[key] for s in sums], axis=0) for key in sums[0]}
  return jax.device_get(ts), total


@pytest.fixture(scope='module')
def single():
  return _epoch(1, 'scan')


@pytest.mark.parametrize('loop', ['scan', 'unroll'])
def test_multi_step_dispatch_trains_the_same_parameters(single, loop):
  ref_ts, ref_sums = single
  ts, sums = _epoch(4, loop)
  assert int(ts.step) == int(ref_ts.step) == 22
  assert sums['steps'] == ref_sums['steps'] == 22
  # The same arithmetic, compiled into another program: XLA may fuse and order the float ops differently (float32
  # rounding only; a BatchNorm channel of near-zero variance would amplify it over an epoch, hence the MLP here).
  for a, b in zip(jax.tree.leaves((ts.params, ts.state, ts.opt_state)),
                  jax.tree.leaves((ref_ts.params, ref_ts.state, ref_ts.opt_state))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sums['loss'], ref_sums['loss'], rtol=1e-5)
  np.testing.assert_array_equal(sums['correct'], ref_sums['correct'])
  np.testing.assert_array_equal(sums['count'], ref_sums['count'])


def test_auto_steps_loop_unrolls_on_the_cpu():
  cfg = digits_config('mlp', epochs=1, steps_per_dispatch=2)
  exp = trainer_lib.build(cfg, data_lib.load(cfg.data), sharding.make_mesh(1))
  assert exp.steps_loop == ('unroll' if jax.default_backend() == 'cpu' else 'scan')


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the CPU\'s auto setting')
@pytest.mark.parametrize('model,epochs,batch_size,expected', [('cnn_small', 1, 64, 1), ('cnn_small', 90, 64, 1),
                                                              ('cnn_small', 91, 64, 4), ('cnn_small', 200, 32, 4),
                                                              ('mlp', 200, 32, 1), ('sweep', 200, 32, 1)])
def test_auto_steps_per_dispatch_on_the_cpu(model, epochs, batch_size, expected):
  """Single steps below CPU_UNROLL_STEPS steps of training (the unrolled program would not repay its compile), for
  students without convolutions and for several students (a sweep); else 4 (digits: 22 steps per epoch at batch
  64, 44 at 32)."""
  cfg = digits_config('cnn_small' if model == 'sweep' else model, epochs=epochs, batch_size=batch_size)
  if model == 'sweep':  # two students in one program
    cfg.sweep = 'optimizer.lr=0.01,0.02'
  exp = trainer_lib.build(cfg, data_lib.load(cfg.data), sharding.make_mesh(1))
  assert trainer_lib.CPU_UNROLL_STEPS == 2000
  assert exp.k == expected, (exp.steps_per_epoch, exp.total_steps)


def test_initial_state_is_the_default_compilations():
  """init_state compiles with INIT_COMPILER_OPTIONS (faster to compile): the same bits as the default compiler.
  (The kaiming-normal kernels of a ResNet go through erf_inv, which LLVM's -O0 would round differently.)"""
  cfg = digits_config('resnet8', epochs=1)
  exp = trainer_lib.build(cfg, data_lib.load(cfg.data), sharding.make_mesh(1))
  ts = exp.init_state()
  args = (exp.init_keys, exp.hparams, exp.teacher_vars)
  # XLA's default level (2), stated: the test session itself compiles at -O0 (tests/util.py FAST_COMPILE)
  ref = jax.jit(exp._init_fn).lower(*args).compile({'xla_backend_optimization_level': 2})(*args)
  for a, b in zip(jax.tree.leaves(ts), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(a, b)
