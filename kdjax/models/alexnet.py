"""AlexNet adapted to small (32x32) inputs, for the seed projects' CIFAR/MNIST experiments.

There is no single canonical CIFAR AlexNet. We take the widely used 32x32 adaptation of torchvision's AlexNet (five
3x3 convs with torchvision's widths 64-192-384-256-256, the first with stride 2, max-pools after conv 1, 2 and 5, then
Dropout/Linear(4096)/ReLU twice and the classifier Linear), with two changes so that any input size works:
  * the pools are AlexNet's overlapping 3x3/2 pools with padding 1: on even sizes they halve the map exactly like
    the 2x2/2 pools of that adaptation, and they never shrink a 1x1 map to nothing (8x8 digits: 8->4->2->1->1);
  * the flatten of the fixed-size last map is replaced by a global average pool, so the first Linear sees 256 inputs.
The hidden widths are a field (`create('alexnet', n, hidden=(1024, 1024))` for a lighter net). Convs and Linears
are biased, with PyTorch's default init; no BatchNorm, so there are no batch_stats.

State-dict mapping (torchvision-style indices; PyTorch key -> our path in `variables['params']`):
  features.{0,3,6,8,10}.weight / .bias -> backbone/features_{0,3,6,8,10}/kernel / bias   (OIHW -> HWIO)
  classifier.{1,4}.weight / .bias      -> backbone/classifier_{1,4}/kernel / bias       (weight transposed)
  classifier.6.weight / .bias          -> head/kernel / bias                             (weight transposed)
If an imported checkpoint used the fixed-size flatten, classifier.1 has a different input width and cannot map.

Features: the five conv outputs after their ReLU (before the pools); `preact` the same convs before the ReLU;
embedding: the last hidden layer's ReLU output (the classifier's input).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from kdjax.models import layers, register

# (torchvision feature index, out channels, stride, max-pool after)
_CONVS = ((0, 64, 2, True), (3, 192, 1, True), (6, 384, 1, False), (8, 256, 1, False), (10, 256, 1, True))


class AlexNet(nn.Module):
  pooled_embedding = False  # dense layers sit between the pooled conv map and the head
  hidden: Sequence[int] = (4096, 4096)
  dropout: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    d = self.dtype
    features, preact = [], []
    for index, channels, stride, pool in _CONVS:
      h = layers.conv(channels, 3, strides=stride, use_bias=True, fan_in=x.shape[-1] * 9, dtype=d,
                      name=f'features_{index}')(x)
      preact.append(h)
      x = nn.relu(h)
      features.append(x)
      if pool:
        x = layers.max_pool(x, 3, 2, padding=1)
    x = layers.avg_pool_all(x)
    # torchvision's classifier Sequential: Dropout, Linear, ReLU per hidden layer (indices 0-2, 3-5), then Linear 6.
    for k, width in enumerate(self.hidden):
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
      x = nn.relu(layers.dense(width, fan_in=x.shape[-1], dtype=d, name=f'classifier_{3 * k + 1}')(x))
    return features, preact, x


register('alexnet', AlexNet)
