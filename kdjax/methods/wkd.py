"""WKD: Wasserstein distance based knowledge distillation (Lv et al., NeurIPS 2024), as JiamingLv/WKD
mdistiller/distillers/WKD.py computes it: WKD-L (logits) and WKD-F (features).

WKD-L ('wkd_l'): the target class is split off as in NKD, -mean(p_t(y) log p_s(y)) at T = 1 (p_t(y) detached), and
the non-target classes are compared by the entropic discrete Wasserstein distance between softmax(z_s / T) and
softmax(z_t / T) over the C - 1 other classes, with the class-to-class cost taken from the teacher's classifier:
1 - cosine similarity of its Linear weight rows (`COST_MATRIX: 'fc'`), sharpened to 1 - exp(-kappa * cost)
(`COST_MATRIX_SHARPEN`), relu + 1e-8. The transport plan comes from `sinkhorn_iter` Sinkhorn iterations at
regularisation `sinkhorn_lambda` (u starts at 1/n; v = w_t / (K^T u + 1e-8), u = w_s / (K v + 1e-8)); the student
gets the gradient through the iterations, as in the reference. Term: target term + logit_weight x decay x distance.

WKD-F ('wkd_f'): the student's map `features[hint_layer]` goes through RepDistiller's ConvReg (conv-BN-ReLU, the
reference's 'conv1x1' projector, its CIFAR-100 configs') or the 'bottleneck' one (1x1-3x3-1x1 convs, BN, ReLU; the
default of its ImageNet configs, for maps of equal size) to the teacher map's shape; each channel is a Gaussian with the spatial mean and
sqrt(unbiased variance + eps) per grid cell; the squared Gaussian Wasserstein distance of diagonal Gaussians is
mean_cov_ratio x |mu_s - mu_t|^2 + |sigma_s - sigma_t|^2, summed over channels and cells, over the batch and cells.
Term: decay x that.

Both weights decay on the reference's cosine after `decay_start` epochs: w x (1 + cos(pi (e - start) /
(end - start))) / 2 for the reference's epoch number e = floor(epoch) + 1 > start, `decay_end` its SOLVER.EPOCHS.
"""

from __future__ import annotations

import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax import distill
from kdjax.errors import ConfigError
from kdjax.methods import feature
from kdjax.models import layers


def cosine_decay(epoch, start: float, end: float):
  """WKD.py's loss-weight decay factor at our fractional `epoch` (completed epochs, from 0)."""
  e = jnp.floor(jnp.asarray(epoch, jnp.float32)) + 1.0
  frac = (e - start) / jnp.maximum(end - start, 1e-12)
  return jnp.where(e > start, 0.5 * (1.0 + jnp.cos(frac * math.pi)), 1.0)


# ------------------------------------------------------------------------------------------------------ WKD-L
def classifier_cost(kernel, sharpen: float = 1.0):
  """[C, C] cost from the teacher head's kernel [D, C]: 1 - cos of the class prototypes (the weight rows), then
  1 - exp(-sharpen * cost) when sharpen != 0 (WKD.py `__init__`)."""
  proto = jnp.asarray(kernel, jnp.float32).T
  proto = proto / jnp.maximum(jnp.linalg.norm(proto, axis=-1, keepdims=True), 1e-12)
  cost = 1.0 - proto @ proto.T
  return jnp.where(sharpen != 0, 1.0 - jnp.exp(-sharpen * cost), cost)


def sinkhorn_distance(w_s, w_t, cost, reg: float = 0.05, iters: int = 10):
  """sum(plan * cost) per row: `sinkhorn` + `wkd_logit_loss` of WKD.py for [B, n] weights and a [B, n, n] cost
  (already relu'd)."""
  k = jnp.exp(-cost / reg)
  u = jnp.full_like(w_s, 1.0 / w_s.shape[-1])
  v = u
  for _ in range(int(iters)):
    v = w_t / (jnp.einsum('bij,bi->bj', k, u) + 1e-8)
    u = w_s / (jnp.einsum('bij,bj->bi', k, v) + 1e-8)
  plan = u[:, :, None] * k * v[:, None, :]
  return jnp.sum(plan * cost, axis=(1, 2))


def non_target_index(labels, num_classes: int):
  """[B, C - 1]: each example's classes other than its label, in order."""
  r = jnp.arange(num_classes - 1)[None, :]
  return r + (r >= labels[:, None]).astype(r.dtype)


def wkd_logit_loss(student_logits, teacher_logits, labels, cost, temperature, weight, reg=0.05, iters=10):
  """WKD.py `wkd_logit_loss_with_speration`: target term + weight x mean Sinkhorn distance over the non-target
  classes (the cost's target row and column removed)."""
  s, t = jnp.asarray(student_logits, jnp.float32), jnp.asarray(teacher_logits, jnp.float32)
  rows = jnp.arange(s.shape[0])
  p_t = jax.lax.stop_gradient(jax.nn.softmax(t, axis=-1))[rows, labels]
  target = -jnp.mean(p_t * jax.nn.log_softmax(s, axis=-1)[rows, labels])
  idx = non_target_index(labels, s.shape[-1])
  w_s = jax.nn.softmax(jnp.take_along_axis(s, idx, axis=-1) / temperature, axis=-1)
  w_t = jax.nn.softmax(jnp.take_along_axis(t, idx, axis=-1) / temperature, axis=-1)
  c = jax.nn.relu(cost[idx[:, :, None], idx[:, None, :]]) + 1e-8
  return target + weight * jnp.mean(sinkhorn_distance(w_s, w_t, c, reg, iters))


class TeacherCost(nn.Module):
  """The class-to-class cost from the frozen teacher's head kernel (`extra_inputs`: the teacher variables)."""
  extra_inputs: ClassVar[tuple] = ('teacher_variables',)

  @nn.compact
  def __call__(self, student, teacher, *, labels, indices, train, teacher_classify, teacher_variables):
    del student, teacher, labels, indices, train, teacher_classify
    return {'kernel': jax.lax.stop_gradient(jnp.asarray(teacher_variables['params']['head']['kernel']))}


def _check_l(cfg, student_shapes, teacher_shapes, info):
  del cfg, student_shapes
  if teacher_shapes.subclass_logits is not None or getattr(info.teacher, 'subclasses', 1) != 1:
    raise ConfigError('wkd_l builds its cost from the teacher classifier\'s class rows, but the teacher has '
                      'subclasses')
  if teacher_shapes.logits.shape[-1] < 3:
    raise ConfigError('wkd_l transports between the non-target classes and needs at least 3 classes')


def _wkd_l(ctx: distill.Context, cfg):
  c = cfg.wkd_l
  s, t = distill.logit_pair(ctx, cfg)
  cost = classifier_cost(ctx.extras['wkd_l']['kernel'], c.sharpen)
  weight = c.logit_weight * cosine_decay(ctx.epoch, c.decay_start, c.decay_end)
  return wkd_logit_loss(s, t, ctx.labels, cost, c.temperature, weight, c.sinkhorn_lambda, c.sinkhorn_iter)


# configs/cifar100/wkd_l/res32x4_res8x4.yaml: CE 1, WKD_LOGIT_WEIGHT 600, T 8, Sinkhorn lambda 0.05 x 10 iterations,
# sharpen 1, cosine decay from epoch 150 to SOLVER.EPOCHS 240. (Its COST_MATRIX is 'cka', a file of CKA similarities
# of the teacher's features per class pair; kdjax uses the repository's 'fc' cost, from the teacher's classifier.)
distill.register('wkd_l', distill.Method(
    _wkd_l, module=lambda cfg, s, t, info: TeacherCost(), check=_check_l, teacher0_network=True,
    hparams=('wkd_l.logit_weight', 'wkd_l.temperature', 'wkd_l.sinkhorn_lambda', 'wkd_l.sharpen',
             'wkd_l.decay_start', 'wkd_l.decay_end'),
    options=distill.Options(
        dict(logit_weight=600.0, temperature=8.0, sinkhorn_lambda=0.05, sinkhorn_iter=10, sharpen=1.0,
             decay_start=150.0, decay_end=240.0),
        ranges=dict(logit_weight=distill.Range(0.0), temperature=distill.Range(0.0, low_ok=False),
                    sinkhorn_lambda=distill.Range(0.0, low_ok=False), sinkhorn_iter=distill.Range(1),
                    sharpen=distill.Range(0.0), decay_start=distill.Range(0.0), decay_end=distill.Range(0.0))),
    recipe=distill.Recipe(weights={'ce': 1.0, 'wkd_l': 1.0}, digits={'wkd_l.decay_start': 5.0,
                                                                      'wkd_l.decay_end': 10.0})))


# ------------------------------------------------------------------------------------------------------ WKD-F
def _bins(size: int, out: int):
  """PyTorch's adaptive-pool bins [start, end) (WKD.py `adaptive_avg_std_pool2d`'s start_index / end_index)."""
  return [(math.floor(i * size / out), math.ceil((i + 1) * size / out)) for i in range(out)]


def gaussian_stats(x, grid: int, eps: float):
  """([B, grid, grid, C] means, [B, grid, grid, C] sqrt(unbiased variance + eps)) of an NHWC map per grid cell."""
  x = jnp.asarray(x, jnp.float32)
  means, stds = [], []
  for h0, h1 in _bins(x.shape[1], grid):
    for w0, w1 in _bins(x.shape[2], grid):
      cell = x[:, h0:h1, w0:w1, :]
      means.append(jnp.mean(cell, axis=(1, 2)))
      stds.append(jnp.sqrt(jnp.var(cell, axis=(1, 2), ddof=1) + eps))
  shape = (x.shape[0], grid, grid, x.shape[-1])
  return jnp.reshape(jnp.stack(means, 1), shape), jnp.reshape(jnp.stack(stds, 1), shape)


def wkd_feature_loss(f_s, f_t, mean_cov_ratio: float = 4.0, eps: float = 1e-5, grid: int = 1):
  """WKD.py `wkd_feature_loss` and the ratio: ratio x sum|mu_s - mu_t|^2 + sum|sigma_s - sigma_t|^2, over B x
  grid^2."""
  mu_s, sd_s = gaussian_stats(f_s, grid, eps)
  mu_t, sd_t = gaussian_stats(f_t, grid, eps)
  n = f_s.shape[0] * grid * grid
  return mean_cov_ratio * jnp.sum((mu_s - mu_t) ** 2) / n + jnp.sum((sd_s - sd_t) ** 2) / n


class BottleneckReg(nn.Module):
  """WKD's `ConvRegBottleNeck` for equal sizes (`use_relu=True`): conv1x1 to `hidden`, conv3x3, conv1x1 to the
  teacher's channels (all biased, PyTorch's default init), BN, ReLU."""
  teacher_channels: int
  hidden: int = 256

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = x.shape[-1]
    x = layers.conv(self.hidden, 1, padding=0, use_bias=True, fan_in=c, name='conv1')(x)
    x = layers.conv(self.hidden, 3, padding=1, use_bias=True, fan_in=self.hidden * 9, name='conv2')(x)
    x = layers.conv(self.teacher_channels, 1, padding=0, use_bias=True, fan_in=self.hidden, name='conv3')(x)
    return nn.relu(layers.batch_norm(train, name='bn')(x))


class WKDF(nn.Module):
  hint_layer: int
  teacher_hw: tuple
  teacher_channels: int
  projector: str = 'conv1x1'

  @nn.compact
  def __call__(self, student, teacher, *, labels, indices, train, teacher_classify):
    del teacher, labels, indices, teacher_classify
    if self.projector == 'bottleneck':
      reg = BottleneckReg(self.teacher_channels, name='regressor')
    else:
      reg = feature.ConvReg(self.teacher_hw, self.teacher_channels, name='regressor')
    return {'projected': reg(student.features[self.hint_layer], train)}


def _check_f(cfg, student_shapes, teacher_shapes, info):
  del info
  i = cfg.wkd_f.hint_layer
  feature._require_maps('wkd_f', student_shapes, 'student', [i])
  feature._require_maps('wkd_f', teacher_shapes, 'teacher', [i])
  h, w = teacher_shapes.features[i].shape[1:3]
  if cfg.wkd_f.projector == 'bottleneck' and tuple(student_shapes.features[i].shape[1:3]) != (h, w):
    raise ConfigError(f'wkd_f\'s bottleneck projector keeps the size, but the student features[{i}] is '
                      f'{student_shapes.features[i].shape[1]}x{student_shapes.features[i].shape[2]} and the '
                      f'teacher\'s {h}x{w}; use distill.wkd_f.projector = \'conv1x1\'')
  if min(h, w) < cfg.wkd_f.grid or h * w < 2:
    raise ConfigError(f'wkd_f needs at least 2 positions per grid cell; the teacher features[{i}] is {h}x{w} and '
                      f'distill.wkd_f.grid is {cfg.wkd_f.grid}')


def _wkd_f_module(cfg, student_shapes, teacher_shapes, info):
  _check_f(cfg, student_shapes, teacher_shapes, info)
  t = teacher_shapes.features[cfg.wkd_f.hint_layer]
  return WKDF(cfg.wkd_f.hint_layer, tuple(t.shape[1:3]), t.shape[-1], cfg.wkd_f.projector)


def _wkd_f(ctx: distill.Context, cfg):
  c = cfg.wkd_f
  loss = wkd_feature_loss(ctx.extras['wkd_f']['projected'], ctx.teacher.features[c.hint_layer], c.mean_cov_ratio,
                          c.eps, int(c.grid))
  return cosine_decay(ctx.epoch, c.decay_start, c.decay_end) * loss


# configs/cifar100/wkd_f/res32x4_res8x4.yaml: CE 1, WKD_FEAT_WEIGHT 0.08, HINT_LAYER -1, PROJECTOR 'conv1x1',
# MEAN_COV_RATIO 4, SPATIAL_GRID 1, EPS 1e-5, cosine decay from epoch 150 to 240.
distill.register('wkd_f', distill.Method(
    _wkd_f, module=_wkd_f_module, check=_check_f,
    hparams=('wkd_f.mean_cov_ratio', 'wkd_f.eps', 'wkd_f.decay_start', 'wkd_f.decay_end'),
    options=distill.Options(
        dict(hint_layer=-1, mean_cov_ratio=4.0, eps=1e-5, grid=1, decay_start=150.0, decay_end=240.0,
             projector='conv1x1'),
        ranges=dict(hint_layer=distill.Range(-100), mean_cov_ratio=distill.Range(0.0),
                    eps=distill.Range(0.0, low_ok=False), grid=distill.Range(1), decay_start=distill.Range(0.0),
                    decay_end=distill.Range(0.0)),
        choices=dict(projector=('conv1x1', 'bottleneck'))),
    recipe=distill.Recipe(weights={'ce': 1.0, 'wkd_f': 0.08}, digits={'wkd_f.decay_start': 5.0,
                                                                       'wkd_f.decay_end': 10.0})))
