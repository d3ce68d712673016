"""Mobile CIFAR architectures (MobileNetV2, ShuffleNet V1/V2), AlexNet and the ImageNet transfer backbones.

Everything runs under jax.eval_shape (tracing only, no compilation), so the whole file is quick on CPU.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import models
from kdjax.models.shufflenet import channel_shuffle


@functools.lru_cache(maxsize=None)
def _abstract(name, num_classes, input_shape, dtype=jnp.float32):
  """(variables, outputs) as ShapeDtypeStructs for a batch of 2."""
  model = models.create(name, num_classes=num_classes, dtype=dtype)
  x = jax.ShapeDtypeStruct((2, *input_shape), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  return variables, out


def _num_params(variables):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables['params']))


# ------------------------------------------------------------------------------------------------ parameter counts

# Reference CIFAR models, num_classes=100: the counts of RepDistiller's PyTorch models.
# MobileNetV2_1_0 by hand (reference structure, T=6; a block with input i, output o, hidden h = i*t costs
# i*h + 9*h + h*o weights plus 2*(h + h + o) BN params): stem 3*32*9 + 64 = 928; block groups 1,984 + 13,968 +
# 39,696 + 183,872 + 303,168 + 795,264 + 473,920; last conv 320*1280 + 2*1280 = 412,160; Linear 1280*100 + 100 =
# 128,100; total 2,353,060.
# AlexNet (10 classes) by hand: convs 3*64*9+64 = 1,792; 64*192*9+192 = 110,784; 192*384*9+384 = 663,936;
# 384*256*9+256 = 884,992; 256*256*9+256 = 590,080; Linears 256*4096+4096 = 1,052,672; 4096*4096+4096 =
# 16,781,312; 4096*10+10 = 40,970; total 20,126,538.
# ImageNet models, 1000 classes: Keras' ResNet50V2 reports 25,568,360 trainable params (25,613,800 with the BN
# moving statistics, which are our batch_stats); torchvision's mobilenet_v2 has 3,504,872 parameters.
PARAM_COUNTS = [
    ('MobileNetV2', 100, 812_836),
    ('mobile_half', 100, 812_836),
    ('ShuffleV1', 100, 949_258),
    ('ShuffleV2', 100, 1_355_528),
    ('MobileNetV2_1_0', 100, 2_353_060),
    ('alexnet', 10, 20_126_538),
]
# torchvision's resnet18/34/50 have 11,689,512 / 21,797,672 / 25,557,032 parameters (its model docs). mdistiller's
# MobileNetV1 (mdistiller/models/imagenet/mobilenetv1.py), by hand: stem 3*32*9 + 2*32 = 928; each of the 13
# depthwise-separable blocks cin*9 + 2*cin + cin*cout + 2*cout (bias-free convs, BN weight and bias); fc
# 1024*1000 + 1000: 4,231,976 in all.
IMAGENET_COUNTS = [
    ('resnet50v2_imagenet', 25_568_360),
    ('mobilenetv2_imagenet', 3_504_872),
    ('resnet18_imagenet', 11_689_512),
    ('resnet34_imagenet', 21_797_672),
    ('resnet50_imagenet', 25_557_032),
    ('mobilenetv1_imagenet', 4_231_976),
]


@pytest.mark.parametrize('name,num_classes,expected', PARAM_COUNTS)
def test_param_count_cifar(name, num_classes, expected):
  variables, _ = _abstract(name, num_classes, (32, 32, 3))
  assert _num_params(variables) == expected


@pytest.mark.parametrize('name,expected', IMAGENET_COUNTS)
def test_param_count_imagenet(name, expected):
  variables, _ = _abstract(name, 1000, (224, 224, 3))
  assert _num_params(variables) == expected


# ------------------------------------------------------------------------------------------------ output shapes

# (name, embedding width, feature map shapes without the batch axis) on 32x32x3.
SHAPES_32 = [
    ('MobileNetV2', 1280, [(16, 16, 16), (16, 16, 12), (8, 8, 16), (4, 4, 48), (2, 2, 160)]),
    ('mobile_half', 1280, [(16, 16, 16), (16, 16, 12), (8, 8, 16), (4, 4, 48), (2, 2, 160)]),
    ('MobileNetV2_1_0', 1280, [(16, 16, 32), (16, 16, 24), (8, 8, 32), (4, 4, 96), (2, 2, 320)]),
    ('ShuffleV1', 960, [(32, 32, 24), (16, 16, 240), (8, 8, 480), (4, 4, 960)]),
    ('ShuffleV2', 1024, [(32, 32, 24), (16, 16, 116), (8, 8, 232), (4, 4, 464)]),
    ('alexnet', 4096, [(16, 16, 64), (8, 8, 192), (4, 4, 384), (4, 4, 256), (4, 4, 256)]),
]
SHAPES_224 = [
    ('resnet50v2_imagenet', 2048, [(112, 112, 64), (28, 28, 256), (14, 14, 512), (7, 7, 1024), (7, 7, 2048)]),
    ('mobilenetv2_imagenet', 1280, [(112, 112, 32), (56, 56, 24), (28, 28, 32), (14, 14, 96), (7, 7, 320)]),
    ('resnet18_imagenet', 512, [(112, 112, 64), (56, 56, 64), (28, 28, 128), (14, 14, 256), (7, 7, 512)]),
    ('resnet50_imagenet', 2048, [(112, 112, 64), (56, 56, 256), (28, 28, 512), (14, 14, 1024), (7, 7, 2048)]),
    ('mobilenetv1_imagenet', 1024, [(112, 112, 32), (56, 56, 128), (28, 28, 256), (14, 14, 512), (7, 7, 1024)]),
]


def _check_output(out, num_classes, embed, feature_shapes):
  assert out.logits.shape == (2, num_classes) and out.logits.dtype == jnp.float32
  assert out.embedding.shape == (2, embed)
  assert [f.shape[1:] for f in out.features] == [tuple(s) for s in feature_shapes]
  assert [p.shape for p in out.preact] == [f.shape for f in out.features]


@pytest.mark.parametrize('name,embed,feature_shapes', SHAPES_32)
def test_shapes_32(name, embed, feature_shapes):
  _, out = _abstract(name, 100, (32, 32, 3))
  _check_output(out, 100, embed, feature_shapes)


@pytest.mark.parametrize('name,embed,feature_shapes', SHAPES_224)
def test_shapes_224(name, embed, feature_shapes):
  _, out = _abstract(name, 1000, (224, 224, 3))
  _check_output(out, 1000, embed, feature_shapes)


@pytest.mark.parametrize('name', [s[0] for s in SHAPES_32])
@pytest.mark.parametrize('size', [8, 28])
def test_small_grayscale_inputs(name, size):
  _, out = _abstract(name, 10, (size, size, 1))
  assert out.logits.shape == (2, 10)
  assert all(min(f.shape[1:3]) >= 1 for f in out.features)
  assert [p.shape for p in out.preact] == [f.shape for f in out.features]


def test_imagenet_models_take_small_inputs():
  for name in ('resnet50v2_imagenet', 'mobilenetv2_imagenet', 'resnet18_imagenet', 'mobilenetv1_imagenet'):
    _, out = _abstract(name, 10, (32, 32, 3))
    assert out.logits.shape == (2, 10)
    assert out.features[-1].shape[1:3] == (1, 1)


def test_mixed_precision_dtypes():
  variables, out = _abstract('ShuffleV2', 10, (32, 32, 3), jnp.bfloat16)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables['params']))
  assert all(f.dtype == jnp.bfloat16 for f in out.features + out.preact)
  assert out.logits.dtype == jnp.float32


# ------------------------------------------------------------------------------------------------ import layout


def test_channel_shuffle_matches_pytorch_nchw():
  n, c, h, w, g = 2, 12, 3, 5, 3
  nchw = np.random.default_rng(0).standard_normal((n, c, h, w)).astype(np.float32)
  # PyTorch: x.view(N, g, C//g, H, W).permute(0, 2, 1, 3, 4).reshape(N, C, H, W)
  expected = nchw.reshape(n, g, c // g, h, w).transpose(0, 2, 1, 3, 4).reshape(n, c, h, w)
  got = channel_shuffle(jnp.asarray(nchw.transpose(0, 2, 3, 1)), g)
  np.testing.assert_array_equal(np.asarray(got), expected.transpose(0, 2, 3, 1))


def _paths(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _paths(v, prefix + (k,))
  else:
    yield '/'.join(prefix), tuple(tree.shape)


# Spot checks of the state_dict -> param-path convention documented in each model file (kernel shapes are HWIO).
EXPECTED_PATHS = [
    ('MobileNetV2', {'backbone/conv1_0/kernel': (3, 3, 3, 16), 'backbone/blocks_2_1/conv_3/kernel': (3, 3, 1, 96),
                     'backbone/blocks_6_0/conv_7/scale': (160,), 'backbone/conv2_0/kernel': (1, 1, 160, 1280),
                     'head/kernel': (1280, 100)}),
    ('ShuffleV1', {'backbone/conv1/kernel': (1, 1, 3, 24), 'backbone/layer1_0/conv1/kernel': (1, 1, 24, 54),
                   'backbone/layer2_1/conv1/kernel': (1, 1, 160, 120), 'backbone/layer3_3/bn3/bias': (960,),
                   'head/kernel': (960, 100)}),
    ('ShuffleV2', {'backbone/layer1_0/conv1/kernel': (3, 3, 1, 24), 'backbone/layer1_0/conv5/kernel': (1, 1, 58, 58),
                   'backbone/layer2_7/conv2/kernel': (3, 3, 1, 116), 'backbone/conv2/kernel': (1, 1, 464, 1024),
                   'head/bias': (100,)}),
]


@pytest.mark.parametrize('name,expected', EXPECTED_PATHS)
def test_param_paths(name, expected):
  variables, _ = _abstract(name, 100, (32, 32, 3))
  paths = dict(_paths(variables['params']))
  for path, shape in expected.items():
    assert paths.get(path) == shape, path


def test_param_paths_imagenet():
  variables, _ = _abstract('resnet50v2_imagenet', 1000, (224, 224, 3))
  paths = dict(_paths(variables['params']))
  assert paths['backbone/conv1_conv/bias'] == (64,)
  assert paths['backbone/conv2_block1_0_conv/kernel'] == (1, 1, 64, 256)
  assert paths['backbone/conv4_block6_2_conv/kernel'] == (3, 3, 256, 256)
  assert paths['backbone/post_bn/scale'] == (2048,)
  assert 'backbone/conv2_block2_0_conv/kernel' not in paths
  variables, _ = _abstract('mobilenetv2_imagenet', 1000, (224, 224, 3))
  paths = dict(_paths(variables['params']))
  assert paths['backbone/features_1/conv_0_0/kernel'] == (3, 3, 1, 32)
  assert paths['backbone/features_1/conv_1/kernel'] == (1, 1, 32, 16)
  assert paths['backbone/features_2/conv_1_0/kernel'] == (3, 3, 1, 96)
  assert paths['backbone/features_2/conv_3/scale'] == (24,)
  assert paths['backbone/features_18_0/kernel'] == (1, 1, 320, 1280)
