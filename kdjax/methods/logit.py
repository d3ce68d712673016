"""Logit-based frontier methods: DIST, NKD and CTKD. Each reads its logits through `distill.logit_pair`, so
`distill.logit_standardize` (Sun et al., CVPR 2024) applies to them as to kd and dkd.

- DIST (Huang et al., NeurIPS 2022): hunto/image_classification_sota lib/models/losses/dist_kd.py (`DIST`), run on
  CIFAR-100 by configs/strategies/distill/dist_cifar.yaml (`kd: dist_t4`: beta 1, gamma 1, tau 4; CE weight 1, KD
  weight 2).
- NKD (Yang et al., ICCV 2023): yzd-v/cls_KD mmcls/models/dis_losses/nkd.py (`NKDLoss`, the version with the target
  column removed from the non-target softmaxes), CIFAR-100 settings of
  configs/distillers/cifar100/res34_distill_res18_cifar.py (temp 3, gamma 3.5, added to the student's CE).
- CTKD (Li et al., AAAI 2023): zhengli97/CTKD models/temp_global.py (`Global_T`, `GradientReversalFunction`),
  helper/loops.py (T = t_start + t_end * sigmoid(global_T)) and train_student.py (`CosineDecay`, the reversal
  strength per epoch); scripts/run_cifar_distill.sh (-r 0.1 -a 0.9, t_start 1, t_end 20, decay 0 -> -1 over 10
  epochs).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax import distill
from kdjax import losses


def _f32(x):
  return jnp.asarray(x, jnp.float32)


# -------------------------------------------------------------------------------------------------------- DIST
def pearson_rows(a, b, eps: float = 1e-8):
  """Row-wise Pearson correlation: the cosine similarity of the mean-centred rows, `(a . b) / (|a| |b| + eps)`
  (dist_kd.py `pearson_correlation`). The norms have a zero gradient at the zero vector (a constant row)."""
  a = a - jnp.mean(a, axis=1, keepdims=True)
  b = b - jnp.mean(b, axis=1, keepdims=True)
  norms = losses._safe_norm(a, axis=1, keepdims=False) * losses._safe_norm(b, axis=1, keepdims=False)
  return jnp.sum(a * b, axis=1) / (norms + eps)


def dist_terms(student_logits, teacher_logits, tau: float = 4.0):
  """(inter, intra) of DIST: 1 - the mean Pearson correlation of the softmax(z / tau) rows (per example, across
  classes) and of its columns (per class, across the batch), each times tau^2 (dist_kd.py `DIST.forward`)."""
  y_s = jax.nn.softmax(_f32(student_logits) / tau, axis=-1)
  y_t = jax.nn.softmax(_f32(teacher_logits) / tau, axis=-1)
  inter = (1.0 - jnp.mean(pearson_rows(y_s, y_t))) * tau ** 2
  intra = (1.0 - jnp.mean(pearson_rows(y_s.T, y_t.T))) * tau ** 2
  return inter, intra


def dist_loss(student_logits, teacher_logits, beta: float = 1.0, gamma: float = 1.0, tau: float = 4.0):
  """DIST: beta * inter-class relation + gamma * intra-class relation (see `dist_terms`)."""
  inter, intra = dist_terms(student_logits, teacher_logits, tau)
  return beta * inter + gamma * intra


def _dist(ctx: distill.Context, cfg):
  c = cfg.dist
  s, t = distill.logit_pair(ctx, cfg)
  return dist_loss(s, t, c.beta, c.gamma, c.tau)


# dist_cifar.yaml: ori_loss_weight 1, kd_loss_weight 2; beta 1, gamma 1, tau 4.
distill.register('dist', distill.Method(
    _dist, hparams=('dist.beta', 'dist.gamma', 'dist.tau'),
    options=distill.Options(dict(beta=1.0, gamma=1.0, tau=4.0),
                            ranges=dict(beta=distill.Range(0.0), gamma=distill.Range(0.0),
                                        tau=distill.Range(0.0, low_ok=False))),
    recipe=distill.Recipe(weights={'ce': 1.0, 'dist': 2.0})))


# --------------------------------------------------------------------------------------------------------- NKD
def nkd_loss(student_logits, teacher_logits, labels, temperature: float = 3.0, gamma: float = 3.5):
  """Normalized KD (cls_KD nkd.py `NKDLoss.forward`):

    L = -mean_b [ p_t(y) log p_s(y) ]                                        (target term, T = 1)
        - gamma T^2 mean_b sum_{c != y} q_t(c) log q_s(c),  q = softmax over the non-target classes of z / T.

  The target-class probability of the teacher is a constant (detached there; the teacher's logits arrive under
  stop_gradient here). The target column is removed exactly (a -inf logit, its term dropped), as the reference's
  boolean mask does.
  """
  s, t = _f32(student_logits), _f32(teacher_logits)
  onehot = jax.nn.one_hot(labels, s.shape[-1], dtype=bool)
  log_ps = jax.nn.log_softmax(s, axis=-1)
  p_t = jax.lax.stop_gradient(jax.nn.softmax(t, axis=-1))
  target = -jnp.mean(jnp.sum(jnp.where(onehot, p_t * log_ps, 0.0), axis=-1))
  log_qs = jnp.where(onehot, 0.0, jax.nn.log_softmax(jnp.where(onehot, -jnp.inf, s / temperature), axis=-1))
  q_t = jax.nn.softmax(jnp.where(onehot, -jnp.inf, t / temperature), axis=-1)
  non_target = jnp.mean(jnp.sum(q_t * log_qs, axis=-1))
  return target - gamma * temperature ** 2 * non_target


def _nkd(ctx: distill.Context, cfg):
  c = cfg.nkd
  s, t = distill.logit_pair(ctx, cfg)
  return nkd_loss(s, t, ctx.labels, c.temperature, c.gamma)


# cls_KD's CIFAR-100 config: NKD added to the student's CE (weight 1), temp 3, gamma 3.5.
distill.register('nkd', distill.Method(
    _nkd, hparams=('nkd.temperature', 'nkd.gamma'),
    options=distill.Options(dict(temperature=3.0, gamma=3.5),
                            ranges=dict(temperature=distill.Range(0.0, low_ok=False), gamma=distill.Range(0.0))),
    recipe=distill.Recipe(weights={'ce': 1.0, 'nkd': 1.0})))


# -------------------------------------------------------------------------------------------------------- CTKD
@jax.custom_vjp
def gradient_reversal(x, lam):
  """Identity forward; backward multiplies the incoming gradient by -lam (Ganin & Lempitsky 2015). CTKD's
  `GradientReversalFunction` multiplies by its argument, which its CosineDecay makes run from 0 to -1; `lam` here
  is that value negated, 0 -> lambda_max."""
  del lam
  return x


def _grl_fwd(x, lam):
  return x, lam


def _grl_bwd(lam, g):
  return (-lam * g, jnp.zeros_like(lam))


gradient_reversal.defvjp(_grl_fwd, _grl_bwd)


def ctkd_lambda(epoch, lambda_max: float = 1.0, loops: float = 10.0):
  """The reversal strength at our fractional `epoch` (completed epochs, from 0): CTKD train_student.py's
  `CosineDecay(max_value=0, min_value=-lambda_max, num_loops=loops).get_value(e)`, negated, with the reference's
  epoch number e = floor(epoch) + 1 (1 during the first epoch, constant within an epoch):

    lambda(e) = lambda_max * (1 - cos(pi * min(e, loops) / loops)) / 2.
  """
  e = jnp.floor(_f32(epoch)) + 1.0
  i = jnp.clip(e, 0.0, loops)
  return lambda_max * (1.0 - jnp.cos(i * math.pi / loops)) / 2.0


def ctkd_temperature(global_t, lam, t_start: float = 1.0, t_end: float = 20.0):
  """CTKD's temperature `t_start + t_end * sigmoid(GRL(global_T))` (helper/loops.py)."""
  return t_start + t_end * jax.nn.sigmoid(gradient_reversal(_f32(global_t), _f32(lam)))


class GlobalTemperature(nn.Module):
  """CTKD's `Global_T`: one trainable scalar, initialised to 1 (the temperature is formed in the loss, where the
  epoch is known)."""

  @nn.compact
  def __call__(self, student, teacher, *, labels, indices, train: bool, teacher_classify):
    del student, teacher, labels, indices, train, teacher_classify
    return {'global_t': self.param('global_t', nn.initializers.ones, (), jnp.float32)}


def _ctkd(ctx: distill.Context, cfg):
  c = cfg.ctkd
  lam = ctkd_lambda(ctx.epoch, c.lambda_max, c.loops)
  temperature = ctkd_temperature(ctx.extras['ctkd']['global_t'], lam, c.t_start, c.t_end)
  s, t = distill.logit_pair(ctx, cfg)
  return losses.kd_loss(s, t, temperature)


def _ctkd_ls(c):
  """CTKD + logit standardization: logit-standardization-KD's CTKD/scripts/run_cifar_distill.sh (-r 0.1 -a 9)."""
  c.distill.logit_standardize = True
  c.distill.losses = {'ce': 0.1, 'ctkd': distill.LS_KD_WEIGHT}


# T = t_start + t_end * sigmoid(learned scalar); gradient reversal of strength 0 -> lambda_max (cosine) over the first
# `loops` epochs. zhengli97/CTKD scripts/run_cifar_distill.sh: -r 0.1 -a 0.9, t_start 1, t_end 20, 10 loops.
distill.register('ctkd', distill.Method(
    _ctkd, module=lambda cfg, s, t, info: GlobalTemperature(),
    hparams=('ctkd.t_start', 'ctkd.t_end', 'ctkd.lambda_max', 'ctkd.loops'),
    options=distill.Options(dict(t_start=1.0, t_end=20.0, lambda_max=1.0, loops=10.0),
                            ranges=dict(t_start=distill.Range(0.0), t_end=distill.Range(0.0, low_ok=False),
                                        lambda_max=distill.Range(0.0), loops=distill.Range(0.0, low_ok=False))),
    recipe=distill.Recipe(weights={'ce': 0.1, 'ctkd': 0.9}, variants={'ls': _ctkd_ls})))
