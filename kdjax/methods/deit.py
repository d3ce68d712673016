"""DeiT's distillation token (Touvron et al., "Training data-efficient image transformers & distillation through
attention", ICML 2021): facebookresearch/deit losses.py (`DistillationLoss`) and main.py (`--distillation-type`,
`--distillation-alpha 0.5`, `--distillation-tau 1.0`).

The student is a ViT with a distillation token (kdjax/models/vit.py, `distilled=True`: e.g. `deit_tiny_distilled`):
its class head is trained by the 'ce' term from the labels (`logits` are the class head's in training), its
distillation head by this term from the teacher:
- 'hard': cross-entropy of the distillation head against the teacher's argmax;
- 'soft': the KL divergence at temperature tau, as the reference computes it: summed over the batch and the classes,
  times tau^2, divided by the number of elements (batch x classes).
The reference's total is (1 - alpha) CE + alpha * this term: `config.distill.losses = {'ce': 0.5, 'deit': 0.5}`.
Evaluation reports each head ({split}_cls_head_accuracy, {split}_dist_head_accuracy) and their average, DeiT's
inference rule, as the run's accuracy ({split}_accuracy; kdjax/models: the eval-mode `logits`).

Being a term of the logits, it composes with the other terms ('kd', 'dkd', ... read the class head), with several
teachers (`distill.teacher_for`, `distill.ensemble`), `distill.logit_standardize` and sweeps of `deit.tau`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from kdjax import distill
from kdjax.errors import ConfigError


def deit_loss(dist_logits, teacher_logits, kind: str = 'hard', tau=1.0):
  """The distillation head's loss: 'hard' CE(dist_logits, argmax teacher) (batch mean), or 'soft'
  sum KL(softmax(t / tau) || softmax(s / tau)) * tau^2 / (batch x classes) (losses.py `DistillationLoss`)."""
  s = jnp.asarray(dist_logits, jnp.float32)
  t = jnp.asarray(teacher_logits, jnp.float32)
  if kind == 'hard':
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(s, jnp.argmax(t, -1)))
  if kind == 'soft':
    log_s, log_t = jax.nn.log_softmax(s / tau, -1), jax.nn.log_softmax(t / tau, -1)
    return jnp.sum(jnp.exp(log_t) * (log_t - log_s)) * (tau * tau) / s.size
  raise ConfigError(f"distill.deit.kind must be 'hard' or 'soft', got {kind!r}")


def _deit(ctx: distill.Context, cfg):
  s, t = ctx.student.dist_logits, ctx.teacher.logits
  if cfg.logit_standardize:
    s, t = distill.standardize(s), distill.standardize(t)
  return deit_loss(s, t, cfg.deit.kind, cfg.deit.tau)


def _check(cfg, student, teacher, info):
  if student.dist_logits is None:
    raise ConfigError('deit trains the distillation head of a student with a distillation token; this student has '
                      'none (use e.g. deit_tiny_distilled, or student.kwargs.distilled = True on a ViT)')


distill.register('deit', distill.Method(
    _deit, check=_check, hparams=('deit.tau',), trains_dist_head=True,
    options=distill.Options(defaults={'kind': 'hard', 'tau': 1.0},
                            ranges={'tau': distill.Range(0.0, low_ok=False)},
                            choices={'kind': ('hard', 'soft')})))

# DeiT's recipe as a `method=` axis takes it (a ViT student with the token; not one of configs/cifar100.py's CNN
# methods): the reference's loss weights (`--distillation-alpha 0.5`), hard or soft at tau 1 (main.py's defaults).
for _kind in ('hard', 'soft'):
  distill.register_recipe(f'deit_{_kind}', distill.Recipe(
      weights={'ce': 0.5, 'deit': 0.5}, settings={'deit.kind': _kind, 'deit.tau': 1.0}, cifar100=False))
