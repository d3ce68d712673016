"""ReviewKD: knowledge review with attention-based fusion (ABF) and the hierarchical context loss (HCL)
(Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021), as mdistiller's `distillers/ReviewKD.py`
trains it on CIFAR-100 (the dvlab-research/ReviewKD CIFAR code is the same model).

Levels, shallow to deep: the student's stage outputs `features[1:]` (post-ReLU: REVIEWKD.STU_PREACT = False; the
stem `features[0]` is dropped, as the reference's zip over its 4 ABFs drops feats[0]) plus the pooled embedding as
a 1x1 map; the teacher's pre-ReLU stage maps `preact[1:]` plus its pooled embedding. mdistiller's IN_CHANNELS /
OUT_CHANNELS / SHAPES / OUT_SHAPES are these levels' channels and sizes (its CIFAR defaults are exactly those of
resnet8x4 / resnet32x4), so they are read from the models here instead of configured per pair. The ABFs run from
the deepest level back: each maps its level to `mid` channels (1x1 conv + BN), fuses it with the previous (deeper)
ABF's residual upsampled to its size (nearest) through a 2-channel sigmoid attention (1x1 conv on the concat), resizes
to the teacher's size (nearest) when it differs, and outputs the teacher's channels through a 3x3 conv + BN;
`mid = min(512, student embedding width)` (the reference's `min(512, in_channels[-1])`; MAX_MID_CHANNEL is read
there but unused).

Loss: HCL summed over the levels, times mdistiller's warmup `min(epoch / WARMUP_EPOCHS, 1)` (20 epochs);
REVIEWKD_WEIGHT (5 for CIFAR-100, configs/cifar100/reviewkd.yaml) is the 'reviewkd' weight.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from kdjax import distill
from kdjax import losses
from kdjax.errors import ConfigError
from kdjax.methods import dkd
from kdjax.models import layers

# nn.init.kaiming_uniform_(w, a=1): bound sqrt(6 / ((1 + a^2) fan_in)) = sqrt(3 / fan_in).
_kaiming_uniform_a1 = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')


def nearest_resize(x, out_hw):
  """`F.interpolate(x, out_hw, mode='nearest')` for NHWC maps: source index floor(i * in / out)."""
  (h, w), (oh, ow) = x.shape[1:3], (int(out_hw[0]), int(out_hw[1]))
  if (h, w) == (oh, ow):
    return x
  rows = np.floor(np.arange(oh) * (h / oh)).astype(np.int32)
  cols = np.floor(np.arange(ow) * (w / ow)).astype(np.int32)
  return x[:, rows][:, :, cols]


def hcl_loss(student_maps, teacher_maps):
  """mdistiller `hcl_loss`: per level, MSE at full size (weight 1) plus the MSE of both maps adaptive-average-pooled
  to 4x4, 2x2, 1x1 (only sizes smaller than the map's height) with weights 1/2, 1/4, 1/8, over the sum of the
  weights used; summed over the levels."""
  total = 0.0
  for fs, ft in zip(student_maps, teacher_maps):
    fs, ft = fs.astype(jnp.float32), ft.astype(jnp.float32)
    h = fs.shape[1]
    loss, cnt, tot = jnp.mean((fs - ft) ** 2), 1.0, 1.0
    for level in (4, 2, 1):
      if level >= h:
        continue
      cnt /= 2.0
      ps, pt = losses.adaptive_avg_pool(fs, (level, level)), losses.adaptive_avg_pool(ft, (level, level))
      loss = loss + jnp.mean((ps - pt) ** 2) * cnt
      tot += cnt
    total = total + loss / tot
  return total


class ABF(nn.Module):
  """mdistiller `ABF`: (student level x, deeper residual y) -> (output at the teacher's size and channels, residual)."""
  mid_channels: int
  out_channels: int
  fuse: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, residual, out_hw, train: bool):
    n, h, w, _ = x.shape
    x = layers.conv(self.mid_channels, 1, padding=0, kernel_init=_kaiming_uniform_a1, dtype=self.dtype,
                    name='conv1')(x)
    x = layers.batch_norm(train, self.dtype, name='bn1')(x)
    if self.fuse:
      y = nearest_resize(residual, (h, w))
      z = layers.conv(2, 1, padding=0, use_bias=True, fan_in=2 * self.mid_channels, dtype=self.dtype,
                      name='att_conv')(jnp.concatenate([x, y], axis=-1))
      z = nn.sigmoid(z)
      x = x * z[..., 0:1] + y * z[..., 1:2]
    x = nearest_resize(x, out_hw)
    out = layers.conv(self.out_channels, 3, padding=1, kernel_init=_kaiming_uniform_a1, dtype=self.dtype,
                      name='conv2')(x)
    out = layers.batch_norm(train, self.dtype, name='bn2')(out)
    return out, x


def _student_levels(student, stu_preact: bool):
  maps = student.preact if stu_preact else student.features
  return list(maps[1:]) + [student.embedding[:, None, None, :]]


def _teacher_levels(teacher):
  return list(teacher.preact[1:]) + [teacher.embedding[:, None, None, :]]


class ReviewKD(nn.Module):
  teacher_channels: tuple[int, ...]       # shallow to deep, the embedding last
  teacher_hw: tuple[tuple[int, int], ...]
  mid_channels: int
  stu_preact: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, student, teacher, *, labels, indices, train, teacher_classify):
    del teacher, labels, indices, teacher_classify
    levels = _student_levels(student, self.stu_preact)
    last = len(levels) - 1
    results, residual = [None] * len(levels), None
    for i in range(last, -1, -1):  # deepest (the pooled embedding, no fusion) first
      abf = ABF(self.mid_channels, self.teacher_channels[i], fuse=i < last, dtype=self.dtype, name=f'abf{i}')
      results[i], residual = abf(levels[i].astype(self.dtype), residual, self.teacher_hw[i], train)
    return {'results': tuple(results)}


def _check(cfg, student_shapes, teacher_shapes, info):
  del cfg, info
  for who, shapes, maps in (('student', student_shapes, student_shapes.features),
                            ('teacher', teacher_shapes, teacher_shapes.preact)):
    if len(maps) < 2 or any(m.ndim != 4 for m in maps[1:]) or shapes.embedding.ndim != 2:
      raise ConfigError(f'reviewkd needs convolutional stage maps and a pooled embedding, but the {who} has '
                        f'{[tuple(m.shape) for m in maps]}')
  if len(student_shapes.features) != len(teacher_shapes.preact):
    raise ConfigError(f'reviewkd pairs the stages one to one, but the student has {len(student_shapes.features) - 1} '
                      f'and the teacher {len(teacher_shapes.preact) - 1}')


def _module(cfg, student_shapes, teacher_shapes, info):
  _check(cfg, student_shapes, teacher_shapes, info)
  c = cfg.reviewkd
  t_maps = teacher_shapes.preact[1:]
  channels = tuple(int(t.shape[-1]) for t in t_maps) + (int(teacher_shapes.embedding.shape[-1]),)
  return ReviewKD(channels, tuple(tuple(t.shape[1:3]) for t in t_maps) + ((1, 1),),
                  min(int(c.max_mid_channels), int(student_shapes.embedding.shape[-1])), bool(c.stu_preact),
                  dtype=student_shapes.features[-1].dtype)


def reviewkd_loss(ctx: distill.Context, cfg):
  """HCL between the ABF outputs and the teacher's levels, times the linear warmup."""
  results = ctx.extras['reviewkd']['results']
  return dkd.warmup_factor(ctx.epoch, cfg.reviewkd.warmup_epochs) * hcl_loss(results, _teacher_levels(ctx.teacher))


# mdistiller REVIEWKD: WARMUP_EPOCHS 20, STU_PREACT False, the 512 cap on the ABF width (mid = min(cap, the student's
# embedding width)); configs/cifar100/reviewkd.yaml: CE 1, REVIEWKD_WEIGHT 5.
distill.register('reviewkd', distill.Method(
    reviewkd_loss, module=_module, check=_check,
    options=distill.Options(dict(warmup_epochs=20, stu_preact=False, max_mid_channels=512),
                            ranges=dict(warmup_epochs=distill.Range(0.0), max_mid_channels=distill.Range(1))),
    recipe=distill.Recipe(weights={'ce': 1.0, 'reviewkd': 5.0})))
