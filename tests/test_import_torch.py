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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 1e-4

# --------------------------------------------------------------------------------------- reference-named torch nets


class CifarBasicBlock(nn.Module):
  """RepDistiller resnet.py BasicBlock: conv-BN-ReLU-conv-BN + (downsample = Sequential(conv1x1, BN)), ReLU."""

  def __init__(self, cin, planes, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or cin != planes:
      self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

  def forward(self, x):
    out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(nn.Module):

  def __init__(self, depth, widths, num_classes):
    super().__init__()
    n = (depth - 2) // 6
    self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(widths[0])
    cin = widths[0]
    for i, (planes, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
      blocks = []
      for j in range(n):
        blocks.append(CifarBasicBlock(cin, planes, stride if j == 0 else 1))
        cin = planes
      setattr(self, f'layer{i}', nn.Sequential(*blocks))
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = self.layer3(self.layer2(self.layer1(x)))
    return self.fc(x.mean((2, 3)))


class WideBlock(nn.Module):
  """wrn.py BasicBlock: pre-activation; a width-changing block's shortcut reads the activated input."""

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(cin)
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.equal = cin == cout
    self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

  def forward(self, x):
    act = F.relu(self.bn1(x))
    out = self.conv2(F.relu(self.bn2(self.conv1(act))))
    return (x if self.equal else self.convShortcut(act)) + out


class NetworkBlock(nn.Module):

  def __init__(self, n, cin, cout, stride):
    super().__init__()
    self.layer = nn.Sequential(*[WideBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1)
                                 for j in range(n)])

  def forward(self, x):
    return self.layer(x)


class WideResNet(nn.Module):

  def __init__(self, depth, k, num_classes):
    super().__init__()
    n = (depth - 4) // 6
    self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    self.block1 = NetworkBlock(n, 16, 16 * k, 1)
    self.block2 = NetworkBlock(n, 16 * k, 32 * k, 2)
    self.block3 = NetworkBlock(n, 32 * k, 64 * k, 2)
    self.bn1 = nn.BatchNorm2d(64 * k)
    self.fc = nn.Linear(64 * k, num_classes)

  def forward(self, x):
    x = self.block3(self.block2(self.block1(self.conv1(x))))
    return self.fc(F.relu(self.bn1(x)).mean((2, 3)))


class VGG(nn.Module):
  """vgg.py with batch_norm=True: block{b} = [conv, BN, ReLU]* minus the last ReLU; no pool before block4 at 32x32."""

  def __init__(self, cfg, num_classes):
    super().__init__()
    cin = 3
    for b, widths in enumerate(cfg):
      mods = []
      for w in widths:
        mods += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        cin = w
      setattr(self, f'block{b}', nn.Sequential(*mods[:-1]))
    self.classifier = nn.Linear(512, num_classes)

  def forward(self, x):
    h = x.shape[2]
    for b in range(5):
      if 1 <= b <= 3 or (b == 4 and h == 64):
        x = F.max_pool2d(x, 2)
      x = F.relu(getattr(self, f'block{b}')(x))
    return self.classifier(x.mean((2, 3)))


def shuffle(x, g):
  n, c, h, w = x.shape
  return x.view(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class ShuffleV2Basic(nn.Module):

  def __init__(self, channels):
    super().__init__()
    c = channels // 2
    self.conv1 = nn.Conv2d(c, c, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(c)
    self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
    self.bn2 = nn.BatchNorm2d(c)
    self.conv3 = nn.Conv2d(c, c, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(c)

  def forward(self, x):
    c = x.shape[1] // 2
    x1, x2 = x[:, :c], x[:, c:]
    out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x2)))))
    out = F.relu(self.bn3(self.conv3(out)))
    return shuffle(torch.cat([x1, out], 1), 2)


class ShuffleV2Down(nn.Module):

  def __init__(self, cin, cout):
    super().__init__()
    mid = cout // 2
    self.conv1 = nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False)
    self.bn1 = nn.BatchNorm2d(cin)
    self.conv2 = nn.Conv2d(cin, mid, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(mid)
    self.conv3 = nn.Conv2d(cin, mid, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(mid)
    self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
    self.bn4 = nn.BatchNorm2d(mid)
    self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
    self.bn5 = nn.BatchNorm2d(mid)

  def forward(self, x):
    left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
    right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
    right = F.relu(self.bn5(self.conv5(right)))
    return shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
  """ShuffleNetv2.py net_size 1 (`ShuffleV2`): 1x1 stem, layer{s} = [DownBlock] + BasicBlocks, conv2, linear."""

  def __init__(self, num_classes, out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3)):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(24)
    cin = 24
    for s, (c, n) in enumerate(zip(out_channels[:3], num_blocks), start=1):
      setattr(self, f'layer{s}', nn.Sequential(ShuffleV2Down(cin, c), *[ShuffleV2Basic(c) for _ in range(n)]))
      cin = c
    self.conv2 = nn.Conv2d(cin, out_channels[3], 1, bias=False)
    self.bn2 = nn.BatchNorm2d(out_channels[3])
    self.linear = nn.Linear(out_channels[3], num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = self.layer3(self.layer2(self.layer1(x)))
    x = F.relu(self.bn2(self.conv2(x)))
    return self.linear(F.avg_pool2d(x, 4).flatten(1))


class InvertedResidual(nn.Module):
  """mobilenetv2.py: conv = Sequential(pw, BN, ReLU, dw, BN, ReLU, pw-linear, BN), the pw expand even for t=1."""

  def __init__(self, cin, cout, stride, t):
    super().__init__()
    h = cin * t
    self.use_res = stride == 1 and cin == cout
    self.conv = nn.Sequential(
        nn.Conv2d(cin, h, 1, 1, 0, bias=False), nn.BatchNorm2d(h), nn.ReLU(),
        nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU(),
        nn.Conv2d(h, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
  """mobilenetv2.py `mobilenetv2_T_w(T, W)`; mobile_half is T=6, W=0.5."""

  def __init__(self, T, width, num_classes):
    super().__init__()
    setting = [[1, 16, 1, 1], [T, 24, 2, 1], [T, 32, 3, 2], [T, 64, 4, 2], [T, 96, 3, 1], [T, 160, 3, 2],
               [T, 320, 1, 1]]
    cin = int(32 * width)
    self.conv1 = nn.Sequential(nn.Conv2d(3, cin, 3, 2, 1, bias=False), nn.BatchNorm2d(cin), nn.ReLU())
    self.blocks = nn.ModuleList()
    for t, c, n, s in setting:
      cout = int(c * width)
      layers = []
      for j in range(n):
        layers.append(InvertedResidual(cin, cout, s if j == 0 else 1, t))
        cin = cout
      self.blocks.append(nn.Sequential(*layers))
    last = int(1280 * width) if width > 1.0 else 1280
    self.conv2 = nn.Sequential(nn.Conv2d(cin, last, 1, 1, 0, bias=False), nn.BatchNorm2d(last), nn.ReLU())
    self.classifier = nn.Sequential(nn.Linear(last, num_classes))

  def forward(self, x):
    x = self.conv1(x)
    for block in self.blocks:
      x = block(x)
    x = F.avg_pool2d(self.conv2(x), 2, ceil_mode=True)
    return self.classifier(x.flatten(1))


# -------------------------------------------------------------------------------------------------------- helpers


def randomize(net: nn.Module, seed: int) -> nn.Module:
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
    net.train()(torch.randn((8, 3, 32, 32), generator=g))
    for m in bns:
      m.running_mean.add_(rand(m.running_mean.shape, -0.1, 0.1) * m.running_var.sqrt())
      m.running_var.mul_(rand(m.running_var.shape, 0.8, 1.25))
      m.num_batches_tracked.fill_(1234)
  return net.eval()


def save(sd: dict, path, wrap: str):
  if wrap == 'model':  # RepDistiller / SimKD: {'model': sd, ...}; the Namespace forces the weights_only fallback
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


@pytest.mark.parametrize('name', list(CASES))
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
  elif via == 'main':  # num_classes inferred from the classifier
    with pytest.warns(UserWarning, match='weights_only=False'):
      assert import_torch.main(['--model', name, str(pth), str(out)]) == 0
  else:
    ctx = pytest.warns(UserWarning, match='weights_only=False') if wrap == 'model' else contextlib.nullcontext()
    with ctx:
      meta = import_torch.import_checkpoint(str(pth), str(out), name, num_classes)
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
