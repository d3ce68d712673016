"""The CIFAR versions of the ImageNet ResNets in RepDistiller (`models/resnetv2.py`): ResNet18, ResNet34, ResNet50.

Stem is a single stride-1 3x3 conv (64) + BN + ReLU with no max-pool, so 32x32 inputs give 32/16/8/4 stages of
width 64/128/256/512 (x4 for the bottleneck ResNet50). Blocks are the post-activation ones of `cifar_resnet`, with
the projection named `shortcut` as in this reference. Convs are bias-free, kaiming-normal(fan_out); BN (1, 0); the
reference's `zero_init_residual` defaults to False and is not offered.

Reference state_dict key -> our variable path (conv weights OIHW -> kernel HWIO, Linear weight -> kernel
transposed, BN running stats in 'batch_stats', `num_batches_tracked` dropped):
  conv1.weight                    -> params/backbone/conv1/kernel
  bn1.{weight,bias}               -> params/backbone/bn1/{scale,bias}
  bn1.{running_mean,running_var}  -> batch_stats/backbone/bn1/{mean,var}
  layer{i}.{j}.conv{k}.weight     -> params/backbone/layer{i}_{j}/conv{k}/kernel
  layer{i}.{j}.bn{k}.*            -> .../backbone/layer{i}_{j}/bn{k}/*
  layer{i}.{j}.shortcut.0.weight  -> params/backbone/layer{i}_{j}/shortcut_conv/kernel
  layer{i}.{j}.shortcut.1.*       -> .../backbone/layer{i}_{j}/shortcut_bn/*
  linear.{weight,bias}            -> params/head/{kernel,bias}
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from kdjax.models import layers, register
from kdjax.models.cifar_resnet import BLOCKS, _conv, residual_stages


class ResNet(nn.Module):
  num_blocks: Sequence[int]
  block: str = 'basicblock'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    block_cls = BLOCKS[self.block.lower()]
    x = _conv(self.dtype)(64, 3, name='conv1')(x)
    x = nn.relu(layers.batch_norm(train, self.dtype, name='bn1')(x))
    features, preact = [x], [x]  # the reference has no pre-ReLU tap for the stem

    x, f, p = residual_stages(x, block_cls, zip((64, 128, 256, 512), (1, 2, 2, 2), self.num_blocks), train,
                              self.dtype, shortcut_name='shortcut')
    return features + f, preact + p, layers.avg_pool_all(x)


register('ResNet18', ResNet, num_blocks=(2, 2, 2, 2), block='basicblock')
register('ResNet34', ResNet, num_blocks=(3, 4, 6, 3), block='basicblock')
register('ResNet50', ResNet, num_blocks=(3, 4, 6, 3), block='bottleneck')
