"""Layers shared by the model zoo, written to match PyTorch's defaults.

The reference KD codebases are PyTorch. Our networks must be the same networks (same parameter counts, same
padding, same BatchNorm epsilon/momentum, same initialisation) so that published numbers and imported weights
carry over. These thin wrappers pin those choices in one place.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
from flax.linen import normalization
import jax
import jax.numpy as jnp

Dtype = Any


def torch_uniform_fan_in(scale: float = 1.0):
  """PyTorch's default weight init for Conv/Linear: kaiming_uniform(a=sqrt(5)) == U(±sqrt(1/fan_in))."""
  return nn.initializers.variance_scaling(scale / 3.0, 'fan_in', 'uniform')


def torch_bias_init(fan_in: int):
  """PyTorch's default bias init: U(±1/sqrt(fan_in)); Flax initialisers do not see fan_in, so it is bound here."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def conv(features: int, kernel_size: int = 3, strides: int = 1, padding: int | str | None = None, groups: int = 1,
         use_bias: bool = False, fan_in: int | None = None, kernel_init=None, dtype: Dtype = jnp.float32,
         name: str | None = None) -> nn.Conv:
  """nn.Conv with PyTorch semantics: symmetric explicit padding, torch default init.

  Flax's 'SAME' pads asymmetrically for even strides, PyTorch pads `padding` on both sides; explicit padding keeps
  strided convolutions identical to the reference (and makes imported weights give the same outputs). `fan_in`
  (in_channels // groups * k * k) is needed only for the bias init of biased convs.
  """
  pad = kernel_size // 2 if padding is None else padding
  if use_bias and fan_in is None:
    raise ValueError('a biased conv needs fan_in for the PyTorch bias init')
  return nn.Conv(
      features, (kernel_size, kernel_size),
      strides=(strides, strides),
      # A string ('SAME') is TensorFlow's padding, for networks laid out as Keras builds them.
      padding=pad if isinstance(pad, str) else ((pad, pad), (pad, pad)),
      feature_group_count=groups,
      use_bias=use_bias,
      kernel_init=kernel_init or torch_uniform_fan_in(),
      bias_init=torch_bias_init(fan_in or 0),
      dtype=dtype,
      conv_general_dilated=conv_saving_input if jax.default_backend() == 'cpu' else None,
      name=name)


def conv_saving_input(lhs, rhs, window_strides, padding, **kw):
  """lax.conv_general_dilated, whose gradient reads the input as the forward pass wrote it to memory.

  For the kernel's gradient XLA:CPU transposes the conv's input (batch to the channel axis). Left to itself it
  fuses that transpose with the elementwise ops that produced the input (BatchNorm, ReLU, the residual sum),
  recomputing them in the transposed, cache-unfriendly order: in resnet20 -> resnet8 those fusions took a quarter
  of the step. Passing the saved input through a conditional, which XLA does not fuse across, makes the transpose
  read the stored values instead. The same convolutions on the same values: the gradients are unchanged bit for
  bit (tests/test_layers.py); the step is 2-7 % faster (benchmarks/README.md). `layers.conv` uses it on the CPU only.
  """
  conv = functools.partial(jax.lax.conv_general_dilated, window_strides=window_strides, padding=padding, **kw)

  @jax.custom_vjp
  def f(x, w):
    return conv(x, w)

  def fwd(x, w):
    first = w.reshape(-1)[0]
    # A predicate XLA cannot fold (false only for a NaN weight); both branches return x.
    saved = jax.lax.cond(first == first, lambda x: x, lambda x: x * 1, x)
    return conv(x, w), (saved, w)

  def bwd(res, g):
    return jax.vjp(conv, *res)[1](g)

  f.defvjp(fwd, bwd)
  return f(lhs, rhs)


def dense(features: int, fan_in: int, use_bias: bool = True, kernel_init=None, dtype: Dtype = jnp.float32,
          name: str | None = None) -> nn.Dense:
  """nn.Dense with PyTorch's default Linear initialisation (fan_in = input width)."""
  return nn.Dense(
      features,
      use_bias=use_bias,
      kernel_init=kernel_init or torch_uniform_fan_in(),
      bias_init=torch_bias_init(fan_in),
      dtype=dtype,
      name=name)


class BatchNorm(nn.BatchNorm):
  """nn.BatchNorm whose running variance is PyTorch's: updated with the unbiased batch variance, n / (n - 1) times
  the biased one (n = the examples x positions each channel is reduced over). The batch itself is normalised by
  the biased variance, as both frameworks do; only the statistics that evaluation reads differ from Flax's. The
  variables ('scale', 'bias'; 'mean', 'var') are nn.BatchNorm's."""

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    if nn.merge_param('use_running_average', self.use_running_average, use_running_average) or mask is not None:
      return super().__call__(x, use_running_average, mask=mask)  # nothing to update: Flax's own
    features = normalization._canonicalize_axes(x.ndim, self.axis)
    reduced = tuple(i for i in range(x.ndim) if i not in features)
    shape = [x.shape[i] for i in features]
    stat_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
    ra_mean = self.variable('batch_stats', 'mean', lambda s: jnp.zeros(s, stat_dtype), shape)
    ra_var = self.variable('batch_stats', 'var', lambda s: jnp.ones(s, stat_dtype), shape)
    mean, var = normalization._compute_stats(
        x, reduced, dtype=self.dtype, axis_name=self.axis_name if not self.is_initializing() else None,
        axis_index_groups=self.axis_index_groups, use_fast_variance=self.use_fast_variance,
        force_float32_reductions=self.force_float32_reductions)
    if not self.is_initializing():
      n = math.prod(x.shape[i] for i in reduced)
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var * (n / max(n - 1, 1))
    return normalization._normalize(self, x, mean, var, reduced, features, self.dtype, self.param_dtype,
                                    self.epsilon, self.use_bias, self.use_scale, self.bias_init, self.scale_init,
                                    self.force_float32_reductions)


def batch_norm(train: bool, dtype: Dtype = jnp.float32, name: str | None = None, **kw) -> BatchNorm:
  """BatchNorm2d/1d as PyTorch: eps 1e-5, momentum 0.1 (Flax counts momentum the other way: 0.9), the running
  variance updated with the unbiased batch variance (`BatchNorm`).

  Flax computes the batch statistics in float32 even for bfloat16 inputs, which is what we want under mixed
  precision. Under jit with a batch sharded over devices the mean is global, i.e. synchronized BatchNorm.
  """
  kw.setdefault('epsilon', 1e-5)
  return BatchNorm(use_running_average=not train, momentum=0.9, dtype=dtype, name=name, **kw)


def avg_pool_all(x):
  """Global average pool over the spatial axes (NHWC -> NC)."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))


def flatten(x):
  return x.reshape((x.shape[0], -1))


def max_pool(x, window: int, strides: int | None = None, padding: int = 0):
  """Max pooling over the spatial axes of NHWC `x`, padded with -inf, as nn.max_pool and torch's max_pool2d.

  The values and the gradients are those of nn.max_pool bit for bit (the gradient goes to the first maximum of
  each window in row-major order, overlapping windows' shares summed in XLA's order). It is written as the
  maximum of the window's strided views with a hand-written VJP because XLA:CPU differentiates reduce_window
  through index arrays it materialises: on the CPU that backward pass took 35 ms for one 64x32x32x32 pool, this
  one 2 ms (benchmarks/README.md).
  """
  return _max_pool(x, window, strides or window, padding)


def _pool_views(x, window: int, strides: int, padding: int):
  """The window*window strided views of `x` padded with -inf, in row-major window order, and the output size."""
  n, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-jnp.inf)
  oh, ow = (h + 2 * padding - window) // strides + 1, (w + 2 * padding - window) // strides + 1
  return [jax.lax.slice(xp, (0, i, j, 0), (n, i + (oh - 1) * strides + 1, j + (ow - 1) * strides + 1, c),
                        (1, strides, strides, 1)) for i in range(window) for j in range(window)], (oh, ow)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window: int, strides: int, padding: int):
  return functools.reduce(jnp.maximum, _pool_views(x, window, strides, padding)[0])


def _max_pool_fwd(x, window, strides, padding):
  y = _max_pool(x, window, strides, padding)
  return y, (x, y)


def _max_pool_bwd(window, strides, padding, res, g):
  x, y = res
  n, h, w, c = x.shape
  views, (oh, ow) = _pool_views(x, window, strides, padding)
  taken, first = jnp.zeros(y.shape, bool), []
  for v in views:  # the first maximum of each window takes the gradient
    first.append((v == y) & ~taken)
    taken = taken | first[-1]
  hp, wp = h + 2 * padding, w + 2 * padding
  dx = jnp.zeros((n, hp, wp, c), g.dtype)
  zero = jnp.zeros((), g.dtype)
  # Each view's share scattered back by an interior-padded pad; the last window offset first, which is the order
  # in which XLA's select-and-scatter visits the windows that overlap one input.
  for k in reversed(range(len(views))):
    i, j = divmod(k, window)
    span_h, span_w = (oh - 1) * strides + 1, (ow - 1) * strides + 1
    dx = dx + jax.lax.pad(jnp.where(first[k], g, zero), zero, ((0, 0, 0), (i, hp - i - span_h, strides - 1),
                                                               (j, wp - j - span_w, strides - 1), (0, 0, 0)))
  return (dx[:, padding:padding + h, padding:padding + w, :],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def avg_pool(x, window: int, strides: int | None = None):
  strides = strides or window
  return nn.avg_pool(x, (window, window), strides=(strides, strides))


class Head(nn.Module):
  """The classifier: an optional dropout and one Linear, callable on an embedding alone (SimKD reuses it).

  Parameters sit directly under the module ('kernel' [in, out], 'bias' [out]) so that imported checkpoints and the
  reused teacher head have one obvious layout.
  """
  num_classes: int
  dropout_rate: float = 0.0
  # 'torch': PyTorch's Linear default; 'normal': N(0, 0.01) weights and zero bias (RepDistiller's VGG and
  # MobileNetV2, torchvision's MobileNetV2); 'zero_bias': default weights, zero bias (RepDistiller's WRN);
  # 'trunc_normal': truncated N(0, 0.02) weights and zero bias (timm's ViT / DeiT).
  init: str = 'torch'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, embedding, train: bool = False):
    fan_in = embedding.shape[-1]
    kernel_init = {'normal': nn.initializers.normal(0.01),
                   'trunc_normal': nn.initializers.truncated_normal(0.02)}.get(self.init, torch_uniform_fan_in())
    bias_init = torch_bias_init(fan_in) if self.init == 'torch' else nn.initializers.zeros
    kernel = self.param('kernel', kernel_init, (fan_in, self.num_classes), jnp.float32)
    bias = self.param('bias', bias_init, (self.num_classes,), jnp.float32)
    if self.dropout_rate:
      embedding = nn.Dropout(self.dropout_rate, deterministic=not train)(embedding)
    logits = jnp.dot(embedding.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)
    return logits.astype(jnp.float32)
