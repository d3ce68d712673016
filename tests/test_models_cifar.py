"""The RepDistiller CIFAR architectures: exact parameter counts, output/feature shapes, one real forward pass.

Counts and shapes come from `jax.eval_shape` (tracing only, no compilation) so the big models stay cheap.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import models

NUM_CLASSES = 100

# Trainable parameters with a 100-way head, as the reference PyTorch models report them (BN running stats excluded).
PARAM_COUNTS = {
    'resnet8': 83_892,
    'resnet14': 181_108,
    'resnet20': 278_324,
    'resnet32': 472_756,
    'resnet44': 667_188,
    'resnet56': 861_620,
    'resnet110': 1_736_564,
    'resnet8x4': 1_233_540,
    'resnet32x4': 7_433_860,
    'wrn_16_1': 180_916,
    'wrn_16_2': 703_284,
    'wrn_40_1': 569_780,
    'wrn_40_2': 2_255_156,
    'vgg8': 3_965_028,
    'vgg11': 9_277_284,
    'vgg13': 9_462_180,
    'vgg16': 14_774_436,
    'vgg19': 20_086_692,
    'ResNet18': 11_220_132,
    # ResNet34 from resnetv2.py by hand (3x3 conv c->c' = 9cc', BN = 2c', blocks [3, 4, 6, 3]):
    #   stem    1728 + 128                                                    =      1,856
    #   layer1  3 x (2*36864 + 256)                                           =    221,952
    #   layer2  (73728 + 147456 + 512 + 8192 + 256) + 3 x (2*147456 + 512)    =  1,116,416
    #   layer3  (294912 + 589824 + 1024 + 32768 + 512) + 5 x (2*589824 + 1024) = 6,822,400
    #   layer4  (1179648 + 2359296 + 2048 + 131072 + 1024) + 2 x (2*2359296 + 2048) = 13,114,368
    #   fc      512*100 + 100                                                 =     51,300
    #   total                                                                 = 21,328,292
    'ResNet34': 21_328_292,
    'ResNet50': 23_705_252,
}


def _small(c):  # stage maps at 32x32 for the 16/32/64-style CIFAR nets, `c` = (stem, s1, s2, s3) channels
  return [(32, 32, c[0]), (32, 32, c[1]), (16, 16, c[2]), (8, 8, c[3])]


# (feature map shapes without the batch axis, embedding width) on a 32x32 input.
_VGG = ([(32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512), (4, 4, 512)], 512)
_RESNET_LARGE = lambda e: ([(32, 32, 64), (32, 32, 64 * e), (16, 16, 128 * e), (8, 8, 256 * e), (4, 4, 512 * e)],
                           512 * e)
SHAPES = {
    **{f'resnet{d}': (_small((16, 16, 32, 64)), 64) for d in (8, 14, 20, 32, 44, 56, 110)},
    'resnet8x4': (_small((32, 64, 128, 256)), 256),
    'resnet32x4': (_small((32, 64, 128, 256)), 256),
    'wrn_16_1': (_small((16, 16, 32, 64)), 64),
    'wrn_40_1': (_small((16, 16, 32, 64)), 64),
    'wrn_16_2': (_small((16, 32, 64, 128)), 128),
    'wrn_40_2': (_small((16, 32, 64, 128)), 128),
    **{f'vgg{d}': _VGG for d in (8, 11, 13, 16, 19)},
    'ResNet18': _RESNET_LARGE(1),
    'ResNet34': _RESNET_LARGE(1),
    'ResNet50': _RESNET_LARGE(4),
}


@functools.lru_cache(maxsize=None)
def _abstract(name):
  """(output, variables) as ShapeDtypeStructs for a batch of two 32x32x3 images, traced once per model."""
  model = models.create(name, num_classes=NUM_CLASSES)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False), x)


def _count(tree):
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def test_every_model_is_registered():
  assert set(PARAM_COUNTS) <= set(models.names())
  assert set(SHAPES) == set(PARAM_COUNTS)


@pytest.mark.parametrize('name', sorted(PARAM_COUNTS))
def test_param_count_matches_reference(name):
  _, variables = _abstract(name)
  assert _count(variables['params']) == PARAM_COUNTS[name]


@pytest.mark.parametrize('name', sorted(SHAPES))
def test_output_and_feature_shapes(name):
  out, _ = _abstract(name)
  feature_shapes, dim = SHAPES[name]
  assert out.logits.shape == (2, NUM_CLASSES)
  assert out.embedding.shape == (2, dim)
  assert [f.shape for f in out.features] == [(2, *s) for s in feature_shapes]
  assert [p.shape for p in out.preact] == [f.shape for f in out.features]


def test_bfloat16_compute_keeps_float32_params():
  model = models.create('resnet8', num_classes=10, dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  out, variables = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False), x)
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert all(f.dtype == jnp.bfloat16 for f in out.features)
  assert out.logits.dtype == jnp.float32


def test_resnet8_train_step_runs_on_small_inputs():
  model = models.create('resnet8', num_classes=10)
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  # jit: one small compile is cheaper than dispatching every op eagerly.
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
  out, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(variables, x)
  assert out.logits.shape == (4, 10)
  assert [f.shape[1:3] for f in out.features] == [(8, 8), (8, 8), (4, 4), (2, 2)]
  for leaf in jax.tree_util.tree_leaves((out.logits, out.embedding, out.features, out.preact)):
    assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
  # The last stage's preact differs from its feature map by the ReLU alone.
  np.testing.assert_allclose(out.features[-1], jnp.maximum(out.preact[-1], 0))
  old, new = variables['batch_stats'], updates['batch_stats']
  assert jax.tree_util.tree_structure(old) == jax.tree_util.tree_structure(new)
  changed = jax.tree_util.tree_map(lambda a, b: not np.allclose(a, b), old, new)
  assert all(jax.tree_util.tree_leaves(changed))


@pytest.mark.parametrize('name', [pytest.param('resnet8', marks=pytest.mark.slow), 'wrn_16_1',
                                  pytest.param('ShuffleV2', marks=pytest.mark.slow)])
def test_bfloat16_forward_is_close_to_float32(name):
  """Stated tolerance: with bfloat16 activations (float32 parameters and BatchNorm statistics) the logits stay
  within 3% (relative L2) of the float32 logits, and the top-1 predictions agree on at least 90% of inputs."""
  x = jax.random.normal(jax.random.key(1), (32, 32, 32, 3))
  f32 = models.create(name, num_classes=100)
  bf16 = models.create(name, num_classes=100, dtype=jnp.bfloat16)
  variables = f32.init(jax.random.key(0), x)
  a = np.asarray(f32.apply(variables, x).logits)
  b = np.asarray(bf16.apply(variables, x).logits, np.float32)
  assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.03
  assert np.mean(a.argmax(-1) == b.argmax(-1)) >= 0.9


@pytest.mark.parametrize('name,zero_bias,small_weights', [('vgg8', True, True), ('wrn_16_1', True, False),
                                                           ('resnet8', False, False)])
def test_head_init_follows_the_reference(name, zero_bias, small_weights):
  m = models.create(name, num_classes=100)
  head = m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']['head']
  assert (np.abs(head['bias']).max() == 0) == zero_bias
  std = float(np.std(head['kernel']))
  assert (abs(std - 0.01) < 0.002) == small_weights
