"""ShuffleNet V1 / V2 for 32x32 inputs, as in RepDistiller / SimKD / mdistiller (`ShuffleV1`, `ShuffleV2`).

Both CIFAR variants replace ImageNet's 3x3/2 stem and max-pool with a 1x1 conv to 24 channels at full resolution,
and pool the final 4x4 map (a global mean here, so other input sizes work too). No explicit init in the reference:
PyTorch defaults throughout, no biases in any conv.

Channel order matters for importing PyTorch weights: NCHW channel c is NHWC channel c, so the concatenations, the
V2 channel split and the channel shuffle below reproduce the reference's channel order exactly.

State-dict mapping (PyTorch key -> our path in `variables`). Rule: `.<index>` -> `_<index>`, then `.` -> `/`;
conv `weight` -> `kernel` (OIHW -> HWIO; a grouped (O, I/g, k, k) kernel becomes (k, k, I/g, O)), BN
`weight`/`bias` -> params `scale`/`bias`, `running_mean`/`running_var` -> batch_stats `mean`/`var`.
ShuffleV1:
  conv1.weight, bn1.*                         -> backbone/conv1/kernel, backbone/bn1/...
  layer{s}.{j}.conv{1,2,3}.weight             -> backbone/layer{s}_{j}/conv{1,2,3}/kernel
  layer{s}.{j}.bn{1,2,3}.*                    -> backbone/layer{s}_{j}/bn{1,2,3}/...
  linear.{weight,bias}                        -> head/{kernel,bias}   (weight transposed)
ShuffleV2 (block 0 of each layer is the DownBlock, 1.. are BasicBlocks):
  conv1.weight, bn1.*, conv2.weight, bn2.*    -> backbone/conv1, backbone/bn1, backbone/conv2, backbone/bn2
  layer{s}.0.conv{1..5}.weight, bn{1..5}.*    -> backbone/layer{s}_0/conv{1..5}, .../bn{1..5}
  layer{s}.{j}.conv{1,2,3}.weight, bn{1,2,3}.* -> backbone/layer{s}_{j}/conv{1,2,3}, .../bn{1,2,3}
  linear.{weight,bias}                        -> head/{kernel,bias}

Features: [stem, layer1, layer2, layer3] outputs. `preact` taps the last block of each layer before its final ReLU,
as the references' preact=True does; the stem has no pre-activation tap there (its post-ReLU map is returned).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from kdjax.models import layers, register


def channel_shuffle(x, groups: int):
  """PyTorch's view(N,g,C/g,H,W).permute(0,2,1,3,4) on NHWC data: channel i*(C/g)+j moves to j*g+i."""
  if groups == 1:
    return x
  *lead, c = x.shape
  x = x.reshape(*lead, groups, c // groups)
  x = jnp.swapaxes(x, -1, -2)
  return x.reshape(*lead, c)


# ---------------------------------------------------------------------------------------------------- ShuffleNet V1


class ShuffleV1Block(nn.Module):
  """Grouped 1x1 -> BN -> ReLU -> shuffle -> dw 3x3 -> BN -> grouped 1x1 -> BN, merged with the shortcut.

  A stride-2 block concatenates an avg-pooled copy of its input instead of adding it, so its conv branch only
  produces `out_channels - in_channels` channels (computed by the caller, as in the reference's _make_layer).
  """
  out_channels: int   # channels of the conv branch
  stride: int
  groups: int
  pw1_groups: int     # the first pointwise conv is ungrouped right after the 24-channel stem
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    d = self.dtype
    mid = int(self.out_channels / 4)
    h = layers.conv(mid, 1, groups=self.pw1_groups, dtype=d, name='conv1')(x)
    h = nn.relu(layers.batch_norm(train, d, name='bn1')(h))
    h = channel_shuffle(h, self.pw1_groups)
    h = layers.conv(mid, 3, strides=self.stride, groups=mid, dtype=d, name='conv2')(h)
    h = nn.relu(layers.batch_norm(train, d, name='bn2')(h))
    h = layers.conv(self.out_channels, 1, groups=self.groups, dtype=d, name='conv3')(h)
    h = layers.batch_norm(train, d, name='bn3')(h)
    if self.stride == 2:
      # PyTorch's AvgPool2d(3, 2, padding=1) counts the zero padding in the mean (count_include_pad=True).
      res = nn.avg_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), count_include_pad=True)
      pre = jnp.concatenate([h, res.astype(h.dtype)], axis=-1)
    else:
      pre = h + x
    return nn.relu(pre), pre


class ShuffleNetV1(nn.Module):
  out_planes: Sequence[int] = (240, 480, 960)
  num_blocks: Sequence[int] = (4, 8, 4)
  groups: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    d = self.dtype
    x = layers.conv(24, 1, dtype=d, name='conv1')(x)
    x = nn.relu(layers.batch_norm(train, d, name='bn1')(x))
    features, preact = [x], [x]
    in_planes = 24
    for s, (planes, n) in enumerate(zip(self.out_planes, self.num_blocks), start=1):
      for j in range(n):
        stride = 2 if j == 0 else 1
        branch = planes - in_planes if stride == 2 else planes
        x, pre = ShuffleV1Block(branch, stride, self.groups, 1 if in_planes == 24 else self.groups, dtype=d,
                                name=f'layer{s}_{j}')(x, train)
        in_planes = planes
      features.append(x)
      preact.append(pre)
    return features, preact, layers.avg_pool_all(x)


# ---------------------------------------------------------------------------------------------------- ShuffleNet V2


class ShuffleV2DownBlock(nn.Module):
  """Two stride-2 branches (dw -> pw on the left, pw -> dw -> pw on the right), concatenated and shuffled."""
  out_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    d = self.dtype
    cin, mid = x.shape[-1], self.out_channels // 2
    left = layers.conv(cin, 3, strides=2, groups=cin, dtype=d, name='conv1')(x)
    left = layers.batch_norm(train, d, name='bn1')(left)
    left = layers.conv(mid, 1, dtype=d, name='conv2')(left)
    left = nn.relu(layers.batch_norm(train, d, name='bn2')(left))
    right = layers.conv(mid, 1, dtype=d, name='conv3')(x)
    right = nn.relu(layers.batch_norm(train, d, name='bn3')(right))
    right = layers.conv(mid, 3, strides=2, groups=mid, dtype=d, name='conv4')(right)
    right = layers.batch_norm(train, d, name='bn4')(right)
    right = layers.conv(mid, 1, dtype=d, name='conv5')(right)
    right = nn.relu(layers.batch_norm(train, d, name='bn5')(right))
    return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleV2BasicBlock(nn.Module):
  """Splits the channels; the first part passes through, the second goes through pw -> dw -> pw; then shuffle."""
  split_ratio: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    d = self.dtype
    c = int(x.shape[-1] * self.split_ratio)
    keep, x2 = x[..., :c], x[..., c:]
    h = layers.conv(c, 1, dtype=d, name='conv1')(x2)
    h = nn.relu(layers.batch_norm(train, d, name='bn1')(h))
    h = layers.conv(c, 3, groups=c, dtype=d, name='conv2')(h)
    h = layers.batch_norm(train, d, name='bn2')(h)
    h = layers.conv(c, 1, dtype=d, name='conv3')(h)
    h = layers.batch_norm(train, d, name='bn3')(h)
    # The reference's pre-activation tap is taken before the shuffle, so its channel order differs from the output's.
    pre = jnp.concatenate([keep, h], axis=-1)
    out = channel_shuffle(jnp.concatenate([keep, nn.relu(h)], axis=-1), 2)
    return out, pre


class ShuffleNetV2(nn.Module):
  """RepDistiller's `ShuffleV2` is net_size 1: stages of 116/232/464 channels, a 1024-channel final 1x1 conv."""
  out_channels: Sequence[int] = (116, 232, 464, 1024)
  num_blocks: Sequence[int] = (3, 7, 3)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    d = self.dtype
    x = layers.conv(24, 1, dtype=d, name='conv1')(x)
    x = nn.relu(layers.batch_norm(train, d, name='bn1')(x))
    features, preact = [x], [x]
    for s, (channels, n) in enumerate(zip(self.out_channels[:3], self.num_blocks), start=1):
      x = ShuffleV2DownBlock(channels, dtype=d, name=f'layer{s}_0')(x, train)
      pre = x  # only used if a stage had no basic blocks; the reference would fail there
      for j in range(1, n + 1):
        x, pre = ShuffleV2BasicBlock(dtype=d, name=f'layer{s}_{j}')(x, train)
      features.append(x)
      preact.append(pre)
    x = layers.conv(self.out_channels[3], 1, dtype=d, name='conv2')(x)
    x = nn.relu(layers.batch_norm(train, d, name='bn2')(x))
    return features, preact, layers.avg_pool_all(x)


register('ShuffleV1', ShuffleNetV1)
register('ShuffleV2', ShuffleNetV2)
