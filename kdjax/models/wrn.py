"""The wide ResNets of RepDistiller (`models/wrn.py`): wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2 (WRN-depth-width).

Pre-activation blocks (BN-ReLU-conv-BN-ReLU-conv, add), depth = 6n + 4, stage widths 16k/32k/64k after a 16-channel
3x3 stem, a final BN + ReLU before pooling. Where a block changes width, its 1x1 shortcut conv reads the
*activated* input (BN1-ReLU output), not the raw one, exactly as the reference. Convs are bias-free with
N(0, sqrt(2 / (k*k*out))) = kaiming-normal(fan_out) init; BN (1, 0).

Taps. features = [stem conv, stage1, stage2, stage3] (raw block-sum outputs, no BN). With `preact=True` the
reference re-applies the BN that *consumes* each map: stage1 -> block2.layer[0].bn1, stage2 -> block3.layer[0].bn1,
stage3 -> the final bn1. Those BNs already run in the forward pass on exactly those maps, so we return their outputs
instead of calling them twice (in train mode the reference's second call only updates the running stats again).

Reference state_dict key -> our variable path (conv OIHW -> kernel HWIO, Linear weight -> kernel transposed, BN
running stats in 'batch_stats', `num_batches_tracked` dropped):
  conv1.weight                              -> params/backbone/conv1/kernel
  block{i}.layer.{j}.conv{k}.weight         -> params/backbone/block{i}_{j}/conv{k}/kernel
  block{i}.layer.{j}.bn{k}.{weight,bias}    -> params/backbone/block{i}_{j}/bn{k}/{scale,bias}
  block{i}.layer.{j}.bn{k}.running_{mean,var} -> batch_stats/backbone/block{i}_{j}/bn{k}/{mean,var}
  block{i}.layer.{j}.convShortcut.weight    -> params/backbone/block{i}_{j}/convShortcut/kernel
  bn1.*                                     -> .../backbone/bn1/*
  fc.{weight,bias}                          -> params/head/{kernel,bias}
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from kdjax.models import layers, register


def _conv(dtype):
  return functools.partial(layers.conv, use_bias=False, kernel_init=layers.kaiming_normal_fan_out, dtype=dtype)


class WideBlock(nn.Module):
  """Returns (output, BN1 output of the input): the latter is the reference's preact tap of the previous stage."""
  out_planes: int
  strides: int = 1
  drop_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    conv, bn = _conv(self.dtype), functools.partial(layers.batch_norm, train, self.dtype)
    equal_in_out = x.shape[-1] == self.out_planes
    pre = bn(name='bn1')(x)
    act = nn.relu(pre)
    y = nn.relu(bn(name='bn2')(conv(self.out_planes, 3, self.strides, name='conv1')(act)))
    if self.drop_rate > 0:
      y = nn.Dropout(self.drop_rate, deterministic=not train)(y)
    y = conv(self.out_planes, 3, name='conv2')(y)
    # The reference never strides an identity shortcut (only width-changing blocks stride), so neither do we.
    residual = x if equal_in_out else conv(self.out_planes, 1, self.strides, name='convShortcut')(act)
    return residual + y, pre


class WideResNet(nn.Module):
  depth: int
  widen_factor: int = 1
  drop_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if (self.depth - 4) % 6:
      raise ValueError(f'WRN depth must be 6n+4, got {self.depth}')
    n = (self.depth - 4) // 6
    k = self.widen_factor

    x = _conv(self.dtype)(16, 3, name='conv1')(x)
    features, preact = [x], [x]  # the stem conv has no BN of its own to tap
    for i, (planes, stride) in enumerate(zip((16 * k, 32 * k, 64 * k), (1, 2, 2)), start=1):
      for j in range(n):
        x, pre = WideBlock(planes, stride if j == 0 else 1, self.drop_rate, self.dtype, name=f'block{i}_{j}')(
            x, train)
        if j == 0 and i > 1:
          preact.append(pre)  # this stage's entry BN applied to the previous stage's output
      features.append(x)
    pre = layers.batch_norm(train, self.dtype, name='bn1')(x)
    preact.append(pre)
    return features, preact, layers.avg_pool_all(nn.relu(pre))


register('wrn_16_1', WideResNet, depth=16, widen_factor=1, head_init='zero_bias')
register('wrn_16_2', WideResNet, depth=16, widen_factor=2, head_init='zero_bias')
register('wrn_40_1', WideResNet, depth=40, widen_factor=1, head_init='zero_bias')
register('wrn_40_2', WideResNet, depth=40, widen_factor=2, head_init='zero_bias')
