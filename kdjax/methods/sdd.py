"""SDD: scale decoupled distillation (Wei et al., CVPR 2024), as shicaiwei123/SDD-CVPR2024 trains it on CIFAR-100:
SD-KD (mdistiller/distillers/KD.py `sdd_kd_loss`), SD-DKD (distillers/SDD_DKD.py `multi_dkd`) and SD-NKD
(distillers/SDD_nkd.py `multi_nkd_loss`).

The map each network's classifier pools (`cat.head_map`: `features[-1]`, or relu(`preact[-1]`) for wrn_*) is
adaptive-average-pooled to 4x4, and that 4x4 to each scale of `distill.sdd.scales` (the reference's `SPP` with
`--M [1,2,4]`, `[1,2]` or `[1]`); every region's pooled vector goes through the network's own classifier (the Linear
with its bias, the student's differentiably), giving N = sum(s^2) region logits per example, region 0 the global one.
The per-region loss (KD at T, or DKD) is weighted by the teacher's predictions: a local region whose correctness
(teacher argmax == label) differs from the global prediction's is a complementary term, weight 2; the others
(consistent terms, the global region included) weigh 1. The weighted sum is divided by N x B (SD-KD, SD-NKD: the
sum over the N x B rows / their number; SD-DKD: its `dkd_loss` divides each row by N x B).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax import distill
from kdjax import losses
from kdjax.errors import ConfigError
from kdjax.methods import cat
from kdjax.methods import dkd

SPP_BASE = 4  # the reference's SPP pools to 4x4 first, and the other scales from that 4x4


def region_logits(feature_map, classify, scales):
  """[B, N, classes]: `classify` on the map pooled to 4x4 and then to each scale, regions in row-major order, scales
  in the order given (the reference's `torch.cat` of the flattened 1x1, 2x2, 4x4 poolings)."""
  base = losses.adaptive_avg_pool(feature_map, (SPP_BASE, SPP_BASE))
  parts = []
  for s in scales:
    pooled = losses.adaptive_avg_pool(base, (s, s))
    out = classify(pooled.astype(feature_map.dtype))
    parts.append(jnp.reshape(out, (out.shape[0], s * s, out.shape[-1])))
  return jnp.concatenate(parts, axis=1).astype(jnp.float32)


def region_weights(teacher_regions, labels):
  """[B, N] weights: 2 where a local region's correctness differs from the global region's (region 0), else 1."""
  correct = jnp.argmax(teacher_regions, axis=-1) == labels[:, None]
  complementary = (correct != correct[:, :1]).at[:, 0].set(False)
  return jnp.where(complementary, 2.0, 1.0)


def sdd_loss(student_regions, teacher_regions, labels, per_row):
  """sum(weight * per_row(student row, teacher row, label)) / (N * B) over the [B, N, classes] region logits;
  `per_row(s [C], t [C], y)` is one row's loss."""
  b, n, _ = student_regions.shape
  rows = jax.vmap(jax.vmap(per_row, in_axes=(0, 0, None)), in_axes=(0, 0, 0))(student_regions, teacher_regions, labels)
  return jnp.sum(region_weights(teacher_regions, labels) * rows) / (b * n)


def sdd_kd_loss(student_regions, teacher_regions, labels, temperature: float = 4.0):
  """SD-KD: each row's T^2 KL(softmax(z_t / T) || softmax(z_s / T)), weighted (KD.py `sdd_kd_loss`)."""
  row = lambda s, t, y: losses.kd_loss(s[None], t[None], temperature)
  return sdd_loss(student_regions, teacher_regions, labels, row)


def sdd_dkd_loss(student_regions, teacher_regions, labels, alpha, beta, temperature):
  """SD-DKD: each row's alpha TCKD + beta NCKD at T (mdistiller's DKD per row), weighted (SDD_DKD.py
  `multi_dkd`)."""
  row = lambda s, t, y: losses.dkd_loss(s[None], t[None], y[None], alpha, beta, temperature)
  return sdd_loss(student_regions, teacher_regions, labels, row)


def nkd_row(s, t, y, temperature, gamma):
  """SDD_nkd.py `nkd_loss` for one row: -p_t(y) log p_s(y) (T = 1, p_t detached) - gamma T^2 sum_c q_t(c) log q_s(c)
  with q = softmax(z / T) over every class: its mask (`ones_like(..).scatter_(1, label, 1)`) keeps the target column
  (the earlier NKD, unlike kdjax's 'nkd' term)."""
  s, t = s.astype(jnp.float32), t.astype(jnp.float32)
  target = -jax.lax.stop_gradient(jax.nn.softmax(t))[y] * jax.nn.log_softmax(s)[y]
  q_t = jax.nn.softmax(t / temperature)
  return target - gamma * temperature ** 2 * jnp.sum(q_t * jax.nn.log_softmax(s / temperature))


def sdd_nkd_loss(student_regions, teacher_regions, labels, temperature, gamma):
  """SD-NKD: each row's `nkd_row`, weighted (SDD_nkd.py `multi_nkd_loss`)."""
  return sdd_loss(student_regions, teacher_regions, labels, lambda s, t, y: nkd_row(s, t, y, temperature, gamma))


class SDD(nn.Module):
  student_kind: str
  teacher_kind: str
  scales: tuple = (1, 2, 4)
  extra_inputs: ClassVar[tuple] = ('student_classify',)

  @nn.compact
  def __call__(self, student, teacher, *, labels, indices, train, teacher_classify, student_classify):
    del labels, indices, train
    s = region_logits(cat.head_map(student, self.student_kind), student_classify, self.scales)
    t = region_logits(cat.head_map(teacher, self.teacher_kind), teacher_classify, self.scales)
    return {'regions_s': s, 'regions_t': jax.lax.stop_gradient(t)}


def _check_for(name):
  def check(cfg, student_shapes, teacher_shapes, info):
    del student_shapes, teacher_shapes
    if tuple(cfg.sdd.scales) not in SCALES:
      raise ConfigError(f'distill.sdd.scales must be one of {SCALES}, got {tuple(cfg.sdd.scales)}')
    for who, model in (('student', info.student), ('teacher', info.teacher)):
      if cat._head_map_kind(model) is None:
        raise ConfigError(f'{name} applies the {who}\'s classifier to regions of the map it pools, but '
                          f'{info.name(who)} does not expose that map (supported: resnet*, ResNet*, vgg*, wrn_*, '
                          'ShuffleV1)')
      if getattr(model, 'subclasses', 1) != 1:
        raise ConfigError(f'{name} reads the {who}\'s class logits per region, but the {who} has subclasses')
  return check


def _module_for(name):
  def module(cfg, student_shapes, teacher_shapes, info):
    _check_for(name)(cfg, student_shapes, teacher_shapes, info)
    return SDD(cat._head_map_kind(info.student), cat._head_map_kind(info.teacher),
               tuple(int(s) for s in cfg.sdd.scales))
  return module


def _sdd_kd(ctx: distill.Context, cfg):
  out = ctx.extras['sdd_kd']
  return sdd_kd_loss(out['regions_s'], out['regions_t'], ctx.labels, cfg.sdd.temperature)


def _sdd_dkd(ctx: distill.Context, cfg):
  out, c = ctx.extras['sdd_dkd'], cfg.dkd
  loss = sdd_dkd_loss(out['regions_s'], out['regions_t'], ctx.labels, c.alpha, c.beta, c.temperature)
  return dkd.warmup_factor(ctx.epoch, c.warmup_epochs) * loss


def _sdd_nkd(ctx: distill.Context, cfg):
  out, c = ctx.extras['sdd_nkd'], cfg.dkd
  loss = sdd_nkd_loss(out['regions_s'], out['regions_t'], ctx.labels, c.temperature, c.beta)
  return dkd.warmup_factor(ctx.epoch, c.warmup_epochs) * loss


SCALES = ((1, 2, 4), (1, 2), (1,))
OPTIONS = distill.Options(dict(scales=(1, 2, 4), temperature=4.0),
                          ranges=dict(temperature=distill.Range(0.0, low_ok=False), scales=distill.Range(1)),
                          choices=dict(scales=SCALES), section='sdd')

# The `--M` of the repository's teacher_*.sh commands, per pair (README: `--M [1,2,4]`, the default for the others).
_PAIRS = {('resnet32x4', 'resnet8x4'): (1, 2), ('vgg13', 'vgg8'): (1, 2), ('resnet32x4', 'ShuffleV1'): (1, 2, 4),
          ('resnet32x4', 'ShuffleV2'): (1, 2, 4), ('wrn_40_2', 'ShuffleV1'): (1, 2, 4),
          ('vgg13', 'MobileNetV2'): (1, 2, 4), ('ResNet50', 'MobileNetV2'): (1, 2, 4)}
PAIRS = {pair: {'sdd.scales': scales} for pair, scales in _PAIRS.items()}

# SD-KD: configs/cifar100/sdd_kd/*.yaml leave cfg.KD at mdistiller's defaults: CE 0.1, KD 0.9, T 4 (no warmup).
distill.register('sdd_kd', distill.Method(
    _sdd_kd, module=_module_for('sdd_kd'), check=_check_for('sdd_kd'), teacher0_network=True,
    hparams=('sdd.temperature',), options=OPTIONS,
    recipe=distill.Recipe(weights={'ce': 0.1, 'sdd_kd': 0.9}, pairs=PAIRS, digits={'sdd.scales': (1, 2)})))
# SD-DKD: configs/cifar100/sdd_dkd/*.yaml: CE 1, alpha 1, T 4, train_origin.py's --warmup 20, and DKD.BETA per pair as
# mdistiller's DKD configs (2, 6 or 8: kdjax/methods/dkd.py's pairs); it reads config.distill.dkd (DKD's options,
# their per-pair beta included) and the scales of config.distill.sdd.
distill.register('sdd_dkd', distill.Method(
    _sdd_dkd, module=_module_for('sdd_dkd'), check=_check_for('sdd_dkd'), teacher0_network=True,
    hparams=('dkd.alpha', 'dkd.beta', 'dkd.temperature'), options=OPTIONS,
    recipe=distill.Recipe(weights={'ce': 1.0, 'sdd_dkd': 1.0}, pairs=PAIRS)))
# SD-NKD: SDD_nkd.py reads cfg.DKD (T 4 as the temperature, BETA as gamma: 8, or the per-pair 2 / 6 of
# configs/cifar100/sdd_nkd/*.yaml, the same as DKD's; WARMUP 20) and CE 1; here config.distill.dkd's temperature, beta
# and warmup_epochs.
distill.register('sdd_nkd', distill.Method(
    _sdd_nkd, module=_module_for('sdd_nkd'), check=_check_for('sdd_nkd'), teacher0_network=True,
    hparams=('dkd.beta', 'dkd.temperature'), options=OPTIONS,
    recipe=distill.Recipe(weights={'ce': 1.0, 'sdd_nkd': 1.0}, pairs=PAIRS)))
