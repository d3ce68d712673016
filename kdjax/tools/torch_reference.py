"""PyTorch re-implementations of the reference CIFAR networks (RepDistiller models/resnet.py, wrn.py, vgg.py,
ShuffleNetv2.py, mobilenetv2.py), with the reference's module names, hence the same state_dict keys, and the same
forward computation.

They are the other side of two comparisons: the importer's tests (imported weights must give these networks'
logits) and the PyTorch baselines of benchmarks/step_speed.py. torch is imported here only; training never imports
this module.
"""

import torch
from torch import nn
from torch.nn import functional as F



class CifarBasicBlock(nn.Module):
  """RepDistiller resnet.py BasicBlock: conv-BN-ReLU-conv-BN + (downsample = Sequential(conv1x1, BN)), ReLU;
  torchvision's resnet BasicBlock has the same modules and forward."""
  expansion = 1

  def __init__(self, cin, planes, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = _projection(cin, planes, stride)

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

  def last_map(self, x):
    """The last stage's output (RepDistiller's feat[-2]), which SimKD projects."""
    x = F.relu(self.bn1(self.conv1(x)))
    return self.layer3(self.layer2(self.layer1(x)))

  def forward(self, x):
    return self.fc(self.last_map(x).mean((2, 3)))


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


# ------------------------------------------------------------------------------------------------ ImageNet models


class ImageNetBottleneck(nn.Module):
  """torchvision's resnet Bottleneck (v1.5: the stride on the 3x3 conv)."""
  expansion = 4

  def __init__(self, cin, planes, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.downsample = _projection(cin, planes * 4, stride)

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
    return F.relu(out + (x if self.downsample is None else self.downsample(x)))


def _projection(cin, cout, stride):
  if stride == 1 and cin == cout:
    return None
  return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ImageNetResNet(nn.Module):
  """torchvision.models.ResNet: 7x7/2 stem, 3x3/2 max-pool, four stages, global average pool, fc."""

  def __init__(self, block, num_blocks, num_classes):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    cin = 64
    for i, (planes, stride, n) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2), num_blocks), start=1):
      blocks = []
      for j in range(n):
        blocks.append(block(cin, planes, stride if j == 0 else 1))
        cin = planes * block.expansion
      setattr(self, f'layer{i}', nn.Sequential(*blocks))
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x):
    x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(x.mean((2, 3)))


def imagenet_resnet(depth: int, num_classes: int = 1000) -> ImageNetResNet:
  blocks = {18: (CifarBasicBlock, (2, 2, 2, 2)), 34: (CifarBasicBlock, (3, 4, 6, 3)),
            50: (ImageNetBottleneck, (3, 4, 6, 3))}[depth]
  return ImageNetResNet(*blocks, num_classes)


class MobileNetV1(nn.Module):
  """mdistiller models/imagenet/mobilenetv1.py: `model` = Sequential(conv_bn, 13 x conv_dw, pool), `fc`."""

  def __init__(self, num_classes=1000):
    super().__init__()
    cfg = ((32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2)) + \
        ((512, 512, 1),) * 5 + ((512, 1024, 2), (1024, 1024, 1))
    mods = [nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())]
    for cin, cout, s in cfg:
      mods.append(nn.Sequential(nn.Conv2d(cin, cin, 3, s, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(),
                                nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()))
    self.model = nn.Sequential(*mods)
    self.fc = nn.Linear(1024, num_classes)

  def forward(self, x):
    return self.fc(self.model(x).mean((2, 3)))


class ImageNetInvertedResidual(nn.Module):
  """torchvision's mobilenet_v2 block: `conv` = [pw ConvBNReLU6] + dw ConvBNReLU6 + pw Conv + BN."""

  def __init__(self, cin, cout, stride, t):
    super().__init__()
    h = cin * t
    self.use_res = stride == 1 and cin == cout
    mods = [] if t == 1 else [nn.Sequential(nn.Conv2d(cin, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6())]
    mods += [nn.Sequential(nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6()),
             nn.Conv2d(h, cout, 1, bias=False), nn.BatchNorm2d(cout)]
    self.conv = nn.Sequential(*mods)

  def forward(self, x):
    return x + self.conv(x) if self.use_res else self.conv(x)


class ImageNetMobileNetV2(nn.Module):
  """torchvision.models.mobilenet_v2 at width 1.0: `features` (stem, 17 blocks, 1x1 to 1280), `classifier`."""

  def __init__(self, num_classes=1000):
    super().__init__()
    setting = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
               (6, 320, 1, 1))
    mods = [nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6())]
    cin = 32
    for t, c, n, s in setting:
      for j in range(n):
        mods.append(ImageNetInvertedResidual(cin, c, s if j == 0 else 1, t))
        cin = c
    mods.append(nn.Sequential(nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6()))
    self.features = nn.Sequential(*mods)
    self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

  def forward(self, x):
    return self.classifier(self.features(x).mean((2, 3)))
# ------------------------------------------------------------------ the seed projects' small models (benchmarks)
class MLP(nn.Module):
  """kdjax/models/simple.py MLP: flatten, [Linear, ReLU] per hidden width, the classifier."""

  def __init__(self, in_features, hidden, num_classes):
    super().__init__()
    widths = (in_features,) + tuple(hidden)
    self.hidden = nn.ModuleList([nn.Linear(a, b) for a, b in zip(widths, widths[1:])])
    self.fc = nn.Linear(widths[-1], num_classes)

  def forward(self, x):
    x = x.flatten(1)
    for layer in self.hidden:
      x = F.relu(layer(x))
    return self.fc(x)


class SmallCNN(nn.Module):
  """kdjax/models/simple.py SmallCNN (cnn_small; cnn2 = no BN, one hidden layer): [conv3x3, BN, ReLU, max-pool 2]
  per width, flatten, [Linear, ReLU] per hidden width, the classifier."""

  def __init__(self, in_channels, size, num_classes, channels=(32, 64), hidden=(128, 64), batch_norm=True):
    super().__init__()
    convs, cin = [], in_channels
    for c in channels:
      convs += [nn.Conv2d(cin, c, 3, 1, 1, bias=not batch_norm)] + ([nn.BatchNorm2d(c)] if batch_norm else [])
      convs += [nn.ReLU(), nn.MaxPool2d(2)]
      cin, size = c, size // 2
    self.features = nn.Sequential(*convs)
    widths = (cin * size * size,) + tuple(hidden)
    self.hidden = nn.ModuleList([nn.Linear(a, b) for a, b in zip(widths, widths[1:])])
    self.fc = nn.Linear(widths[-1], num_classes)

  def forward(self, x):
    x = self.features(x).flatten(1)
    for layer in self.hidden:
      x = F.relu(layer(x))
    return self.fc(x)


class AlexNet(nn.Module):
  """kdjax/models/alexnet.py: five biased 3x3 convs (64-192-384-256-256, the first stride 2), 3x3/2 max-pools
  (padding 1) after convs 1, 2 and 5, global average pool, [Dropout, Linear(4096), ReLU] x 2, the classifier."""

  def __init__(self, num_classes, hidden=(4096, 4096), dropout=0.5):
    super().__init__()
    mods, cin = [], 3
    for cout, stride, pool in ((64, 2, True), (192, 1, True), (384, 1, False), (256, 1, False), (256, 1, True)):
      mods += [nn.Conv2d(cin, cout, 3, stride, 1), nn.ReLU()] + ([nn.MaxPool2d(3, 2, 1)] if pool else [])
      cin = cout
    self.features = nn.Sequential(*mods)
    cls, width = [], cin
    for h in hidden:
      cls += [nn.Dropout(dropout), nn.Linear(width, h), nn.ReLU()]
      width = h
    self.classifier = nn.Sequential(*cls, nn.Linear(width, num_classes))

  def forward(self, x):
    return self.classifier(self.features(x).mean((2, 3)))


class ResNet18(nn.Module):
  """RepDistiller resnetv2.py ResNet18 (CIFAR stem: one stride-1 3x3 conv, no max-pool); its BasicBlock is
  CifarBasicBlock with the projection named `shortcut` there."""

  def __init__(self, num_classes):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    blocks, cin = [], 64
    for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
      blocks += [CifarBasicBlock(cin, planes, stride), CifarBasicBlock(planes, planes, 1)]
      cin = planes
    self.layers = nn.Sequential(*blocks)
    self.linear = nn.Linear(512, num_classes)

  def forward(self, x):
    return self.linear(self.layers(F.relu(self.bn1(self.conv1(x)))).mean((2, 3)))


class SimKDProjector(nn.Module):
  """SimKD models/util.py SimKD's `transfer`: conv1x1-BN-ReLU, conv3x3-BN-ReLU, conv1x1-BN-ReLU, bottleneck
  width t_n // factor."""

  def __init__(self, s_n, t_n, factor=2):
    super().__init__()
    m = t_n // factor
    self.transfer = nn.Sequential(nn.Conv2d(s_n, m, 1, bias=False), nn.BatchNorm2d(m), nn.ReLU(),
                                  nn.Conv2d(m, m, 3, 1, 1, bias=False), nn.BatchNorm2d(m), nn.ReLU(),
                                  nn.Conv2d(m, t_n, 1, bias=False), nn.BatchNorm2d(t_n), nn.ReLU())

  def forward(self, feat_s):
    return self.transfer(feat_s)


class ConvReg(nn.Module):
  """RepDistiller models/util.py ConvReg (FitNet's regressor): conv (by the heights: 3x3 stride 2, a 4x4 stride 2
  transposed conv, or a VALID conv) -> BN -> ReLU; shapes [N, C, H, W]."""

  def __init__(self, s_shape, t_shape, use_relu=True):
    super().__init__()
    self.use_relu = use_relu
    (_, s_c, s_h, s_w), (_, t_c, t_h, t_w) = s_shape, t_shape
    if s_h == 2 * t_h:
      self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
    elif s_h * 2 == t_h:
      self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
    elif s_h >= t_h:
      self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
    else:
      raise NotImplementedError(f'student size {s_h}, teacher size {t_h}')
    self.bn = nn.BatchNorm2d(t_c)

  def forward(self, x):
    x = self.bn(self.conv(x))
    return F.relu(x) if self.use_relu else x


class Embed(nn.Module):
  """RepDistiller crd/criterion.py Embed: flatten, Linear, L2 normalisation."""

  def __init__(self, dim_in, dim_out=128):
    super().__init__()
    self.linear = nn.Linear(dim_in, dim_out)

  def forward(self, x):
    x = self.linear(x.reshape(x.shape[0], -1))
    return x / x.pow(2).sum(1, keepdim=True).pow(0.5)


class ContrastMemory(nn.Module):
  """The buffers of RepDistiller crd/memory.py ContrastMemory (its state_dict keys; the NCE itself is not here)."""

  def __init__(self, feat_dim, n_data, nce_k=16384, nce_t=0.07, nce_m=0.5):
    super().__init__()
    self.register_buffer('params', torch.tensor([nce_k, nce_t, -1, -1, nce_m]))
    bound = 1.0 / (feat_dim / 3) ** 0.5
    self.register_buffer('memory_v1', torch.rand(n_data, feat_dim) * 2 * bound - bound)
    self.register_buffer('memory_v2', torch.rand(n_data, feat_dim) * 2 * bound - bound)


class CRDHeads(nn.Module):
  """The modules of RepDistiller crd/criterion.py CRDLoss, under its names: `embed_s`, `embed_t`, `contrast`."""

  def __init__(self, s_dim, t_dim, feat_dim, n_data):
    super().__init__()
    self.embed_s, self.embed_t = Embed(s_dim, feat_dim), Embed(t_dim, feat_dim)
    self.contrast = ContrastMemory(feat_dim, n_data)

  def forward(self, f_s, f_t):
    return self.embed_s(f_s), self.embed_t(f_t)
