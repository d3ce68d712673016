"""kdjax.tools.import_torch: PyTorch state_dicts of the reference CIFAR models give the same eval-mode logits.

The torch modules below are compact re-implementations of the reference networks (RepDistiller models/resnet.py,
wrn.py, vgg.py, ShuffleNetv2.py, mobilenetv2.py) with the same module names, hence the same state_dict keys, and
the same forward computation. Their weights and BatchNorm statistics are random, so a wrong transpose, a swapped
BN pair or a misplaced key changes the logits.
"""

import argparse
import contextlib
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip('torch')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from kdjax import checkpoint as ckpt_lib  # noqa: E402
from kdjax import models  # noqa: E402
from kdjax.errors import CheckpointMismatchError  # noqa: E402
from kdjax.tools import import_torch  # noqa: E402
from kdjax.tools.torch_reference import (CifarResNet, MobileNetV2, ShuffleNetV2, VGG,  # noqa: E402
                                         WideResNet)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 1e-4

# -------------------------------------------------------------------------------------------------------- helpers


def randomize(net: nn.Module, seed: int, size: int = 32) -> nn.Module:
  """Random weights, BN affine parameters and running statistics; returns the net in eval mode.

  The running statistics are those of a random calibration batch (so activations stay O(1) through deep nets and
  the float32 comparison stays meaningful), then perturbed per channel, so no BN is an identity or a batch-stat BN.
  """
  g = torch.Generator().manual_seed(seed)

  def rand(shape, lo, hi):
    return lo + (hi - lo) * torch.rand(shape, generator=g)

  bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, (nn.Conv2d, nn.Linear)):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
        if m.bias is not None:
          m.bias.copy_(rand(m.bias.shape, -0.2, 0.2))
    for m in bns:
      m.weight.copy_(rand(m.weight.shape, 0.5, 1.5))
      m.bias.copy_(rand(m.bias.shape, -0.3, 0.3))
      m.momentum = 1.0  # running stats := the calibration batch's
    net.train()(torch.randn((8, 3, size, size), generator=g))
    for m in bns:
      m.running_mean.add_(rand(m.running_mean.shape, -0.1, 0.1) * m.running_var.sqrt())
      m.running_var.mul_(rand(m.running_var.shape, 0.8, 1.25))
      m.num_batches_tracked.fill_(1234)
  return net.eval()


def save(sd: dict, path, wrap: str):
  if wrap == 'model':  # RepDistiller / SimKD: {'model': sd, ...}; the Namespace needs --trust_file
    obj = {'model': sd, 'epoch': 240, 'best_acc': 79.4, 'opt': argparse.Namespace(model='x', lr=0.05)}
  elif wrap == 'net':  # {'net': sd}, saved from a DataParallel model
    obj = {'net': {f'module.{k}': v for k, v in sd.items()}, 'acc': 0.7}
  else:
    obj = sd
  torch.save(obj, path)


def jax_logits(name, num_classes, out_dir, x_nchw):
  net = models.create(name, num_classes=num_classes)
  x = jnp.asarray(np.transpose(x_nchw, (0, 2, 3, 1)))
  target = jax.eval_shape(lambda: net.init(jax.random.key(0), x, train=False))
  variables, meta = ckpt_lib.load_model(str(out_dir), target)
  assert meta['model'] == name and meta['num_classes'] == num_classes and meta['complete']
  assert meta['image_shape'] == [32, 32, 3] and meta['dataset'] == 'cifar100'
  return np.asarray(net.apply(variables, x, train=False).logits)


CASES = {
    # name: (torch builder, num_classes, how the file is wrapped, how the import is run)
    'resnet8x4': (lambda n: CifarResNet(8, (32, 64, 128, 256), n), 100, 'model', 'api'),
    'wrn_16_2': (lambda n: WideResNet(16, 2, n), 100, 'bare', 'cli'),
    'vgg8': (lambda n: VGG(((64,), (128,), (256,), (512,), (512,)), n), 10, 'net', 'api'),
    'ShuffleV2': (lambda n: ShuffleNetV2(n), 100, 'model', 'main'),
    'mobile_half': (lambda n: MobileNetV2(6, 0.5, n), 100, 'bare', 'api'),
}


@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.slow) if n in ('wrn_16_2', 'ShuffleV2', 'mobile_half')
                                  else n for n in CASES])
def test_imported_logits_match_torch(name, tmp_path):
  build, num_classes, wrap, via = CASES[name]
  tnet = randomize(build(num_classes), seed=len(name))
  pth, out = tmp_path / f'{name}.pth', tmp_path / 'run'
  save(tnet.state_dict(), pth, wrap)
  if via == 'cli':
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, '-m', 'kdjax.tools.import_torch', '--model', name, '--num_classes',
                        str(num_classes), str(pth), str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert 'imported' in r.stdout
  elif via == 'main':  # num_classes inferred from the classifier; the file pickles a Namespace: --trust_file
    with pytest.warns(UserWarning, match='weights_only=False'):
      assert import_torch.main(['--model', name, '--trust_file', str(pth), str(out)]) == 0
  else:
    ctx = pytest.warns(UserWarning, match='weights_only=False') if wrap == 'model' else contextlib.nullcontext()
    with ctx:
      meta = import_torch.import_checkpoint(str(pth), str(out), name, num_classes, trust_file=wrap == 'model')
    assert meta['model'] == name and meta['num_classes'] == num_classes
  x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    expected = tnet(torch.from_numpy(x)).numpy()
  got = jax_logits(name, num_classes, out, x)
  assert got.shape == expected.shape == (2, num_classes)
  diff = float(np.max(np.abs(got - expected)))
  print(f'{name}: max |logit diff| = {diff:.2e} (logit scale {np.abs(expected).max():.2f})')
  assert diff < ATOL, diff


def _numpy_sd(net: nn.Module) -> dict:
  return {k: v.numpy() for k, v in net.state_dict().items()}


def test_wrong_architecture_names_first_mismatch():
  sd = _numpy_sd(CifarResNet(8, (16, 16, 32, 64), 100))  # resnet8
  with pytest.raises(CheckpointMismatchError) as e:
    import_torch.convert(sd, 'resnet8x4', 100)
  assert str(e.value) == ("state_dict key 'conv1.weight' has shape (16, 3, 3, 3) but resnet8x4 expects "
                          "(32, 3, 3, 3) at backbone/conv1/kernel")
  # The same BN leaf under batch_stats, and a class-count mismatch at the head.
  sd = _numpy_sd(CifarResNet(8, (32, 64, 128, 256), 10))
  with pytest.raises(CheckpointMismatchError, match=r"'fc\.weight' has shape \(10, 256\) but resnet8x4 expects "
                                                    r"\(100, 256\) at head/kernel"):
    import_torch.convert(sd, 'resnet8x4', 100)


def test_unexpected_and_missing_keys():
  sd = _numpy_sd(CifarResNet(8, (32, 64, 128, 256), 100))
  extra = dict(sd, **{'proj.weight': np.zeros((4, 4), np.float32)})
  with pytest.raises(CheckpointMismatchError, match=r"state_dict key 'proj\.weight' \(shape \(4, 4\)\) has no "
                                                    r"counterpart in resnet8x4"):
    import_torch.convert(extra, 'resnet8x4', 100)
  missing = {k: v for k, v in sd.items() if k != 'layer2.0.downsample.1.running_var'}
  with pytest.raises(CheckpointMismatchError, match=r"no key 'layer2\.0\.downsample\.1\.running_var'.*\(128,\) at "
                                                    r"batch_stats/backbone/layer2_0/downsample_bn/var"):
    import_torch.convert(missing, 'resnet8x4', 100)
  # resnet32x4 weights into resnet8x4: the first extra block is reported.
  with pytest.raises(CheckpointMismatchError, match=r"'layer1\.1\.conv1\.weight' .* no counterpart in resnet8x4"):
    import_torch.convert(_numpy_sd(CifarResNet(32, (32, 64, 128, 256), 100)), 'resnet8x4', 100)


def test_cli_reports_one_line_error(tmp_path, capsys):
  pth = tmp_path / 'resnet8.pth'
  torch.save({'model': CifarResNet(8, (16, 16, 32, 64), 100).state_dict()}, pth)
  assert import_torch.main(['--model', 'resnet8x4', '--num_classes', '100', str(pth), str(tmp_path / 'o')]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count('\n') == 0 and err.startswith("error: state_dict key 'conv1.weight' has shape (16, 3, 3, 3)")
  assert not os.path.exists(ckpt_lib.directory(str(tmp_path / 'o'))) or not os.listdir(
      ckpt_lib.directory(str(tmp_path / 'o')))


def test_state_dict_layouts_and_prefix():
  sd = {'conv1.weight': torch.zeros(2, 3, 1, 1), 'bn1.num_batches_tracked': torch.tensor(3)}
  for obj in (sd, {'model': sd}, {'net': sd}, {'state_dict': sd}, {'model': {f'module.{k}': v for k, v in sd.items()}}):
    assert sorted(import_torch.extract_state_dict(obj)) == ['bn1.num_batches_tracked', 'conv1.weight']
  with pytest.raises(CheckpointMismatchError, match='no state_dict found'):
    import_torch.extract_state_dict({'epoch': 3, 'acc': 1.0})


def test_every_importable_family_maps_onto_distinct_keys():
  """Each supported model's tree maps to distinct keys (checked inside `_slots`), e.g. the wrn and VGG rules."""
  expect = {'wrn_40_1': 'block3.layer.0.convShortcut.weight', 'vgg13': 'block1.4.running_var',
            'ResNet50': 'layer4.0.shortcut.1.weight', 'ShuffleV1': 'layer2.3.bn3.running_mean',
            'MobileNetV2_1_0': 'blocks.6.0.conv.3.weight', 'resnet110': 'layer3.17.bn2.bias'}
  names = import_torch.supported_models()
  for name in ('resnet8', 'resnet32x4', 'wrn_16_2', 'vgg8', 'ShuffleV2', 'mobile_half', 'ResNet18'):
    assert name in names
  for name, key in expect.items():
    net = models.create(name, num_classes=100)
    shapes = jax.eval_shape(lambda net=net: net.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    keys = [s.torch_key for s in import_torch._slots(name, net, shapes)]
    assert key in keys, (name, key)


# ------------------------------------------------------------------------------------------------ ImageNet models
# The torch side is kdjax.tools.torch_reference's copies of torchvision's resnet18/34/50 and mobilenet_v2 (same
# state_dict keys in the same order, same outputs: checked against torchvision 0.29.1 in
# `test_reference_equals_torchvision` where torchvision is installed) and of mdistiller's MobileNetV1.
from kdjax.tools import torch_reference  # noqa: E402

IMAGENET_CASES = {
    'resnet18_imagenet': lambda: torch_reference.imagenet_resnet(18, 1000),
    'resnet50_imagenet': lambda: torch_reference.imagenet_resnet(50, 1000),
    'mobilenetv1_imagenet': lambda: torch_reference.MobileNetV1(1000),
    'mobilenetv2_imagenet': lambda: torch_reference.ImageNetMobileNetV2(1000),
}


@pytest.mark.slow
@pytest.mark.parametrize('name', list(IMAGENET_CASES))
def test_imported_imagenet_logits_match_torch(name, tmp_path):
  tnet = randomize(IMAGENET_CASES[name](), seed=len(name), size=64)
  pth, out = tmp_path / f'{name}.pth', tmp_path / 'run'
  torch.save(tnet.state_dict(), pth)
  meta = import_torch.import_checkpoint(str(pth), str(out), name, dataset='imagenet2012', image_size=64)
  assert meta['num_classes'] == 1000 and meta['image_shape'] == [64, 64, 3]
  x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
  with torch.no_grad():
    expected = tnet(torch.from_numpy(x)).numpy()
  net = models.create(name, num_classes=1000)
  xj = jnp.asarray(np.transpose(x, (0, 2, 3, 1)))
  variables, _ = ckpt_lib.load_model(str(out), jax.eval_shape(lambda: net.init(jax.random.key(0), xj)))
  got = np.asarray(net.apply(variables, xj, train=False).logits)
  diff = float(np.max(np.abs(got - expected)))
  print(f'{name}: max |logit diff| = {diff:.2e} (logit scale {np.abs(expected).max():.2f})')
  assert diff < ATOL * max(1.0, float(np.abs(expected).max())), diff


def test_reference_equals_torchvision():
  torchvision = pytest.importorskip('torchvision')
  x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
  for tv, ours in ((torchvision.models.resnet34(), torch_reference.imagenet_resnet(34)),
                   (torchvision.models.mobilenet_v2(), torch_reference.ImageNetMobileNetV2())):
    sd = tv.state_dict()
    assert [(k, v.shape) for k, v in sd.items()] == [(k, v.shape) for k, v in ours.state_dict().items()]
    ours.load_state_dict(sd)
    with torch.no_grad():
      np.testing.assert_array_equal(tv.eval()(x).numpy(), ours.eval()(x).numpy())
