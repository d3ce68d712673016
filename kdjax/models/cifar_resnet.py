"""The CIFAR ResNets of RepDistiller (`models/resnet.py`): resnet8 ... resnet110, resnet8x4, resnet32x4.

Three stages of basic blocks (depth = 6n + 2) after a 3x3 stem; stage widths 16/32/64 (x4 variants: stem 32,
stages 64/128/256). Post-activation blocks (conv-BN-ReLU-conv-BN, add, ReLU); a 1x1 conv + BN projects the shortcut
only where the shape changes. Convs have no bias and use kaiming-normal(fan_out) init; BN starts at (1, 0).

The reference's fixed AvgPool2d(8) is a global average pool here, identical at 32x32 and usable at other sizes.

Reference state_dict key -> our variable path (the Classifier puts the backbone under 'backbone', the fc under
'head'; conv weights OIHW -> kernel HWIO, Linear weight [out, in] -> kernel [in, out]; BN running stats live in
the 'batch_stats' collection; `num_batches_tracked` has no counterpart):
  conv1.weight                      -> params/backbone/conv1/kernel
  bn1.{weight,bias}                 -> params/backbone/bn1/{scale,bias}
  bn1.{running_mean,running_var}    -> batch_stats/backbone/bn1/{mean,var}
  layer{i}.{j}.conv{k}.weight       -> params/backbone/layer{i}_{j}/conv{k}/kernel
  layer{i}.{j}.bn{k}.*              -> .../backbone/layer{i}_{j}/bn{k}/*
  layer{i}.{j}.downsample.0.weight  -> params/backbone/layer{i}_{j}/downsample_conv/kernel
  layer{i}.{j}.downsample.1.*       -> .../backbone/layer{i}_{j}/downsample_bn/*
  fc.{weight,bias}                  -> params/head/{kernel,bias}
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax.numpy as jnp

from kdjax.models import layers, register


def _conv(dtype):
  # Every conv of these ResNets is bias-free with kaiming-normal(fan_out) weights, as the reference re-inits them.
  return functools.partial(layers.conv, use_bias=False, kernel_init=layers.kaiming_normal_fan_out, dtype=dtype)


class BasicBlock(nn.Module):
  """Two 3x3 convs; returns (output, pre-ReLU sum) because KD methods tap the sum before the last ReLU.

  `shortcut_name` only names the projection ('downsample' here, 'shortcut' in the ImageNet-style ResNets), so that
  both reference layouts map onto our tree by name.
  """
  planes: int
  strides: int = 1
  project: bool = False
  shortcut_name: str = 'downsample'
  dtype: Any = jnp.float32
  expansion: ClassVar[int] = 1

  @nn.compact
  def __call__(self, x, train: bool):
    conv, bn = _conv(self.dtype), functools.partial(layers.batch_norm, train, self.dtype)
    y = nn.relu(bn(name='bn1')(conv(self.planes, 3, self.strides, name='conv1')(x)))
    y = bn(name='bn2')(conv(self.planes, 3, name='conv2')(y))
    residual = _shortcut(self, x, self.planes * self.expansion, train)
    preact = y + residual
    return nn.relu(preact), preact


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (carrying the stride), 1x1 expand x4; same return convention as `BasicBlock`."""
  planes: int
  strides: int = 1
  project: bool = False
  shortcut_name: str = 'downsample'
  dtype: Any = jnp.float32
  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x, train: bool):
    conv, bn = _conv(self.dtype), functools.partial(layers.batch_norm, train, self.dtype)
    y = nn.relu(bn(name='bn1')(conv(self.planes, 1, name='conv1')(x)))
    y = nn.relu(bn(name='bn2')(conv(self.planes, 3, self.strides, name='conv2')(y)))
    y = bn(name='bn3')(conv(self.planes * self.expansion, 1, name='conv3')(y))
    residual = _shortcut(self, x, self.planes * self.expansion, train)
    preact = y + residual
    return nn.relu(preact), preact


def _shortcut(block: nn.Module, x, out_channels: int, train: bool):
  if not block.project:
    return x
  # Called from inside the block's compact __call__, so these submodules are the block's own children.
  y = _conv(block.dtype)(out_channels, 1, block.strides, name=f'{block.shortcut_name}_conv')(x)
  return layers.batch_norm(train, block.dtype, name=f'{block.shortcut_name}_bn')(y)


BLOCKS = {'basicblock': BasicBlock, 'bottleneck': Bottleneck}


def residual_stages(x, block_cls, stages, train: bool, dtype, shortcut_name: str = 'downsample'):
  """The stages of every ResNet here: `stages` is (planes, first stride, blocks) per stage; blocks are named
  `layer{i}_{j}` (i from 1) inside the calling module. Returns (output, stage outputs, their pre-ReLU sums)."""
  features, preact = [], []
  in_channels = x.shape[-1]
  for i, (planes, stride, n) in enumerate(stages, start=1):
    for j in range(n):
      s = stride if j == 0 else 1
      out_channels = planes * block_cls.expansion
      x, pre = block_cls(planes, s, project=(s != 1 or in_channels != out_channels), shortcut_name=shortcut_name,
                         dtype=dtype, name=f'layer{i}_{j}')(x, train)
      in_channels = out_channels
    features.append(x)
    preact.append(pre)
  return x, features, preact


class CifarResNet(nn.Module):
  """`widths` = (stem, stage1, stage2, stage3) as the reference's `num_filters`; stages stride 1, 2, 2."""
  depth: int
  widths: Sequence[int] = (16, 16, 32, 64)
  block: str = 'basicblock'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    block_cls = BLOCKS[self.block.lower()]
    per_block = 2 if block_cls is BasicBlock else 3
    if (self.depth - 2) % (3 * per_block):
      raise ValueError(f'depth {self.depth} is not {3 * per_block}n+2 for {self.block}')
    n = (self.depth - 2) // (3 * per_block)

    x = _conv(self.dtype)(self.widths[0], 3, name='conv1')(x)
    x = nn.relu(layers.batch_norm(train, self.dtype, name='bn1')(x))
    # The stem has no pre-activation tap in the reference: its preact list repeats the post-ReLU map.
    features, preact = [x], [x]

    x, f, p = residual_stages(x, block_cls, [(w, s, n) for w, s in zip(self.widths[1:], (1, 2, 2))], train,
                              self.dtype)
    return features + f, preact + p, layers.avg_pool_all(x)


for _depth in (8, 14, 20, 32, 44, 56, 110):
  register(f'resnet{_depth}', CifarResNet, depth=_depth, widths=(16, 16, 32, 64))
register('resnet8x4', CifarResNet, depth=8, widths=(32, 64, 128, 256))
register('resnet32x4', CifarResNet, depth=32, widths=(32, 64, 128, 256))
