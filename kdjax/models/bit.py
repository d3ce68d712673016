"""BiT: the pre-activation ResNet-V2 with GroupNorm and weight standardisation (Kolesnikov et al., "Big Transfer",
2020), as google-research/big_transfer builds it and timm's `resnetv2_50x1_bit` reproduces it; big_vision's function
matching ("a good teacher is patient and consistent") distils from these.

Root: a weight-standardised 7x7/2 convolution (64 x width, padding 3), zero padding of 1, a 3x3/2 max pool. Stages of
pre-activation bottlenecks, widths 256/512/1024/2048 x width, strides 1/2/2/2: GroupNorm(32) + ReLU, then (first unit
of a stage) the projection shortcut, a weight-standardised 1x1 convolution of that pre-activation; 1x1 (a quarter of
the width) -> GN + ReLU -> 3x3 with the stage's stride -> GN + ReLU -> 1x1, added to the shortcut. A final GroupNorm
+ ReLU, a global average pool and the classifier (BiT's 1x1 convolution with a bias, here the Linear head: the same
parameters). Weight standardisation: each output filter minus its mean over (kh, kw, in), divided by
sqrt(its biased variance + 1e-8) (timm's StdConv2d with BiT's eps); GroupNorm eps 1e-5.

Variables, and the public BiT `.npz` names they import from (kdjax/tools/import_bit.py, the layout timm's
`_load_weights` and big_vision's bit.py read; prefix 'resnet/'):
  backbone/root/kernel                   root_block/standardized_conv2d/kernel
  backbone/block{i}_unit{j}/{a,b,c}/...  block{i}/unit{jj}/{a,b,c}/standardized_conv2d/kernel (the convolutions)
  backbone/block{i}_unit{j}/{a,b,c}_gn   block{i}/unit{jj}/{a,b,c}/group_norm/{gamma,beta} (the norm before each)
  backbone/block{i}_unit{j}/proj/kernel  block{i}/unit{jj}/a/proj/standardized_conv2d/kernel
  backbone/final_gn/{scale,bias}         group_norm/{gamma,beta}
  head/{kernel,bias}                     head/conv2d/{kernel [1, 1, C, classes], bias}
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models import layers, register

WS_EPS = 1e-8
GN_EPS = 1e-5
GN_GROUPS = 32


def standardize(kernel, eps: float = WS_EPS):
  """Weight standardisation of an HWIO kernel: per output filter, zero mean and unit (biased) variance."""
  mean = jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
  var = jnp.mean(jnp.square(kernel - mean), axis=(0, 1, 2), keepdims=True)
  return (kernel - mean) * jax.lax.rsqrt(var + eps)


class StdConv(nn.Module):
  """A bias-free convolution of a weight-standardised kernel (symmetric padding, as PyTorch pads)."""
  features: int
  kernel_size: int
  strides: int = 1
  padding: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    # timm's init (kaiming normal, fan_out); a zero kernel would have no standardised direction
    init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
    kernel = self.param('kernel', init, (k, k, x.shape[-1], self.features), jnp.float32)
    p = self.padding
    return jax.lax.conv_general_dilated(
        x.astype(self.dtype), standardize(kernel).astype(self.dtype), (self.strides, self.strides),
        ((p, p), (p, p)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _gn(name: str, dtype):
  return nn.GroupNorm(num_groups=GN_GROUPS, epsilon=GN_EPS, dtype=dtype, param_dtype=jnp.float32,
                      use_fast_variance=False, name=name)


class Unit(nn.Module):
  """One pre-activation bottleneck unit."""
  features: int
  strides: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    mid = self.features // 4
    pre = nn.relu(_gn('a_gn', self.dtype)(x))
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = StdConv(self.features, 1, self.strides, dtype=self.dtype, name='proj')(pre)
    y = StdConv(mid, 1, dtype=self.dtype, name='a')(pre)
    y = StdConv(mid, 3, self.strides, 1, dtype=self.dtype, name='b')(nn.relu(_gn('b_gn', self.dtype)(y)))
    y = StdConv(self.features, 1, dtype=self.dtype, name='c')(nn.relu(_gn('c_gn', self.dtype)(y)))
    return y + shortcut


class ResNetV2(nn.Module):
  """BiT ResNet-V2 (`units` per stage, `width` the multiplier: R50x1 is (3, 4, 6, 3) and 1)."""
  units: Sequence[int] = (3, 4, 6, 3)
  width: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = StdConv(64 * self.width, 7, 2, 3, dtype=self.dtype, name='root')(x)
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # zeros, then an unpadded max pool (BiT's root)
    x = layers.max_pool(x, 3, 2)
    features, preact = [x], [x]
    for i, (units, stride) in enumerate(zip(self.units, (1, 2, 2, 2)), start=1):
      for j in range(1, units + 1):
        x = Unit(256 * 2 ** (i - 1) * self.width, stride if j == 1 else 1, self.dtype, name=f'block{i}_unit{j}')(x)
      preact.append(x)
      features.append(x)
    x = nn.relu(_gn('final_gn', self.dtype)(x))
    features[-1] = x  # the map the classifier pools (pre-activation network: after the final norm)
    return features, preact, layers.avg_pool_all(x)


register('resnetv2_50x1_bit', ResNetV2, head_init='normal', units=(3, 4, 6, 3), width=1)
register('resnetv2_101x1_bit', ResNetV2, head_init='normal', units=(3, 4, 23, 3), width=1)
register('resnetv2_152x2_bit', ResNetV2, head_init='normal', units=(3, 8, 36, 3), width=2)
# A CPU-sized BiT for tests and digits-scale runs: one unit per stage (stem 64, stages 256..2048).
register('resnetv2_test_bit', ResNetV2, head_init='normal', units=(1, 1, 1, 1), width=1)
