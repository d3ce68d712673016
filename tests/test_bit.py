"""BiT ResNet-V2 (kdjax/models/bit.py) and its `.npz` importer (kdjax/tools/import_bit.py): parameter counts equal
timm's `resnetv2_*_bit` models; a BiT file written here from timm's own model (and checked to load into timm through
timm's own BiT loader, `_load_weights`) imports into kdjax with logits equal to timm's; wrong files are one line."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import checkpoint as ckpt_lib
from kdjax import models
from kdjax.errors import CheckpointMismatchError, ConfigError
from kdjax.models import bit
from kdjax.tools import import_bit

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
resnetv2 = pytest.importorskip('timm.models.resnetv2')


def _count(name: str) -> int:
  m = models.create(name, num_classes=1000)
  shapes = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes['params']))


@pytest.mark.parametrize('name', ['resnetv2_50x1_bit', 'resnetv2_101x1_bit'])
def test_parameter_counts_are_timms(name):
  theirs = sum(p.numel() for p in timm.create_model(name, num_classes=1000).parameters())
  assert _count(name) == theirs
  assert _count('resnetv2_50x1_bit') == 25_549_352


def _timm_test_bit(seed=0, classes=10):
  """timm's ResNetV2 as its `resnetv2_*_bit` models build it (fixed stem, StdConv2d eps 1e-8, GroupNorm 32), one
  unit per stage: kdjax's `resnetv2_test_bit`; random norms and head so that every parameter matters."""
  torch.manual_seed(seed)
  from timm.layers import StdConv2d
  net = resnetv2.ResNetV2(layers=[1, 1, 1, 1], num_classes=classes, stem_type='fixed',
                          conv_layer=partial(StdConv2d, eps=1e-8)).eval()
  with torch.no_grad():
    for name, p in net.named_parameters():
      if 'norm' in name or 'head' in name:
        p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith('weight') and 'norm' in name else 0.0))
  return net


def _bit_arrays(net) -> dict:
  """timm's model as a BiT .npz's arrays: the inverse of timm's `_load_weights` (HWIO kernels, 'resnet/' names)."""
  hwio = lambda w: w.detach().numpy().transpose(2, 3, 1, 0)
  vec = lambda w: w.detach().numpy()
  out = {'resnet/root_block/standardized_conv2d/kernel': hwio(net.stem.conv.weight),
         'resnet/group_norm/gamma': vec(net.norm.weight), 'resnet/group_norm/beta': vec(net.norm.bias),
         'resnet/head/conv2d/kernel': hwio(net.head.fc.weight), 'resnet/head/conv2d/bias': vec(net.head.fc.bias)}
  for i, stage in enumerate(net.stages):
    for j, block in enumerate(stage.blocks):
      p = f'resnet/block{i + 1}/unit{j + 1:02d}/'
      for part, conv, norm in (('a', block.conv1, block.norm1), ('b', block.conv2, block.norm2),
                               ('c', block.conv3, block.norm3)):
        out[f'{p}{part}/standardized_conv2d/kernel'] = hwio(conv.weight)
        out[f'{p}{part}/group_norm/gamma'] = vec(norm.weight)
        out[f'{p}{part}/group_norm/beta'] = vec(norm.bias)
      if block.downsample is not None:
        out[f'{p}a/proj/standardized_conv2d/kernel'] = hwio(block.downsample.conv.weight)
  return out


def test_a_bit_file_imports_with_timms_logits(tmp_path):
  net = _timm_test_bit()
  arrays = _bit_arrays(net)
  path = str(tmp_path / 'bit.npz')
  np.savez(path, **arrays)
  # The file is BiT's layout: timm's own loader fills a fresh model from it with the same weights.
  fresh = _timm_test_bit(seed=1)
  with torch.no_grad():
    resnetv2._load_weights(fresh, path)
  for (name, a), b in zip(net.state_dict().items(), fresh.state_dict().values()):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)

  _imports_with_timms_logits(net, path, str(tmp_path / 'imported'))


def _imports_with_timms_logits(net, path: str, out: str):
  x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    expected = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  assert import_bit.main([path, out, '--model', 'resnetv2_test_bit', '--image_size', '64']) == 0
  m = models.create('resnetv2_test_bit', num_classes=10)
  target = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  variables, meta = ckpt_lib.load_model(out, target)
  assert meta['num_classes'] == 10 and meta['model'] == 'resnetv2_test_bit'
  got = np.asarray(m.apply(variables, jnp.asarray(x)).logits)
  np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4)
  assert np.abs(expected).max() > 0.1  # the comparison is not of two near-zero outputs


def _big_vision_arrays(net, prefix: str) -> dict:
  """timm's model in big_vision's own ResNet-V2 layout (big_vision/models/bit_paper.py's module names: RootBlock
  'root_block/conv_root', units 'unit01', ..., convolutions 'conv1..3' each after the norm 'gn1..3', the projection
  'conv_proj', the final 'norm-pre-head'; GroupNorm parameters [1, 1, 1, C], a Dense head [C, classes])."""
  hwio = lambda w: w.detach().numpy().transpose(2, 3, 1, 0)
  norm = lambda w: w.detach().numpy().reshape(1, 1, 1, -1)
  out = {'root_block/conv_root/kernel': hwio(net.stem.conv.weight),
         'norm-pre-head/scale': norm(net.norm.weight), 'norm-pre-head/bias': norm(net.norm.bias),
         'head/kernel': net.head.fc.weight.detach().numpy()[:, :, 0, 0].T,
         'head/bias': net.head.fc.bias.detach().numpy()}
  for i, stage in enumerate(net.stages):
    for j, block in enumerate(stage.blocks):
      p = f'block{i + 1}/unit{j + 1:02d}/'
      for k, (conv, gn) in enumerate(((block.conv1, block.norm1), (block.conv2, block.norm2),
                                      (block.conv3, block.norm3)), 1):
        out[f'{p}conv{k}/kernel'] = hwio(conv.weight)
        out[f'{p}gn{k}/scale'], out[f'{p}gn{k}/bias'] = norm(gn.weight), norm(gn.bias)
      if block.downsample is not None:
        out[f'{p}conv_proj/kernel'] = hwio(block.downsample.conv.weight)
  return {prefix + k: v for k, v in out.items()}


@pytest.mark.parametrize('prefix', ['params/', ''])
def test_a_big_vision_file_imports_with_timms_logits(tmp_path, prefix):
  net = _timm_test_bit(seed=3)
  arrays = _big_vision_arrays(net, prefix)
  if prefix:  # a training checkpoint: the optimizer's state beside the parameters is left out
    arrays['opt/0/mu/head/kernel'] = np.zeros((3, 3), np.float32)
  path = str(tmp_path / 'bv.npz')
  np.savez(path, **arrays)
  _imports_with_timms_logits(net, path, str(tmp_path / 'imported'))
  odd = dict(_big_vision_arrays(net, prefix), **{f'{prefix}block1/unit01/conv9/kernel': np.ones(4, np.float32)})
  with pytest.raises(CheckpointMismatchError) as e:
    import_bit.convert(import_bit.from_big_vision(odd), 'resnetv2_test_bit', image_shape=(32, 32, 3))
  assert str(e.value) == ("BiT weight 'block1/unit01/conv9/kernel' (shape (4,)) has no counterpart in "
                          'resnetv2_test_bit: the file holds another architecture than resnetv2_test_bit')


def test_weight_standardisation_is_timms():
  from timm.layers import StdConv2d
  torch.manual_seed(2)
  conv = StdConv2d(5, 7, 3, eps=1e-8)
  w = conv.weight.detach().numpy()  # OIHW
  expected = torch.nn.functional.batch_norm(conv.weight.reshape(1, 7, -1), None, None, training=True, momentum=0.0,
                                            eps=1e-8).reshape_as(conv.weight).detach().numpy()
  got = np.asarray(bit.standardize(jnp.asarray(w.transpose(2, 3, 1, 0))))
  np.testing.assert_allclose(got, expected.transpose(2, 3, 1, 0), rtol=1e-5, atol=1e-6)


def test_wrong_files_are_refused_in_one_line(tmp_path):
  arrays = {k[len('resnet/'):]: v for k, v in _bit_arrays(_timm_test_bit()).items()}
  with pytest.raises(CheckpointMismatchError) as e:  # a deeper model: the file lacks block1's second unit
    import_bit.convert(arrays, 'resnetv2_50x1_bit', image_shape=(32, 32, 3))
  assert str(e.value) == ("the file has no BiT weight 'block1/unit02/a/standardized_conv2d/kernel' (shape (1, 1, "
                          '256, 64) in resnetv2_50x1_bit): it holds another architecture than resnetv2_50x1_bit')
  wide = dict(arrays, **{'root_block/standardized_conv2d/kernel': np.zeros((7, 7, 3, 128), np.float32)})
  with pytest.raises(CheckpointMismatchError) as e:
    import_bit.convert(wide, 'resnetv2_test_bit', image_shape=(32, 32, 3))
  assert str(e.value) == ('BiT weight root_block/standardized_conv2d/kernel has shape (7, 7, 3, 128) but '
                          'resnetv2_test_bit expects (7, 7, 3, 64) at backbone/root/kernel')
  extra = dict(arrays, **{'block5/unit01/a/group_norm/gamma': np.ones(8, np.float32)})
  with pytest.raises(CheckpointMismatchError) as e:
    import_bit.convert(extra, 'resnetv2_test_bit', image_shape=(32, 32, 3))
  assert str(e.value) == ("BiT weight 'block5/unit01/a/group_norm/gamma' (shape (8,)) has no counterpart in "
                          'resnetv2_test_bit: the file holds another architecture than resnetv2_test_bit')
  bad = tmp_path / 'bad.npz'
  bad.write_bytes(b'not a zip file')
  with pytest.raises(ConfigError, match=f'^cannot read {bad} as a .npz of arrays: '):
    import_bit.read_npz(str(bad))
  pickled = tmp_path / 'pickled.npz'
  np.savez(pickled, x=np.array([{'code': 1}], dtype=object))
  with pytest.raises(ConfigError, match=r'^cannot read .*pickled.npz as a .npz of arrays: .*allow_pickle'):
    import_bit.read_npz(str(pickled))
