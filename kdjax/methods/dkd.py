"""Decoupled KD (Zhao et al., CVPR 2022), as mdistiller's `DKD` distiller trains it on CIFAR-100."""

from __future__ import annotations

import jax.numpy as jnp

from kdjax import distill
from kdjax import losses


def warmup_factor(epoch, warmup_epochs: float):
  """mdistiller's `min(epoch / warmup, 1)`, with mdistiller's epoch counted from 1 during the first epoch.

  `epoch` is ours: the fractional number of epochs done, from 0 (`Context.epoch`), so mdistiller's epoch number is
  floor(epoch) + 1 and the factor is constant within an epoch, as there.
  """
  if warmup_epochs <= 0:
    return jnp.float32(1.0)
  return jnp.minimum((jnp.floor(jnp.asarray(epoch, jnp.float32)) + 1.0) / warmup_epochs, 1.0)


def dkd_loss(ctx: distill.Context, cfg):
  """alpha TCKD + beta NCKD at temperature T, times the linear warmup (mdistiller distillers/DKD.py)."""
  c = cfg.dkd
  s_logits, t_logits = distill.logit_pair(ctx, cfg)
  loss = losses.dkd_loss(s_logits, t_logits, ctx.labels, c.alpha, c.beta, c.temperature)
  return warmup_factor(ctx.epoch, c.warmup_epochs) * loss


def _ls(c):
  """DKD + logit standardization (logit-standardization-KD tools/train.py): alpha and beta x 9, T 2 (CE 1,
  warmup 20)."""
  c.distill.logit_standardize = True
  c.distill.dkd.alpha = c.distill.dkd.alpha * distill.LS_KD_WEIGHT
  c.distill.dkd.beta = c.distill.dkd.beta * distill.LS_KD_WEIGHT
  c.distill.dkd.temperature = distill.LS_BASE_TEMPERATURE


OPTIONS = distill.Options(
    dict(alpha=1.0, beta=8.0, temperature=4.0, warmup_epochs=20),
    ranges=dict(alpha=distill.Range(0.0), beta=distill.Range(0.0), temperature=distill.Range(0.0, low_ok=False),
                warmup_epochs=distill.Range(0.0)))

# mdistiller configs/cifar100/dkd/*.yaml: CE 1, DKD 1 (alpha and beta inside the term), T 4, 20 warmup epochs;
# DKD.BETA per pair for the pairs below, cfg.DKD.BETA = 8 for the others.
RECIPE = distill.Recipe(
    weights={'ce': 1.0, 'dkd': 1.0},
    pairs={('resnet56', 'resnet20'): {'dkd.beta': 2.0}, ('resnet110', 'resnet32'): {'dkd.beta': 2.0},
           ('wrn_40_2', 'wrn_16_2'): {'dkd.beta': 6.0}, ('wrn_40_2', 'wrn_40_1'): {'dkd.beta': 6.0},
           ('vgg13', 'vgg8'): {'dkd.beta': 6.0}, ('vgg13', 'MobileNetV2'): {'dkd.beta': 6.0}},
    digits={'dkd.warmup_epochs': 2},  # a 10-epoch run: the full DKD weight after 2 epochs
    variants={'ls': _ls})

distill.register('dkd', distill.Method(dkd_loss, hparams=('dkd.alpha', 'dkd.beta', 'dkd.temperature'),
                                       options=OPTIONS, recipe=RECIPE))
