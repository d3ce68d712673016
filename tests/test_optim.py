"""The optimizer is torch.optim.SGD (weight decay into the gradient before momentum), the schedules optax's."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import optim
from tests.util import digits_config


def _torch_sgd_numpy(p, grads, lrs, momentum, wd, nesterov):
  """torch.optim.SGD.step as documented, in NumPy (dampening 0)."""
  buf = None
  for g, lr in zip(grads, lrs):
    d = g + wd * p
    buf = d if buf is None else momentum * buf + d
    p = p - lr * (d + momentum * buf if nesterov else buf)
  return p


@pytest.mark.parametrize('nesterov', [False, True])
def test_sgd_matches_torch_semantics(nesterov):
  cfg = digits_config(epochs=4)
  cfg.optimizer.update(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
  cfg.schedule.update(name='step', decay_epochs=(2, 3), decay_factor=0.1)
  tx = optim.optimizer(cfg, steps_per_epoch=2)
  rng = np.random.default_rng(0)
  p0 = rng.normal(size=(5,)).astype(np.float32)
  grads = rng.normal(size=(8, 5)).astype(np.float32)
  params, state = jnp.asarray(p0), tx.init(jnp.asarray(p0))
  for g in grads:
    updates, state = tx.update(jnp.asarray(g), state, params)
    params = optax.apply_updates(params, updates)
  lrs = [0.1] * 4 + [0.01] * 2 + [0.001] * 2  # x0.1 after epochs 2 and 3 (2 steps each)
  expected = _torch_sgd_numpy(p0.astype(np.float64), grads.astype(np.float64), lrs, 0.9, 5e-4, nesterov)
  np.testing.assert_allclose(np.asarray(params), expected, rtol=1e-5, atol=1e-6)


def test_schedules():
  cfg = digits_config(epochs=10)
  cfg.optimizer.lr = 0.05
  cfg.schedule.update(name='step', decay_epochs=(5, 8), decay_factor=0.1)
  s = optim.schedule(cfg, steps_per_epoch=10)
  assert [float(s(i)) for i in (0, 49, 50, 79, 80, 99)] == pytest.approx([0.05, 0.05, 0.005, 0.005, 5e-4, 5e-4])
  cfg.schedule.update(name='cosine', warmup_epochs=2)
  s = optim.schedule(cfg, steps_per_epoch=10)
  assert float(s(0)) == 0.0 and float(s(10)) == pytest.approx(0.025)  # linear warmup
  assert float(s(20)) == pytest.approx(0.05) and float(s(60)) == pytest.approx(0.025, rel=1e-5)
  assert float(s(100)) == pytest.approx(0.0, abs=1e-8)


def test_reference_weight_flags():
  from kdjax import distill
  assert distill.repdistiller_weights('crd', 1.0, 0.0, 0.8) == {'ce': 1.0, 'kd': 0.0, 'crd': 0.8}
  assert distill.repdistiller_weights('kd', 0.1, 0.9, 0.0) == {'ce': 0.1, 'kd': 0.9}
  assert distill.simkd_repo_weights('simkd', 0.0, 0.0, 1.0) == {'ce': 0.0, 'kd': 0.0, 'simkd': 1.0}
  assert distill.reference_weights('pkt') == {'ce': 1.0, 'pkt': 30000.0}
  with pytest.raises(ValueError, match="no reference weights for 'nope'"):
    distill.reference_weights('nope')
