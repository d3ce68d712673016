"""ViT / DeiT models (kdjax/models/vit.py): parameter counts equal to timm's (its constants always, its own models
where timm imports), the one-line refusal of an image size the patch does not divide, and the timm / DeiT importer
(kdjax/tools/import_torch.py) against timm's own models with random weights, from .pth and .safetensors files."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import checkpoint as ckpt_lib
from kdjax import models
from kdjax.errors import CheckpointMismatchError, ConfigError
from kdjax.tools import import_torch

# timm's parameter counts of its DeiT models (1000 classes, 224 px), as timm reports them.
TIMM_COUNTS = {'deit_tiny': ('deit_tiny_patch16_224', 5_717_416),
               'deit_tiny_distilled': ('deit_tiny_distilled_patch16_224', 5_910_800),
               'deit_small': ('deit_small_patch16_224', 22_050_664)}
# The other registered sizes, compared with timm's own models where timm imports.
TIMM_NAMES = {'deit_small_distilled': 'deit_small_distilled_patch16_224', 'deit_base': 'deit_base_patch16_224',
              'deit_base_distilled': 'deit_base_distilled_patch16_224'}


def _timm():
  try:
    import timm
  except Exception:  # pylint: disable=broad-except  (timm absent, or its torchvision fails to import)
    return None
  return timm


def _count(name: str, size: int = 224, classes: int = 1000, **kw) -> int:
  m = models.create(name, num_classes=classes, **kw)
  shapes = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes['params']))


def test_parameter_counts_are_timms():
  for ours, (_, count) in TIMM_COUNTS.items():
    assert _count(ours) == count, ours
  timm = _timm()
  if timm is None:
    return  # the constants above are checked either way; timm's own models where it imports
  for ours, theirs in {**{k: v for k, (v, _) in TIMM_COUNTS.items()}, **TIMM_NAMES}.items():
    net = timm.create_model(theirs, pretrained=False)
    assert _count(ours) == sum(p.numel() for p in net.parameters()), (ours, theirs)


def test_any_image_size_the_patch_divides_and_a_one_line_refusal_otherwise():
  m = models.create('vit_test', num_classes=10)  # patch 4
  for size in (8, 12):
    v = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, size, size, 1))))
    assert v['params']['backbone']['pos_embed'].shape == (1, 1 + (size // 4) ** 2, 32)
  with pytest.raises(ConfigError) as e:
    jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 10, 10, 1))))
  assert str(e.value) == ('ViT: image size 10x10 is not divisible by the patch size 4 '
                          '(student/teacher.kwargs.patch_size, or data.image_size)')


def test_a_run_with_an_image_size_the_patch_does_not_divide_stops_before_writing(tmp_path):
  from kdjax import train
  from tests.util import digits_config
  cfg = digits_config('vit_test', epochs=1)
  cfg.student.kwargs = {'patch_size': 3}  # digits are 8x8
  with pytest.raises(ConfigError) as e:
    train.run(cfg, str(tmp_path / 'run'))
  assert str(e.value) == ('ViT: image size 8x8 is not divisible by the patch size 3 '
                          '(student/teacher.kwargs.patch_size, or data.image_size)')
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


def test_distilled_model_averages_its_heads_in_eval_and_trains_the_class_head():
  m = models.create('vit_test_distilled', num_classes=10)
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
  v = m.init(jax.random.key(0), x)
  assert set(v['params']) == {'backbone', 'head', 'head_dist'}
  ev, tr = m.apply(v, x), m.apply(v, x, train=True)
  np.testing.assert_allclose(ev.logits, (ev.cls_logits + ev.dist_logits) / 2, rtol=1e-6)
  np.testing.assert_array_equal(tr.logits, tr.cls_logits)
  assert not np.allclose(ev.cls_logits, ev.dist_logits)
  assert models.create('vit_test', num_classes=10).apply(
      models.create('vit_test', num_classes=10).init(jax.random.key(0), x), x).dist_logits is None


# ------------------------------------------------------------------------------------------------ the importer
torch = pytest.importorskip('torch') if _timm() is not None else None


def _timm_vit(distilled: bool, seed: int = 0):
  """timm's own VisionTransformer(Distilled) shaped as `vit_test(_distilled)` (patch 4, width 32, 2 blocks of 2
  heads, MLP ratio 2) for 16x16 RGB images, every tensor drawn at random (timm's init zeroes the biases)."""
  from timm.models.deit import VisionTransformerDistilled
  from timm.models.vision_transformer import VisionTransformer
  cls = VisionTransformerDistilled if distilled else VisionTransformer
  torch.manual_seed(seed)
  net = cls(img_size=16, patch_size=4, in_chans=3, num_classes=10, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
  with torch.no_grad():
    for p in net.parameters():
      p.normal_(0.0, 0.3)
  return net.eval()


def _timm_outputs(net, x):
  """timm's eval logits and, for a distilled model, each head (its distilled_training mode returns both)."""
  t = torch.from_numpy(np.transpose(x, (0, 3, 1, 2)))
  with torch.no_grad():
    logits = net(t).numpy()
    if not hasattr(net, 'head_dist'):
      return logits, None
    net.set_distilled_training(True)
    heads = tuple(h.numpy() for h in net.train()(t))
    net.set_distilled_training(False)
    net.eval()
  return logits, heads


def _state_dict(net):
  return {k: v.detach().numpy() for k, v in net.state_dict().items()}


@pytest.mark.skipif(_timm() is None, reason='timm does not import here (it needs torchvision)')
@pytest.mark.parametrize('distilled', [False, True])
def test_import_equals_timms_model(distilled):
  net = _timm_vit(distilled)
  name = 'vit_test_distilled' if distilled else 'vit_test'
  x = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype(np.float32)
  variables = import_torch.convert(_state_dict(net), name, image_shape=(16, 16, 3))
  ours = models.create(name, num_classes=10).apply(variables, jnp.asarray(x))
  logits, heads = _timm_outputs(net, x)
  assert np.abs(logits).max() > 0.5  # random weights: logits far from zero, so the tolerance below means something
  # Measured: at most 4.8e-7 apart (vit_test), 2.4e-7 (vit_test_distilled), 5.1e-7 (deit_tiny_distilled at 224).
  np.testing.assert_allclose(ours.logits, logits, rtol=1e-5, atol=2e-5)
  if distilled:
    np.testing.assert_allclose(ours.cls_logits, heads[0], rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(ours.dist_logits, heads[1], rtol=1e-5, atol=2e-5)


@pytest.mark.skipif(_timm() is None, reason='timm does not import here (it needs torchvision)')
def test_import_of_deit_and_timm_files_and_one_line_mismatches(tmp_path):
  """DeiT's own release format ({'model': state_dict} in a .pth) and timm's hub format (a bare state_dict in a
  .safetensors file) through the CLI; a wrong architecture is one line naming the weight and both shapes."""
  from safetensors.torch import save_file
  net = _timm_vit(True, seed=1)
  pth, st = str(tmp_path / 'deit.pth'), str(tmp_path / 'model.safetensors')
  torch.save({'model': net.state_dict(), 'epoch': 300}, pth)
  save_file({k: v.contiguous() for k, v in net.state_dict().items()}, st)
  x = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32)
  expected = _timm_outputs(net, x)[0]
  m = models.create('vit_test_distilled', num_classes=10)
  target = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
  for i, path in enumerate((pth, st)):
    out = str(tmp_path / f'out{i}')
    assert import_torch.main([path, out, '--model', 'vit_test_distilled', '--image_size', '16',
                              '--dataset', 'imagenet2012']) == 0
    variables, meta = ckpt_lib.load_model(out, target)
    assert meta['num_classes'] == 10 and meta['image_shape'] == [16, 16, 3]
    np.testing.assert_allclose(m.apply(variables, jnp.asarray(x)).logits, expected, rtol=1e-5, atol=2e-5)

  cut = str(tmp_path / 'cut.safetensors')
  with open(st, 'rb') as f, open(cut, 'wb') as g:
    g.write(f.read()[:-100])
  with pytest.raises(ConfigError) as e:
    import_torch.load_state_dict(cut)
  assert str(e.value) == (f'cannot read {cut}: SafetensorError: Error while deserializing header: incomplete '
                          'metadata, file not fully covered')

  sd = _state_dict(net)
  with pytest.raises(CheckpointMismatchError) as e:  # another image size: the position embeddings differ
    import_torch.convert(sd, 'vit_test_distilled', image_shape=(32, 32, 3))
  assert str(e.value) == ("state_dict key 'pos_embed' has shape (1, 18, 32) but vit_test_distilled expects "
                          "(1, 66, 32) at backbone/pos_embed")
  with pytest.raises(CheckpointMismatchError) as e:  # a DeiT without the distillation token
    import_torch.convert(sd, 'vit_test', image_shape=(16, 16, 3))
  assert str(e.value) == ("state_dict key 'pos_embed' has shape (1, 18, 32) but vit_test expects (1, 17, 32) at "
                          "backbone/pos_embed")
  with pytest.raises(CheckpointMismatchError) as e:  # another width
    import_torch.convert(sd, 'vit_test_distilled', image_shape=(16, 16, 3), model_kwargs={'embed_dim': 64})
  assert str(e.value) == ("state_dict key 'cls_token' has shape (1, 1, 32) but vit_test_distilled expects "
                          "(1, 1, 64) at backbone/cls_token")
  with pytest.raises(CheckpointMismatchError) as e:  # a deeper model: the file lacks its third block
    import_torch.convert(sd, 'vit_test_distilled', image_shape=(16, 16, 3), model_kwargs={'depth': 3})
  assert str(e.value).startswith("state_dict has no key 'blocks.2.") and '\n' not in str(e.value)
  assert str(e.value).endswith('(12 of 47 tensors missing): the checkpoint holds another architecture than '
                               'vit_test_distilled')
  with pytest.raises(CheckpointMismatchError) as e:  # a shallower model: the file's second block is left over
    import_torch.convert(sd, 'vit_test_distilled', image_shape=(16, 16, 3), model_kwargs={'depth': 1})
  assert str(e.value).startswith("state_dict key 'blocks.1.") and '\n' not in str(e.value)


@pytest.mark.skipif(_timm() is None, reason='timm does not import here (it needs torchvision)')
def test_a_timm_file_of_another_model_is_refused_in_one_line():
  """timm's ResNet-18 state_dict offered as a DeiT: its first tensor has no counterpart in the ViT."""
  import timm
  torch.manual_seed(0)
  sd = _state_dict(timm.create_model('resnet18', num_classes=10))
  with pytest.raises(CheckpointMismatchError) as e:
    import_torch.convert(sd, 'vit_test_distilled', num_classes=10, image_shape=(16, 16, 3))
  assert str(e.value) == ("state_dict key 'conv1.weight' (shape (64, 3, 7, 7)) has no counterpart in "
                          'vit_test_distilled: the checkpoint holds another architecture (or a different naming) '
                          'than vit_test_distilled')


@pytest.mark.skipif(_timm() is None, reason='timm does not import here (it needs torchvision)')
def test_registered_deit_equals_timms_at_224():
  """The registered `deit_tiny_distilled` (heads, MLP ratio, patch 16: what parameter counts cannot tell) against
  timm's `deit_tiny_distilled_patch16_224`, random weights, one 224 px image."""
  timm = _timm()
  torch.manual_seed(2)
  net = timm.create_model('deit_tiny_distilled_patch16_224', pretrained=False, num_classes=10)
  with torch.no_grad():
    for p in net.parameters():
      p.normal_(0.0, 0.2)
  net.eval()
  x = np.random.default_rng(2).normal(size=(1, 224, 224, 3)).astype(np.float32)
  variables = import_torch.convert(_state_dict(net), 'deit_tiny_distilled', image_shape=(224, 224, 3))
  ours = models.create('deit_tiny_distilled', num_classes=10).apply(variables, jnp.asarray(x))
  logits, heads = _timm_outputs(net, x)
  assert np.abs(logits).max() > 0.5
  np.testing.assert_allclose(ours.logits, logits, rtol=1e-5, atol=2e-5)
  np.testing.assert_allclose(ours.dist_logits, heads[1], rtol=1e-5, atol=2e-5)


def test_gelu_is_the_exact_erf_gelu():
  """The MLP's GELU against x * (1 + erf(x / sqrt 2)) / 2 in float64 (math.erf), over the range activations take,
  and against jax.nn.gelu(approximate=False), the same function through erfc."""
  import math
  from kdjax.models import vit
  x = np.linspace(-8.0, 8.0, 4001, dtype=np.float32)
  expected = np.array([v * (1.0 + math.erf(v / math.sqrt(2.0))) / 2.0 for v in x.astype(np.float64)])
  got = np.asarray(vit.gelu(jnp.asarray(x)), np.float64)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)  # float32 round-off of values up to 8
  np.testing.assert_allclose(got, np.asarray(jax.nn.gelu(jnp.asarray(x), approximate=False)), rtol=1e-6, atol=1e-6)
  tanh = np.asarray(jax.nn.gelu(jnp.asarray(x), approximate=True), np.float64)
  assert np.max(np.abs(tanh - expected)) > 1e-4  # the tanh approximation is not what the model computes
