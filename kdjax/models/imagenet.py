"""ImageNet backbones: torchvision's ResNet18/34/50 and mdistiller's MobileNetV1 (the KD papers' ImageNet pairs),
ResNet50V2 (as Keras) and MobileNetV2 (torchvision) for the transfer-learning experiment.

torchvision's ResNets (`torchvision.models.resnet{18,34,50}`, v1.5: the bottleneck's stride on its 3x3 conv): a
7x7/2 conv + BN + ReLU stem, a 3x3/2 max-pool (padding 1, padded with -inf as PyTorch's), four stages of the blocks
of `cifar_resnet` (strides 1, 2, 2, 2), global average pool, `fc`. State-dict keys follow the CIFAR ResNets' rule:
  conv1.weight, bn1.*                    -> backbone/conv1, backbone/bn1
  layer{i}.{j}.conv{k}, .bn{k}           -> backbone/layer{i}_{j}/conv{k}, bn{k}
  layer{i}.{j}.downsample.0 / .1         -> backbone/layer{i}_{j}/downsample_conv / downsample_bn
  fc.{weight,bias}                       -> head/{kernel,bias}
  Features: the stem's ReLU output (before the max-pool), then the layer1..layer4 outputs; preact the stage outputs
  before their last ReLU (mdistiller's ImageNet `feats` / `preact_feats`).

mdistiller's MobileNetV1 (`mdistiller/models/imagenet/mobilenetv1.py`, the ResNet50 -> MobileNetV1 student): a
`model` Sequential of conv_bn(3, 32, 2) and 13 conv_dw blocks (depthwise 3x3 + BN + ReLU, pointwise 1x1 + BN +
ReLU), global average pool, `fc`. Keys `model.{i}.{j}.*` -> backbone/model_{i}_{j}/*. Features: the stem, then the
outputs of blocks 3, 5, 11 and 13 (128, 256, 512, 1024 channels), as that file's `feats`; preact before their ReLU.

Both are built for 224x224 inputs but end in a global average pool and only use padded strided ops, so they run on
any input size (a 32x32 input reaches 1x1 after the 32x total stride).

ResNet50V2 follows `keras.applications.ResNet50V2` (pre-activation bottlenecks, He et al. 2016 "Identity Mappings"):
  * the stem is a biased 7x7/2 conv with no BN/ReLU after it, then a 3x3/2 max-pool over an explicit zero padding
    (Keras' ZeroPadding2D; zeros rather than -inf matter because the stem output is not rectified);
  * each stage's stride sits in its *last* block, on the 3x3 conv, with a 1x1/stride max-pool (i.e. subsampling) as
    the identity shortcut; the first block of each stage has a biased 1x1 projection taken from the pre-activation;
  * the last 1x1 conv of every block is biased; `post_bn` + ReLU close the network.
  Deviations: BatchNorm uses our PyTorch-style eps 1e-5 / momentum 0.1 (Keras: eps 1.001e-5, momentum 0.99), and the
  init is PyTorch's default (Keras: glorot_uniform, zero biases); neither affects shapes or imported weights.
  Layer mapping: every Keras layer keeps its name, flat under `backbone` (Keras kernels are already HWIO):
    conv1_conv/{kernel,bias}                    -> params/backbone/conv1_conv/{kernel,bias}
    conv{s}_block{b}_{preact_bn,1_bn,2_bn}      -> params/backbone/<same>/{scale (gamma), bias (beta)},
                                                   batch_stats/backbone/<same>/{mean, var} (moving_mean/variance)
    conv{s}_block{b}_{0,1,2,3}_conv             -> params/backbone/<same>/kernel (+ bias for _0_conv, _3_conv)
    post_bn                                     -> params/backbone/post_bn, batch_stats/backbone/post_bn
    predictions/{kernel,bias}                   -> params/head/{kernel,bias}
  Features: [stem conv output, conv2, conv3, conv4 stage outputs, post-ReLU conv5]; preact equals features except
  the last, which is `post_bn`'s output before the ReLU (the stage outputs of a pre-activation net have no ReLU).

MobileNetV2 follows `torchvision.models.mobilenet_v2` (ReLU6, no expansion conv when t == 1, symmetric padding,
classifier Dropout(0.2) -> Linear in the Head, conv init kaiming_normal(fan_out)).
  State-dict mapping (rule: `.<index>` -> `_<index>`, `.` -> `/`; conv weight OIHW -> HWIO kernel; BN weight/bias
  -> scale/bias; running_mean/var -> batch_stats mean/var):
    features.0.0.weight, features.0.1.*        -> backbone/features_0_0/kernel, backbone/features_0_1/...
    features.{i}.conv.0.0 / .conv.0.1           -> backbone/features_{i}/conv_0_0 / conv_0_1   (conv, BN)
    features.{i}.conv.1.0 / .conv.1.1 (t != 1)  -> backbone/features_{i}/conv_1_0 / conv_1_1
    features.{i}.conv.2 / .conv.3    (t != 1)   -> backbone/features_{i}/conv_2 / conv_3       (conv, BN)
    features.1.conv.1 / .conv.2      (t == 1)   -> backbone/features_1/conv_1 / conv_2         (conv, BN)
    features.18.0, features.18.1                -> backbone/features_18_0, backbone/features_18_1
    classifier.1.{weight,bias}                  -> head/{kernel,bias}   (weight transposed)
  Features mirror the CIFAR MobileNetV2's taps (RepDistiller): the stem, then the outputs of the 24-, 32-, 96- and
  320-channel groups (features.3, .6, .13, .17); block outputs end in BN without activation, so preact = features.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from kdjax.models import cifar_resnet, layers, register

# -------------------------------------------------------------------------------------------- torchvision ResNet


class TorchvisionResNet(nn.Module):
  """`torchvision.models.ResNet` with `BasicBlock` or `Bottleneck` blocks."""
  num_blocks: Sequence[int]
  block: str = 'basicblock'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    block_cls = cifar_resnet.BLOCKS[self.block]
    x = cifar_resnet._conv(self.dtype)(64, 7, strides=2, padding=3, name='conv1')(x)
    x = nn.relu(layers.batch_norm(train, self.dtype, name='bn1')(x))
    features, preact = [x], [x]
    x = layers.max_pool(x, 3, strides=2, padding=1)
    x, f, p = cifar_resnet.residual_stages(x, block_cls, zip((64, 128, 256, 512), (1, 2, 2, 2), self.num_blocks),
                                           train, self.dtype)
    return features + f, preact + p, layers.avg_pool_all(x)


# ---------------------------------------------------------------------------------------------------- MobileNetV1

# (output channels, stride) of the 13 depthwise-separable blocks after the stem.
_MBV1_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
                (512, 1), (1024, 2), (1024, 1))
_MBV1_TAPS = (3, 5, 11, 13)


class MobileNetV1(nn.Module):
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    d = self.dtype
    conv = functools.partial(layers.conv, use_bias=False, dtype=d)  # PyTorch default init, as the reference
    x = conv(32, 3, strides=2, padding=1, name='model_0_0')(x)
    x = nn.relu(layers.batch_norm(train, d, name='model_0_1')(x))
    features, preact = [x], [x]
    for i, (out_channels, stride) in enumerate(_MBV1_BLOCKS, start=1):
      cin = x.shape[-1]
      x = conv(cin, 3, strides=stride, padding=1, groups=cin, name=f'model_{i}_0')(x)
      x = nn.relu(layers.batch_norm(train, d, name=f'model_{i}_1')(x))
      x = conv(out_channels, 1, name=f'model_{i}_3')(x)
      pre = layers.batch_norm(train, d, name=f'model_{i}_4')(x)
      x = nn.relu(pre)
      if i in _MBV1_TAPS:
        features.append(x)
        preact.append(pre)
    return features, preact, layers.avg_pool_all(x)


# ---------------------------------------------------------------------------------------------------- ResNet50V2


class ResNetV2(nn.Module):
  """Keras' ResNetV2 family; the defaults are ResNet50V2 (blocks 3-4-6-3). `layout='keras'` takes Keras' BatchNorm
  epsilon (1.001e-5), so that weights imported from Keras files give Keras' outputs."""
  blocks: Sequence[int] = (3, 4, 6, 3)
  widths: Sequence[int] = (64, 128, 256, 512)
  layout: str = 'torch'
  dtype: Any = jnp.float32

  def _bn(self, train: bool, name: str):
    return layers.batch_norm(train, self.dtype, name=name, **_keras_bn(self.layout, 1.001e-5))

  def _block(self, x, filters: int, stride: int, projection: bool, name: str, train: bool):
    d = self.dtype
    pre = nn.relu(self._bn(train, f'{name}_preact_bn')(x))
    if projection:
      shortcut = layers.conv(4 * filters, 1, strides=stride, use_bias=True, fan_in=x.shape[-1], dtype=d,
                             name=f'{name}_0_conv')(pre)
    else:
      # Keras' MaxPooling2D(1, strides=stride) is plain subsampling of the *un-activated* input.
      shortcut = x[:, ::stride, ::stride, :]
    h = layers.conv(filters, 1, dtype=d, name=f'{name}_1_conv')(pre)
    h = nn.relu(self._bn(train, f'{name}_1_bn')(h))
    h = layers.conv(filters, 3, strides=stride, padding=1, dtype=d, name=f'{name}_2_conv')(h)
    h = nn.relu(self._bn(train, f'{name}_2_bn')(h))
    h = layers.conv(4 * filters, 1, use_bias=True, fan_in=filters, dtype=d, name=f'{name}_3_conv')(h)
    return shortcut + h

  @nn.compact
  def __call__(self, x, train: bool = False):
    # Layers are created inline (not in a block submodule) so that they sit flat under Keras' own layer names.
    d = self.dtype
    x = layers.conv(64, 7, strides=2, padding=3, use_bias=True, fan_in=x.shape[-1] * 49, dtype=d,
                    name='conv1_conv')(x)
    features = [x]
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    x = layers.max_pool(x, 3, 2)
    n_stages = len(self.blocks)
    for s, (n, filters) in enumerate(zip(self.blocks, self.widths)):
      last_stride = 2 if s < n_stages - 1 else 1
      for b in range(1, n + 1):
        x = self._block(x, filters, stride=last_stride if b == n else 1, projection=b == 1,
                        name=f'conv{s + 2}_block{b}', train=train)
      features.append(x)
    preact = list(features)
    pre = self._bn(train, 'post_bn')(x)
    x = nn.relu(pre)
    features[-1], preact[-1] = x, pre
    return features, preact, layers.avg_pool_all(x)


# ---------------------------------------------------------------------------------------------------- MobileNetV2


def make_divisible(v: float, divisor: int = 8) -> int:
  """torchvision's channel rounding: nearest multiple of `divisor`, never more than 10% below `v`."""
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  if new_v < 0.9 * v:
    new_v += divisor
  return new_v


# (expansion t, channels c, repeats n, first stride s), torchvision's ImageNet setting.
_MBV2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                 (6, 320, 1, 1))
_MBV2_TAPS = (1, 2, 4, 6)
_conv_init = layers.kaiming_normal_fan_out


def _keras_bn(layout: str, epsilon: float) -> dict:
  if layout not in ('torch', 'keras'):
    raise ValueError(f"layout must be 'torch' or 'keras', got {layout!r}")
  return {'epsilon': epsilon} if layout == 'keras' else {}


class InvertedResidualV2(nn.Module):
  """torchvision's block: [pw expand -> BN -> ReLU6] -> dw 3x3 -> BN -> ReLU6 -> pw linear -> BN (+ identity)."""
  out_channels: int
  stride: int
  expand_ratio: int
  layout: str = 'torch'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    d = self.dtype
    cin = x.shape[-1]
    hidden = int(round(cin * self.expand_ratio))
    h = x
    pad, bn = _mbv2_padding(self.layout), _keras_bn(self.layout, 1e-3)
    # Submodule names follow the reference's Sequential indices, which shift when the expansion conv is absent.
    i = 0
    if self.expand_ratio != 1:
      h = layers.conv(hidden, 1, kernel_init=_conv_init, dtype=d, name='conv_0_0')(h)
      h = nn.relu6(layers.batch_norm(train, d, name='conv_0_1', **bn)(h))
      i = 1
    h = layers.conv(hidden, 3, strides=self.stride, groups=hidden, padding=pad, kernel_init=_conv_init, dtype=d,
                    name=f'conv_{i}_0')(h)
    h = nn.relu6(layers.batch_norm(train, d, name=f'conv_{i}_1', **bn)(h))
    h = layers.conv(self.out_channels, 1, kernel_init=_conv_init, dtype=d, name=f'conv_{i + 1}')(h)
    h = layers.batch_norm(train, d, name=f'conv_{i + 2}', **bn)(h)
    if self.stride == 1 and cin == self.out_channels:
      h = x + h
    return h


def _mbv2_padding(layout: str):
  # Keras pads a stride-2 3x3 conv by (0, 1) on even sizes ('same' for the stem, `correct_pad` for the depthwise
  # convs), torchvision by (1, 1).
  return 'SAME' if layout == 'keras' else None


class MobileNetV2ImageNet(nn.Module):
  """torchvision's mobilenet_v2; `layout='keras'` pads and normalises as `keras.applications.MobileNetV2` (TF 'same'
  padding, BatchNorm epsilon 1e-3), for weights imported from Keras files."""
  width_mult: float = 1.0
  layout: str = 'torch'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    d = self.dtype
    pad, bn = _mbv2_padding(self.layout), _keras_bn(self.layout, 1e-3)
    x = layers.conv(make_divisible(32 * self.width_mult), 3, strides=2, padding=pad, kernel_init=_conv_init,
                    dtype=d, name='features_0_0')(x)
    x = nn.relu6(layers.batch_norm(train, d, name='features_0_1', **bn)(x))
    features = [x]
    index = 1
    for g, (t, c, n, s) in enumerate(_MBV2_SETTING):
      out_channels = make_divisible(c * self.width_mult)
      for j in range(n):
        x = InvertedResidualV2(out_channels, s if j == 0 else 1, t, self.layout, dtype=d,
                               name=f'features_{index}')(x, train)
        index += 1
      if g in _MBV2_TAPS:
        features.append(x)
    last = make_divisible(1280 * max(1.0, self.width_mult))
    x = layers.conv(last, 1, kernel_init=_conv_init, dtype=d, name=f'features_{index}_0')(x)
    x = nn.relu6(layers.batch_norm(train, d, name=f'features_{index}_1', **bn)(x))
    return features, list(features), layers.avg_pool_all(x)


register('resnet18_imagenet', TorchvisionResNet, num_blocks=(2, 2, 2, 2), block='basicblock')
register('resnet34_imagenet', TorchvisionResNet, num_blocks=(3, 4, 6, 3), block='basicblock')
register('resnet50_imagenet', TorchvisionResNet, num_blocks=(3, 4, 6, 3), block='bottleneck')
register('mobilenetv1_imagenet', MobileNetV1)
register('resnet50v2_imagenet', ResNetV2)
register('mobilenetv2_imagenet', MobileNetV2ImageNet, head_dropout=0.2, head_init='normal')
