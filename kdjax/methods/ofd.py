"""OFD: "A Comprehensive Overhaul of Feature Distillation" (Heo et al., ICCV 2019), as mdistiller's
`distillers/OFD.py` trains it on CIFAR-100 (clovaai/overhaul-distillation CIFAR-100/distiller.py is the same loss).

The student's pre-ReLU stage maps `preact[1:]` go through a connector each (1x1 conv without bias, N(0, 2/(k*k*out))
init, BN(1, 0)) to the teacher's channels; the target is the teacher's pre-ReLU map `preact[1:]`, adaptive-average-
pooled to the student's size, passed through the margin ReLU implicitly by the partial L2 (`ofd_feat_loss`). Level i
of n is weighted 1 / 2^(n - 1 - i) (the deepest 1). The lists are aligned at their deep end (mdistiller
`_align_list`). The per-channel margin is E[x | x < 0] of the teacher's pre-ReLU response under the Gaussian
assumption with the mean and std of the BatchNorm before that ReLU (its beta and |gamma|; `ofd_margin`), computed in
the step from the frozen teacher variables the module receives (`extra_inputs`), so the step stays a pure function
of the teacher variables. Which BN is "before the ReLU" of each tap is the reference's `get_bn_before_relu`
(`_BN_BEFORE_RELU`); teachers without one are refused by the check. FEAT_WEIGHT (0.001) is the 'ofd' weight.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax import distill
from kdjax import losses
from kdjax.errors import ConfigError
from kdjax.models import layers
from kdjax.models import vgg


def ofd_margin(gamma, beta):
  """mdistiller `OFD.init_ofd_modules`: with s = |gamma|, m = beta, the margin is
  m - s * phi(m / s) / Phi(-m / s) (the mean of N(m, s^2) below 0) where Phi(-m / s) > 0.001, else -3 s."""
  s, m = jnp.abs(jnp.asarray(gamma, jnp.float32)), jnp.asarray(beta, jnp.float32)
  ratio = m / s
  cdf = 0.5 * jax.scipy.special.erfc(ratio / math.sqrt(2.0))  # Phi(-m / s); erfc keeps float32 precision in the tail
  pdf = jnp.exp(-0.5 * ratio * ratio) / math.sqrt(2.0 * math.pi)
  safe = cdf > 0.001
  return jnp.where(safe, m - s * pdf / jnp.where(safe, cdf, 1.0), -3.0 * s)


def ofd_feat_loss(source, target, margin):
  """mdistiller `feat_loss` (the partial L2 against the margin-ReLU'd target): (s - m)^2 where s > m and t <= m,
  (s - t)^2 where s > t and m < t <= 0, (s - t)^2 where t > 0; mean over the batch, sum over the rest.
  `margin` broadcasts over the channel axis (-1)."""
  s, t = source.astype(jnp.float32), target.astype(jnp.float32)
  m = jnp.asarray(margin, jnp.float32)
  loss = (jnp.where((s > m) & (t <= m), (s - m) ** 2, 0.0)
          + jnp.where((s > t) & (t > m) & (t <= 0), (s - t) ** 2, 0.0)
          + jnp.where(t > 0, (s - t) ** 2, 0.0))
  return jnp.sum(jnp.mean(jnp.abs(loss), axis=0))


# The BN before the ReLU of each `preact[1:]` tap, as paths into the teacher's params (the reference models'
# get_bn_before_relu): the last block's last BN of each stage (ResNets), the BN that consumes each stage's output
# (WRN), each block's last BN (VGG with batch norm).
def _cifar_resnet_bns(backbone):
  per_block = 2 if backbone.block.lower() == 'basicblock' else 3
  n = (backbone.depth - 2) // (3 * per_block)
  return [('backbone', f'layer{i}_{n - 1}', f'bn{per_block}') for i in (1, 2, 3)]


def _resnet_bns(backbone):
  bn = 'bn2' if backbone.block.lower() == 'basicblock' else 'bn3'
  return [('backbone', f'layer{i}_{n - 1}', bn) for i, n in enumerate(backbone.num_blocks, start=1)]


def _wrn_bns(backbone):
  del backbone
  return [('backbone', 'block2_0', 'bn1'), ('backbone', 'block3_0', 'bn1'), ('backbone', 'bn1')]


def _vgg_bns(backbone):
  if not backbone.batch_norm:
    return None
  return [('backbone', f'block{b}_{3 * (len(widths) - 1) + 1}')
          for b, widths in enumerate(vgg.CFGS[backbone.cfg]) if b]


_BN_BEFORE_RELU = {'CifarResNet': _cifar_resnet_bns, 'ResNet': _resnet_bns, 'WideResNet': _wrn_bns, 'VGG': _vgg_bns}


def _bn_paths(teacher_module):
  backbone = getattr(teacher_module, 'backbone', None)
  fn = _BN_BEFORE_RELU.get(type(backbone).__name__)
  return None if fn is None else fn(backbone)


class OFD(nn.Module):
  teacher_channels: tuple[int, ...]  # of the aligned levels
  bn_paths: tuple                    # the teacher BN of each aligned level
  kernel_size: int = 1
  dtype: Any = jnp.float32
  extra_inputs: ClassVar[tuple] = ('teacher_variables',)

  @nn.compact
  def __call__(self, student, teacher, *, labels, indices, train, teacher_classify, teacher_variables):
    del teacher, labels, indices, teacher_classify
    n, k = len(self.teacher_channels), self.kernel_size
    connected = []
    for i, (fs, c) in enumerate(zip(student.preact[1:][-n:], self.teacher_channels)):
      x = layers.conv(c, k, padding=(k - 1) // 2, kernel_init=layers.kaiming_normal_fan_out, dtype=self.dtype,
                      name=f'connector{i}_conv')(fs)
      connected.append(layers.batch_norm(train, self.dtype, name=f'connector{i}_bn')(x))
    margins = []
    for path in self.bn_paths:
      bn = teacher_variables['params']
      for key in path:
        bn = bn[key]
      margins.append(jax.lax.stop_gradient(ofd_margin(bn['scale'], bn['bias'])))
    return {'connected': tuple(connected), 'margins': tuple(margins)}


def _check(cfg, student_shapes, teacher_shapes, info):
  del cfg
  s_maps, t_maps = student_shapes.preact[1:], teacher_shapes.preact[1:]
  if not s_maps or any(m.ndim != 4 for m in s_maps):
    raise ConfigError(f'ofd needs the student\'s pre-ReLU stage maps, but {info.name("student")} '
                      'exposes none')
  paths, name = _bn_paths(info.teacher), info.name('teacher')
  if paths is None:
    raise ConfigError(f'ofd needs the BatchNorm before each pre-ReLU stage map of the teacher, but {name} does not '
                      'expose it (supported: resnet*, ResNet*, wrn_*, vgg* teachers)')
  if len(paths) != len(t_maps):
    raise ConfigError(f'ofd: the teacher {name} has {len(t_maps)} pre-ReLU stage maps but {len(paths)} BatchNorms '
                      'before a ReLU')


def _module(cfg, student_shapes, teacher_shapes, info):
  _check(cfg, student_shapes, teacher_shapes, info)
  s_maps, t_maps = student_shapes.preact[1:], teacher_shapes.preact[1:]
  n = min(len(s_maps), len(t_maps))
  paths = tuple(_bn_paths(info.teacher))[-n:]
  return OFD(tuple(int(t.shape[-1]) for t in t_maps[-n:]), paths, int(cfg.ofd.connector_kernel_size),
             dtype=student_shapes.features[-1].dtype)


def ofd_loss(ctx: distill.Context, cfg):
  del cfg
  out = ctx.extras['ofd']
  connected, margins = out['connected'], out['margins']
  n = len(connected)
  total = 0.0
  for i, (fs, ft, m) in enumerate(zip(connected, ctx.teacher.preact[1:][-n:], margins)):
    target = losses.adaptive_avg_pool(ft, fs.shape[1:3])
    total = total + ofd_feat_loss(fs, target, m) / 2.0 ** (n - i - 1)
  return total


# mdistiller engine/cfg.py: OFD.CONNECTOR.KERNEL_SIZE 1, CE 1, OFD.LOSS.FEAT_WEIGHT 0.001.
distill.register('ofd', distill.Method(
    ofd_loss, module=_module, check=_check, teacher0_network=True,
    options=distill.Options(dict(connector_kernel_size=1), ranges=dict(connector_kernel_size=distill.Range(1))),
    recipe=distill.Recipe(weights={'ce': 1.0, 'ofd': 0.001})))
