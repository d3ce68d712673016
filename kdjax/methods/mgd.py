"""MGD: masked generative distillation (Yang et al., ECCV 2022), as yzd-v/MGD cls/mmcls/distillation/losses/mgd.py
(`MGDLoss`) trains it on ImageNet, with its classification distiller's maps: the last backbone stage of each network
(`features[layer]`, -1 by default).

The student's map goes through a 1x1 conv (biased) to the teacher's channels when they differ; a random mask zeroes
part of it: with `mask` 'channel' (the classification code: `torch.rand((N, C, 1, 1)) < lambda_mgd` -> 0) whole
channels, with 'pixel' (the detection and segmentation code: `(N, 1, H, W)`) whole positions, each with probability
`lambda_mgd`; a generator (conv3x3 -> ReLU -> conv3x3, biased, the teacher's width) reconstructs the teacher's map
from it. Term: sum of squared errors / batch (the reference's `MSELoss(reduction='sum') / N`); its alpha_mgd is the
'mgd' weight. The mask is drawn from the step's 'sample' stream (a fresh one per step and student); without it
(initialisation) nothing is masked.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax import distill
from kdjax.errors import ConfigError
from kdjax.methods import feature
from kdjax.models import layers


def random_mask(key, shape, kind: str, ratio):
  """1 where kept, 0 where masked (probability `ratio`), broadcastable to an NHWC map of `shape`."""
  n, h, w, c = shape
  draw = (n, 1, 1, c) if kind == 'channel' else (n, h, w, 1)
  return jnp.where(jax.random.uniform(key, draw) < ratio, 0.0, 1.0)


def mgd_loss(generated, target):
  """sum((generated - target)^2) / batch."""
  d = jnp.asarray(generated, jnp.float32) - jnp.asarray(target, jnp.float32)
  return jnp.sum(d * d) / d.shape[0]


class MGD(nn.Module):
  layer: int
  teacher_channels: int
  mask: str = 'channel'
  ratio: float = 0.15  # lambda_mgd: a field of the module (fixed per program), not a sweepable number
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, student, teacher, *, labels, indices, train, teacher_classify):
    del teacher, labels, indices, train, teacher_classify
    x = student.features[self.layer]
    c, t = x.shape[-1], self.teacher_channels
    if c != t:
      x = layers.conv(t, 1, padding=0, use_bias=True, fan_in=c, dtype=self.dtype, name='align')(x)
    if self.has_rng('sample'):
      x = x * random_mask(self.make_rng('sample'), x.shape, self.mask, self.ratio).astype(x.dtype)
    x = layers.conv(t, 3, padding=1, use_bias=True, fan_in=t * 9, dtype=self.dtype, name='generation0')(x)
    x = layers.conv(t, 3, padding=1, use_bias=True, fan_in=t * 9, dtype=self.dtype,
                    name='generation1')(nn.relu(x))
    return {'generated': x}


def _check(cfg, student_shapes, teacher_shapes, info):
  del info
  i = cfg.mgd.layer
  feature._require_maps('mgd', student_shapes, 'student', [i])
  feature._require_maps('mgd', teacher_shapes, 'teacher', [i])
  s, t = student_shapes.features[i].shape[1:3], teacher_shapes.features[i].shape[1:3]
  if tuple(s) != tuple(t):
    raise ConfigError(f'mgd reconstructs the teacher features[{i}] ({t[0]}x{t[1]}) from the student\'s at the same '
                      f'size, but the student\'s is {s[0]}x{s[1]}')


def _module(cfg, student_shapes, teacher_shapes, info):
  _check(cfg, student_shapes, teacher_shapes, info)
  c = cfg.mgd
  return MGD(c.layer, teacher_shapes.features[c.layer].shape[-1], c.mask, float(c.lambda_mgd),
             student_shapes.features[c.layer].dtype)


def _mgd(ctx: distill.Context, cfg):
  return mgd_loss(ctx.extras['mgd']['generated'], ctx.teacher.features[cfg.mgd.layer])


# yzd-v/MGD cls/configs/distillers/mgd/res34_distill_res18_img.py and res50_distill_mv1_img.py: alpha_mgd 7e-5,
# lambda_mgd 0.15, the student's CE (weight 1); no CIFAR-100 recipe exists in the repository, so these serve every pair.
distill.register('mgd', distill.Method(
    _mgd, module=_module, check=_check,
    options=distill.Options(dict(layer=-1, lambda_mgd=0.15, mask='channel'),
                            ranges=dict(layer=distill.Range(-100), lambda_mgd=distill.Range(0.0, 1.0, high_ok=False)),
                            choices=dict(mask=('channel', 'pixel'))),
    recipe=distill.Recipe(weights={'ce': 1.0, 'mgd': 7e-5})))
