"""The CIFAR VGGs of RepDistiller (`models/vgg.py`), registered as the references do: vgg8/11/13/16/19 are the
batch-norm variants (`vgg*_bn`), with the fully connected layers replaced by one Linear on the pooled 512 vector.

Five conv blocks; inside a block conv3x3(bias)-BN-ReLU repeats, and the block's last ReLU is applied outside it so
that the pre-ReLU map can be tapped. Between blocks a 2x2 max-pool, except that the pool before block4 runs only for
64x64 inputs (the reference checks the input height == 64, for TinyImageNet): on 32x32 blocks 3 and 4 are both 4x4.
The reference's AdaptiveAvgPool2d(1) is the global average pool. Conv weights kaiming-normal(fan_out)
(= N(0, sqrt(2 / (k*k*out)))), conv biases 0, BN (1, 0).

Reference state_dict key -> our variable path. Block b is an nn.Sequential whose indices count conv, BN and ReLU
modules, so with BN conv j of a block has index 3j and its BN 3j+1 (without BN: conv at 2j); we keep the index:
  block{b}.{3j}.{weight,bias}             -> params/backbone/block{b}_{3j}/{kernel,bias}   (OIHW -> HWIO)
  block{b}.{3j+1}.{weight,bias}           -> params/backbone/block{b}_{3j+1}/{scale,bias}
  block{b}.{3j+1}.running_{mean,var}      -> batch_stats/backbone/block{b}_{3j+1}/{mean,var}
  classifier.{weight,bias}                -> params/head/{kernel,bias}   (weight transposed)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from kdjax.models import layers, register

# Per block, the conv widths (the reference's cfg dict, keyed by the same letters).
CFGS = {
    'S': ((64,), (128,), (256,), (512,), (512,)),
    'A': ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    'B': ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    'D': ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    'E': ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


class VGG(nn.Module):
  cfg: str = 'S'
  batch_norm: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    input_height = x.shape[1]
    step = 3 if self.batch_norm else 2  # modules per conv in the reference Sequential: conv, [BN,] ReLU
    features, preact = [], []
    for b, widths in enumerate(CFGS[self.cfg]):
      if 1 <= b <= 3 or (b == 4 and input_height == 64):
        x = layers.max_pool(x, 2)
      for j, width in enumerate(widths):
        if j:
          x = nn.relu(x)
        # fan_in=0 gives torch_bias_init a zero bound, i.e. the zero bias the reference initialises.
        x = layers.conv(width, 3, use_bias=True, fan_in=0, kernel_init=layers.kaiming_normal_fan_out,
                        dtype=self.dtype, name=f'block{b}_{step * j}')(x)
        if self.batch_norm:
          x = layers.batch_norm(train, self.dtype, name=f'block{b}_{step * j + 1}')(x)
      pre, x = x, nn.relu(x)
      features.append(x)
      # The reference taps block0 after its ReLU even with preact=True.
      preact.append(pre if b else x)
    return features, preact, layers.avg_pool_all(x)


register('vgg8', VGG, cfg='S', head_init='normal')
register('vgg11', VGG, cfg='A', head_init='normal')
register('vgg13', VGG, cfg='B', head_init='normal')
register('vgg16', VGG, cfg='D', head_init='normal')
register('vgg19', VGG, cfg='E', head_init='normal')
