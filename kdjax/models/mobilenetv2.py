"""MobileNetV2 for 32x32 inputs, as in RepDistiller / SimKD / mdistiller (`mobile_half`, `mobilenetv2_T_w`).

This is the "Route Constrained Optimization" variant, which differs from torchvision's MobileNetV2 in ways that
change parameter counts and so must be kept: every inverted residual has the pointwise expansion conv even when the
expansion ratio is 1, the activation is ReLU (not ReLU6), the 24-channel stage keeps stride 1 (32x32 inputs), and
the final 1x1 conv always has 1280 channels unless width > 1.

State-dict mapping (PyTorch key -> our path in `variables`; the Classifier puts the backbone under `backbone`).
General rule: drop the `.weight`/`.bias` leaf, turn every `.<index>` into `_<index>`, then `.` into `/`.
  conv1.0.weight                      -> params/backbone/conv1_0/kernel           (OIHW -> HWIO)
  conv1.1.{weight,bias}               -> params/backbone/conv1_1/{scale,bias}
  conv1.1.{running_mean,running_var}  -> batch_stats/backbone/conv1_1/{mean,var}
  blocks.{i}.{j}.conv.{k}.weight      -> params/backbone/blocks_{i}_{j}/conv_{k}/kernel       (k in 0, 3, 6)
  blocks.{i}.{j}.conv.{k}.*           -> .../blocks_{i}_{j}/conv_{k}/{scale,bias,mean,var}    (k in 1, 4, 7: BN)
  conv2.0.weight / conv2.1.*          -> params/backbone/conv2_0/kernel, conv2_1/...
  classifier.0.{weight,bias}          -> params/head/{kernel,bias}                (weight transposed)
`num_batches_tracked` has no counterpart. Depthwise kernels (C,1,3,3) become (3,3,1,C).

Features follow the references' taps: f0 = stem, f1..f4 = outputs of block groups 1, 2, 4 and 6. Those outputs
end in a BatchNorm with no ReLU after it, so `preact` is `features` (the references' preact=True returns the same
list, and their get_bn_before_relu points at exactly these BNs).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from kdjax.models import layers, register

# (expansion t, channels c, repeats n, first stride s); `None` for t means "the model's T".
_SETTING = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
            (None, 160, 3, 2), (None, 320, 1, 1))
# Indices of the block groups whose outputs are the stage features f1..f4.
_TAPS = (1, 2, 4, 6)

# The reference initialises every conv with N(0, sqrt(2 / (k*k*out_channels))), depthwise included; Flax's fan_out
# for an HWIO kernel of shape (k, k, in/groups, out) is the same k*k*out.
_conv_init = layers.kaiming_normal_fan_out


class InvertedResidual(nn.Module):
  """pw expand -> BN -> ReLU -> dw 3x3 -> BN -> ReLU -> pw linear -> BN (+ identity when shapes allow)."""
  out_channels: int
  stride: int
  expand_ratio: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    in_channels = x.shape[-1]
    hidden = in_channels * self.expand_ratio
    # Names are the indices inside the reference's `conv` Sequential (2 and 5 are its parameter-free ReLUs).
    h = layers.conv(hidden, 1, kernel_init=_conv_init, dtype=self.dtype, name='conv_0')(x)
    h = nn.relu(layers.batch_norm(train, self.dtype, name='conv_1')(h))
    h = layers.conv(hidden, 3, strides=self.stride, groups=hidden, kernel_init=_conv_init, dtype=self.dtype,
                    name='conv_3')(h)
    h = nn.relu(layers.batch_norm(train, self.dtype, name='conv_4')(h))
    h = layers.conv(self.out_channels, 1, kernel_init=_conv_init, dtype=self.dtype, name='conv_6')(h)
    h = layers.batch_norm(train, self.dtype, name='conv_7')(h)
    if self.stride == 1 and in_channels == self.out_channels:
      h = x + h
    return h


class MobileNetV2(nn.Module):
  """RepDistiller's CIFAR MobileNetV2; `mobile_half` is T=6, width 0.5."""
  T: int = 6
  width_mult: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    d = self.dtype
    stem = int(32 * self.width_mult)
    x = layers.conv(stem, 3, strides=2, kernel_init=_conv_init, dtype=d, name='conv1_0')(x)
    x = nn.relu(layers.batch_norm(train, d, name='conv1_1')(x))
    features = [x]
    for i, (t, c, n, s) in enumerate(_SETTING):
      out_channels = int(c * self.width_mult)
      for j in range(n):
        x = InvertedResidual(out_channels, s if j == 0 else 1, self.T if t is None else t, dtype=d,
                             name=f'blocks_{i}_{j}')(x, train)
      if i in _TAPS:
        features.append(x)
    # The reference never narrows the last conv below 1280 channels, only widens it.
    last = int(1280 * self.width_mult) if self.width_mult > 1.0 else 1280
    x = layers.conv(last, 1, kernel_init=_conv_init, dtype=d, name='conv2_0')(x)
    x = nn.relu(layers.batch_norm(train, d, name='conv2_1')(x))
    # The reference's AvgPool2d(2, ceil_mode=True) covers the whole 2x2 map of a 32x32 input; a global mean is the
    # same there and also works for other input sizes.
    return features, list(features), layers.avg_pool_all(x)


register('MobileNetV2', MobileNetV2, T=6, width_mult=0.5, head_init='normal')
register('mobile_half', MobileNetV2, T=6, width_mult=0.5, head_init='normal')
register('MobileNetV2_1_0', MobileNetV2, T=6, width_mult=1.0, head_init='normal')
