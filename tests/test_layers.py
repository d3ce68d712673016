"""kdjax.models.layers.max_pool: the values and gradients of nn.max_pool (XLA's reduce_window) bit for bit, and the
first-maximum gradient rule against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest

from kdjax.models import layers

# (input shape, window, strides, padding): the pools of the zoo (2/2 in the small CNNs and VGG, 3/2/1 in AlexNet
# and the torchvision ResNets, 3/2 valid in the Keras ResNetV2) on even and odd sizes, and a stride-1 pool.
CASES = [((2, 8, 8, 3), 2, 2, 0), ((2, 7, 9, 3), 2, 2, 0), ((2, 8, 8, 3), 3, 2, 1), ((2, 9, 7, 3), 3, 2, 1),
         ((2, 9, 9, 3), 3, 2, 0), ((2, 6, 6, 3), 3, 1, 1)]


def _inputs(shape, dtype, ties: bool):
  rng = np.random.default_rng(0)
  x = rng.normal(size=shape)
  if ties:  # a ReLU'd, coarsely quantised map: windows of equal maxima (zeros and others)
    x = np.round(np.maximum(x, 0) * 2) / 2
  return jnp.asarray(x, dtype)


def _reference(x, window, strides, padding):
  return nn.max_pool(x, (window, window), (strides, strides), ((padding, padding), (padding, padding)))


@pytest.mark.parametrize('ties', [False, True])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('shape,window,strides,padding', CASES)
def test_max_pool_matches_reduce_window_bit_for_bit(shape, window, strides, padding, dtype, ties):
  x = _inputs(shape, dtype, ties)

  @jax.jit
  def both(x):
    y, vjp = jax.vjp(lambda x: layers.max_pool(x, window, strides, padding), x)
    y_ref, vjp_ref = jax.vjp(lambda x: _reference(x, window, strides, padding), x)
    g = jax.random.normal(jax.random.key(1), y.shape, dtype)
    return y, y_ref, vjp(g)[0], vjp_ref(g)[0]

  y, y_ref, dx, dx_ref = both(x)
  assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
  np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(dx_ref, np.float32))

def test_max_pool_gradient_goes_to_the_first_maximum():
  """NumPy: each window's cotangent lands on its first maximum in row-major order (as torch's max_pool2d)."""
  x = np.zeros((1, 4, 4, 1), np.float32)
  x[0, 1, 1, 0] = x[0, 1, 2, 0] = x[0, 2, 1, 0] = 1.0  # one maximum shared by three 3x3/1 windows
  g = np.arange(1, 5, dtype=np.float32).reshape(1, 2, 2, 1)
  dx = jax.vjp(lambda x: layers.max_pool(x, 3, 1, 0), jnp.asarray(x))[1](jnp.asarray(g))[0]
  expected = np.zeros_like(x)
  for oi in range(2):
    for oj in range(2):
      win = x[0, oi:oi + 3, oj:oj + 3, 0]
      i, j = np.unravel_index(np.argmax(win), win.shape)  # argmax returns the first maximum
      expected[0, oi + i, oj + j, 0] += g[0, oi, oj, 0]
  np.testing.assert_array_equal(np.asarray(dx), expected)
  assert expected[0, 1, 1, 0] == g.sum()  # every window chose the same (first) of the three maxima


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_cpu_conv_gradients_equal_plain_convolutions(dtype):
  """layers.conv on the CPU (conv_saving_input) against nn.Conv with lax.conv_general_dilated: a strided conv,
  BatchNorm, ReLU, a depthwise conv and a residual sum, values and every gradient bit for bit."""
  assert jax.default_backend() == 'cpu'

  class Net(nn.Module):
    plain: bool

    @nn.compact
    def __call__(self, x):
      conv = lambda *a, **k: layers.conv(*a, **k, dtype=dtype)
      if self.plain:
        conv = lambda f, k, strides=1, groups=1: nn.Conv(f, (k, k), (strides, strides), ((k // 2,) * 2,) * 2,
                                                         feature_group_count=groups, use_bias=False, dtype=dtype)
      h = nn.relu(layers.batch_norm(True, dtype)(conv(8, 3, strides=2)(x)))
      return jnp.sum(h + conv(8, 3, groups=8)(h) ** 2)

  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3), dtype)
  variables = Net(False).init(jax.random.key(1), x)
  assert jax.tree.structure(Net(True).init(jax.random.key(1), x)) == jax.tree.structure(variables)

  @jax.jit
  def grads(variables, x):
    out = []
    for plain in (False, True):
      f = lambda p, x: Net(plain).apply({**variables, 'params': p}, x, mutable=['batch_stats'])[0]
      out.append(jax.value_and_grad(f, argnums=(0, 1))(variables['params'], x))
    return out

  ours, plain = grads(variables, x)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(plain)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize('shape', [(16, 8, 8, 3), (64, 2, 2, 5), (6, 4)])
def test_batch_norm_statistics_are_pytorchs(shape):
  """Four training steps then evaluation, against torch.nn.BatchNorm2d/1d from the same affine parameters: the
  outputs and the running mean and (unbiased) variance agree to float32 round-off; Flax's own nn.BatchNorm, whose
  running variance is the biased one, does not."""
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(0)
  c = shape[-1]
  scale, bias = rng.uniform(0.5, 2.0, c).astype(np.float32), rng.normal(size=c).astype(np.float32)
  tbn = (torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d)(c)
  with torch.no_grad():
    tbn.weight.copy_(torch.from_numpy(scale))
    tbn.bias.copy_(torch.from_numpy(bias))
  to_torch = lambda x: torch.from_numpy(np.moveaxis(x, -1, 1).copy() if x.ndim == 4 else x)
  from_torch = lambda y: np.moveaxis(y.detach().numpy(), 1, -1) if y.ndim == 4 else y.detach().numpy()
  bn = layers.batch_norm(train=True)
  variables = bn.init(jax.random.key(0), jnp.zeros(shape))
  variables = {'params': {'scale': jnp.asarray(scale), 'bias': jnp.asarray(bias)},
               'batch_stats': variables['batch_stats']}
  flax_stats = variables['batch_stats']
  for _ in range(4):
    x = (rng.normal(size=shape) * rng.uniform(0.1, 3.0, c) + rng.normal(size=c)).astype(np.float32)
    y, new = bn.apply(variables, jnp.asarray(x), mutable=['batch_stats'])
    variables = {'params': variables['params'], **new}
    _, flax_new = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5).apply(
        {'params': variables['params'], 'batch_stats': flax_stats}, jnp.asarray(x), mutable=['batch_stats'])
    flax_stats = flax_new['batch_stats']
    tbn.train()
    np.testing.assert_allclose(np.asarray(y), from_torch(tbn(to_torch(x))), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(variables['batch_stats']['mean'], tbn.running_mean.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(variables['batch_stats']['var'], tbn.running_var.numpy(), rtol=1e-6, atol=1e-7)
  n = np.prod(shape[:-1])  # Flax's biased statistics miss the factor n / (n - 1)
  assert not np.allclose(flax_stats['var'], tbn.running_var.numpy(), rtol=0.1 / n, atol=0)
  x = rng.normal(size=shape).astype(np.float32)
  tbn.eval()
  y = layers.batch_norm(train=False).apply(variables, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(y), from_torch(tbn(to_torch(x))), rtol=1e-5, atol=1e-5)
