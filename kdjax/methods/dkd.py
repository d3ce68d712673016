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


distill.register('dkd', distill.Method(dkd_loss, hparams=('dkd.alpha', 'dkd.beta', 'dkd.temperature')))
