"""Feature-map methods: FitNet, AT, SP and VID, as benchmarked by RepDistiller (Tian et al., CRD, ICLR 2020).

Which maps each method reads follows RepDistiller's `train_student.py`/`helper/loops.py`, whose `feat` list is our
`features` plus the pooled embedding at the end: FitNet `feat[hint_layer]` = `features[hint_layer]`, AT and VID
`feat[1:-1]` = `features[1:]`, SP `feat[-2]` = `features[-1]`. Every method reads the post-activation maps
(`preact=False` in the reference). The references' weights (`-b`) are the config's weights for these terms; see
configs/cifar100.py.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax import distill
from kdjax import losses
from kdjax.errors import ConfigError
from kdjax.models import layers


def _require_maps(name: str, shapes, who: str, indices):
  feats = shapes.features
  for i in indices:
    if not -len(feats) <= i < len(feats):
      raise ConfigError(f'{name} reads {who} features[{i}], but the {who} has {len(feats)} feature maps')
    if feats[i].ndim != 4:
      raise ConfigError(f'{name} needs convolutional feature maps, but the {who} features[{i}] has shape '
                        f'{tuple(feats[i].shape)}')


def _stage_pairs(name: str, student, teacher) -> list[tuple[Any, Any]]:
  s, t = student.features[1:], teacher.features[1:]
  if len(s) != len(t):
    raise ConfigError(f'{name} pairs the stage outputs (features[1:]) of student and teacher, but the student has '
                      f'{len(s)} and the teacher {len(t)}')
  return list(zip(s, t))


# ------------------------------------------------------------------------------------------------------ FitNet
def _uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class ConvReg(nn.Module):
  """RepDistiller's `ConvReg` (models/util.py): student map -> teacher map shape, conv -> BN -> ReLU.

  The conv depends on the heights: student twice the teacher's: 3x3 stride 2 pad 1; half: a 4x4 stride 2 pad 1
  transposed conv; otherwise (student >= teacher) a VALID conv with kernel (1+sH-tH, 1+sW-tW). Biased convs and
  PyTorch's default initialisation, as the reference.
  """
  teacher_hw: tuple[int, int]
  teacher_channels: int
  use_relu: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    (sh, sw), (th, tw), s_c, t_c = x.shape[1:3], self.teacher_hw, x.shape[-1], self.teacher_channels
    if sh == 2 * th:
      x = layers.conv(t_c, 3, strides=2, padding=1, use_bias=True, fan_in=s_c * 9, dtype=self.dtype,
                      name='conv')(x)
    elif sh * 2 == th:
      # torch.nn.ConvTranspose2d(s_c, t_c, 4, stride=2, padding=1): PyTorch padding p is lax padding k-1-p, and
      # torch's fan-in for a transposed conv's init is out_channels * k * k (its weight is [in, out, k, k]).
      bound = 1.0 / math.sqrt(t_c * 16)
      x = nn.ConvTranspose(t_c, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)), transpose_kernel=True,
                           kernel_init=_uniform(bound), bias_init=_uniform(bound), dtype=self.dtype,
                           name='conv')(x)
    elif sh >= th:
      kh, kw = 1 + sh - th, 1 + sw - tw
      x = nn.Conv(t_c, (kh, kw), padding='VALID', kernel_init=layers.torch_uniform_fan_in(),
                  bias_init=layers.torch_bias_init(s_c * kh * kw), dtype=self.dtype, name='conv')(x)
    else:
      raise ConfigError(f'fitnet: no regressor from a {sh}x{sw} student map to a {th}x{tw} teacher map '
                        '(RepDistiller ConvReg handles twice, half, or a larger student map)')
    x = layers.batch_norm(train, self.dtype, name='bn')(x)
    return nn.relu(x) if self.use_relu else x


class FitNet(nn.Module):
  hint_layer: int
  teacher_hw: tuple[int, int]
  teacher_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, student, teacher, *, labels, indices, train, teacher_classify):
    del teacher, labels, indices, teacher_classify
    reg = ConvReg(self.teacher_hw, self.teacher_channels, dtype=self.dtype, name='regressor')
    return {'hint': reg(student.features[self.hint_layer], train)}


def _fitnet_module(cfg, student_shapes, teacher_shapes, info):
  del info
  i = cfg.fitnet.hint_layer
  _require_maps('fitnet', student_shapes, 'student', [i])
  _require_maps('fitnet', teacher_shapes, 'teacher', [i])
  t = teacher_shapes.features[i]
  return FitNet(i, tuple(t.shape[1:3]), t.shape[-1], dtype=student_shapes.features[i].dtype)


def fitnet_loss(ctx: distill.Context, cfg):
  """FitNets (Romero et al., ICLR 2015) as RepDistiller trains it: ONE stage, the hint MSE added to CE from the
  start (RepDistiller's 'hint' branch has no init stage, unlike the paper's two-stage hint pre-training)."""
  return losses.hint_loss(ctx.extras['fitnet']['hint'], ctx.teacher.features[cfg.fitnet.hint_layer])


# RepDistiller: --hint_layer 2 (choices 0-4; here any map the networks expose, checked when the regressor is built);
# scripts/run_cifar_distill.sh -r 1 -a 0 -b 100.
distill.register('fitnet', distill.Method(
    fitnet_loss, module=_fitnet_module,
    options=distill.Options(dict(hint_layer=2), ranges=dict(hint_layer=distill.Range(0))),
    recipe=distill.Recipe(weights={'ce': 1.0, 'fitnet': 100.0})))


# ---------------------------------------------------------------------------------------------------------- AT
def at_loss(ctx: distill.Context, cfg):
  """Attention Transfer (Zagoruyko & Komodakis, ICLR 2017), summed over every stage pair (RepDistiller
  distiller_zoo/AT.py, p = 2)."""
  pairs = _stage_pairs('at', ctx.student, ctx.teacher)
  return losses.at_loss_multi([s for s, _ in pairs], [t for _, t in pairs], cfg.at.p)


# RepDistiller distiller_zoo/AT.py: Attention(p=2), `f.pow(p)` (an integer power: the maps may be negative);
# scripts/run_cifar_distill.sh -r 1 -a 0 -b 1000.
distill.register('at', distill.Method(
    at_loss, options=distill.Options(dict(p=2), ranges=dict(p=distill.Range(1))),
    recipe=distill.Recipe(weights={'ce': 1.0, 'at': 1000.0})))


# ---------------------------------------------------------------------------------------------------------- SP
def sp_loss(ctx: distill.Context, cfg):
  """Similarity-Preserving KD (Tung & Mori, ICCV 2019) on the last stage's map (RepDistiller feat[-2])."""
  del cfg
  return losses.sp_loss(ctx.student.features[-1], ctx.teacher.features[-1])


# RepDistiller scripts/run_cifar_distill.sh: -r 1 -a 0 -b 3000.
distill.register('sp', distill.Method(sp_loss, recipe=distill.Recipe(weights={'ce': 1.0, 'sp': 3000.0})))


# --------------------------------------------------------------------------------------------------------- VID
class VID(nn.Module):
  """One RepDistiller `VIDLoss` regressor per stage pair: conv1x1-ReLU-conv1x1-ReLU-conv1x1 (no biases, mid width =
  the teacher's channels, `VIDLoss(s, t, t)`), and the learned per-channel `log_scale` of the variance."""
  teacher_channels: tuple[int, ...]
  init_pred_var: float = 5.0
  eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, student, teacher, *, labels, indices, train, teacher_classify):
    del labels, indices, train, teacher_classify
    preds, scales = [], []
    for i, ((fs, ft), c) in enumerate(zip(_stage_pairs('vid', student, teacher), self.teacher_channels)):
      # The reference pools the larger map to the smaller one before the regressor.
      x, _ = losses.align_spatial(fs, ft)
      for j in range(3):
        if j:
          x = nn.relu(x)
        x = layers.conv(c, 1, padding=0, dtype=self.dtype, name=f'regressor{i}_conv{j}')(x)
      preds.append(x)
      init = losses.vid_log_scale_init(self.init_pred_var, self.eps)
      scales.append(self.param(f'log_scale{i}', nn.initializers.constant(init), (c,), jnp.float32))
    return {'pred_mean': tuple(preds), 'log_scale': tuple(scales)}


def _vid_module(cfg, student_shapes, teacher_shapes, info):
  del info
  n = len(student_shapes.features)
  _require_maps('vid', student_shapes, 'student', range(1, n))
  _require_maps('vid', teacher_shapes, 'teacher', range(1, len(teacher_shapes.features)))
  pairs = _stage_pairs('vid', student_shapes, teacher_shapes)
  return VID(tuple(t.shape[-1] for _, t in pairs), cfg.vid.init_pred_var, cfg.vid.eps,
             dtype=student_shapes.features[-1].dtype)


def vid_loss(ctx: distill.Context, cfg):
  """Variational Information Distillation (Ahn et al., CVPR 2019), summed over the stage pairs."""
  out = ctx.extras['vid']
  total = 0.0
  for mu, log_scale, (_, ft) in zip(out['pred_mean'], out['log_scale'], _stage_pairs('vid', ctx.student,
                                                                                     ctx.teacher)):
    _, target = losses.align_spatial(mu, ft)  # pools the teacher map when it is the larger one
    total = total + losses.vid_loss(mu, log_scale, target, cfg.vid.eps)
  return total


# RepDistiller VIDLoss(init_pred_var=5.0, eps=1e-5): the variance softplus(log_scale) + eps starts at init_pred_var
# (> eps, or its log is undefined); scripts/run_cifar_distill.sh -r 1 -a 0 -b 1.
distill.register('vid', distill.Method(
    vid_loss, module=_vid_module,
    options=distill.Options(dict(init_pred_var=5.0, eps=1e-5),
                            ranges=dict(init_pred_var=distill.Range(0.0, low_ok=False),
                                        eps=distill.Range(0.0, low_ok=False))),
    recipe=distill.Recipe(weights={'ce': 1.0, 'vid': 1.0})))
