"""Relation methods on the pooled embedding (RepDistiller's `feat[-1]`): RKD and PKT."""

from __future__ import annotations

from kdjax import distill
from kdjax import losses


def rkd_loss(ctx: distill.Context, cfg):
  """Relational KD (Park et al., CVPR 2019): 25 x distance + 50 x angle smooth-L1 inside (RepDistiller
  distiller_zoo/RKD.py); the teacher's relations carry no gradient."""
  return losses.rkd_loss(ctx.student.embedding, ctx.teacher.embedding, cfg.rkd.distance_weight,
                         cfg.rkd.angle_weight)


def pkt_loss(ctx: distill.Context, cfg):
  """Probabilistic Knowledge Transfer (Passalis & Tefas, ECCV 2018), RepDistiller distiller_zoo/PKT.py."""
  del cfg
  return losses.pkt_loss(ctx.student.embedding, ctx.teacher.embedding)


# RepDistiller scripts/run_cifar_distill.sh: -r 1 -a 0 -b 1 (RKD), -b 30000 (PKT); distiller_zoo/RKD.py's w_d 25,
# w_a 50 inside the term.
distill.register('rkd', distill.Method(
    rkd_loss, hparams=('rkd.distance_weight', 'rkd.angle_weight'),
    options=distill.Options(dict(distance_weight=25.0, angle_weight=50.0),
                            ranges=dict(distance_weight=distill.Range(0.0), angle_weight=distill.Range(0.0))),
    recipe=distill.Recipe(weights={'ce': 1.0, 'rkd': 1.0})))
distill.register('pkt', distill.Method(pkt_loss, recipe=distill.Recipe(weights={'ce': 1.0, 'pkt': 30000.0})))
