"""CRLD: cross-view consistency regularisation for logit distillation (Zhang, Liu, Cai & Ma, ACM MM 2024), as its
mdistiller-based code's `distillers/CRLD.py` computes it (read in scx-822/CRLD-main, a derivative of the authors'
repository, whose `CRLD` distiller and `CFG.CRLD` defaults are the method's own).

Two views of every batch: the weak one (the step's crop + flip) and MLKD's strong one (RandAugment + Cutout on the
device, the view 'strong'; the reference's strong transform is the same RandAugment(2, 10) + Cutout after crop +
flip); both networks see both. With per-example KD_T(student, teacher) = T^2 KL(softmax(t / T) || softmax(s / T)):

  within-view  = mean_b [ (KD(s_w, t_w) + KD(s_s, t_s)) * [max softmax(t_w) >= tau_w] ]
  cross-view   = mean_b [ (KD(s_s, t_w) + KD(s_w, t_s)) * [max softmax(t_s) >= tau_s] ]
  'crld'       = wv_weight * within-view + cv_weight * cross-view

The masks are functions of the teacher alone (its logits arrive under stop_gradient). The reference's CE is
CE(weak) + CE(strong) times CE_WEIGHT: kdjax's 'ce' plus MLKD's 'ce_strong'. With `distill.logit_standardize` the KD
parts read standardized logits (`distill.logit_pair`), the masks the raw teacher softmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax import distill
from kdjax.methods import mlkd  # noqa: F401  (registers the 'strong' view and the 'ce_strong' term)


def kd_rows(student_logits, teacher_logits, temperature):
  """[B]: T^2 sum_c p_t (log p_t - log p_s) at temperature T (the reference's `kd_loss(..., reduce=False)`)."""
  s = jnp.asarray(student_logits, jnp.float32) / temperature
  t = jnp.asarray(teacher_logits, jnp.float32) / temperature
  log_pt = jax.nn.log_softmax(t, axis=-1)
  return jnp.sum(jnp.exp(log_pt) * (log_pt - jax.nn.log_softmax(s, axis=-1)), axis=-1) * temperature ** 2


def confidence_mask(teacher_logits, tau):
  """1 where the teacher's top softmax probability is >= tau (`conf.ge(tau)`), else 0."""
  p = jax.nn.softmax(jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32)), axis=-1)
  return (jnp.max(p, axis=-1) >= tau).astype(jnp.float32)


def crld_loss(weak, strong, raw_teacher_weak, raw_teacher_strong, temperature=4.0, tau_w=0.9, tau_s=0.2,
              wv_weight=2.0, cv_weight=0.5):
  """The 'crld' term. `weak`, `strong`: (student, teacher) logits of each view as the KD parts read them; the raw
  teacher logits give the masks."""
  (s_w, t_w), (s_s, t_s) = weak, strong
  mask_w = confidence_mask(raw_teacher_weak, tau_w)
  mask_s = confidence_mask(raw_teacher_strong, tau_s)
  within = jnp.mean((kd_rows(s_w, t_w, temperature) + kd_rows(s_s, t_s, temperature)) * mask_w)
  cross = jnp.mean((kd_rows(s_s, t_w, temperature) + kd_rows(s_w, t_s, temperature)) * mask_s)
  return wv_weight * within + cv_weight * cross


def _crld(ctx: distill.Context, cfg):
  c = cfg.crld
  student_s, teacher_s = ctx.views['strong']
  strong_ctx = ctx.replace(student=student_s, teacher=teacher_s, extras={})
  return crld_loss(distill.logit_pair(ctx, cfg), distill.logit_pair(strong_ctx, cfg), ctx.teacher.logits,
                   teacher_s.logits, c.temperature, c.tau_w, c.tau_s, c.wv_weight, c.cv_weight)


# CFG.CRLD: CE_WEIGHT 1 (on CE(weak) + CE(strong)), WV_WEIGHT 2, CV_WEIGHT 0.5, TEMPERATURE 4, TAU_W 0.9, TAU_S 0.2;
# configs/cifar100/crld/*.yaml change only the solver (the common 240-epoch recipe, lr 0.05).
distill.register('crld', distill.Method(
    _crld, views=('strong',),
    hparams=('crld.temperature', 'crld.tau_w', 'crld.tau_s', 'crld.wv_weight', 'crld.cv_weight'),
    options=distill.Options(dict(temperature=4.0, tau_w=0.9, tau_s=0.2, wv_weight=2.0, cv_weight=0.5),
                            ranges=dict(temperature=distill.Range(0.0, low_ok=False), tau_w=distill.Range(0.0, 1.0),
                                        tau_s=distill.Range(0.0, 1.0), wv_weight=distill.Range(0.0),
                                        cv_weight=distill.Range(0.0))),
    recipe=distill.Recipe(weights={'ce': 1.0, 'ce_strong': 1.0, 'crld': 1.0})))
