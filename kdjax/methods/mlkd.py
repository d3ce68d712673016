"""Multi-Level Logit Distillation (Jin, Wang & Lin, CVPR 2023), as Jin-Ying/Multi-Level-Logit-Distillation's
mdistiller/distillers/KD_ours.py trains it (and logit-standardization-KD's distillers/MLKD.py for MLKD + LS).

Two views of every batch: the weak one (the step's usual augmentation) and a strong one (RandAugment + Cutout, made on
the device: `kdjax.data.device.rand_augment`); both networks see both. Terms:

  'mlkd'      = kd_weak + kd_strong + cc_weak + bc_weak, summed over the temperatures (4, 3, 5, 2, 6):
                kd_weak   = sum_T KD_T(weak) * mean(mask)           (instance level, the confident half masked)
                kd_strong = sum_{T in (4, 3, 5)} KD_T(strong) + sum_{T in (2, 6)} KD_T(weak)   (sic: the code;
                            `distill.mlkd.num_strong` = 3: the first 3 temperatures read the strong view)
                cc_weak   = sum_T CC_T(weak) * mean(class_mask)     (class level: C x C Gram of predictions)
                bc_weak   = sum_T BC_T(weak) * mean(mask)           (batch level: B x B Gram of predictions)
  'ce_strong' = CE of the student's strong-view logits (the reference's loss_ce is CE(weak) + CE(strong): kdjax's
                'ce' plus this term, each weighted by CE_WEIGHT 0.1).

The reference's losses are batch means (`reduce=True`), so `loss * mask).mean()` is the loss times the fraction of
the batch whose teacher confidence is at most its median (`np.percentile(.., 50)`), and likewise for the classes;
the code computes cc_strong and bc_strong but does not add them, so neither does kdjax. With
`distill.logit_standardize` (MLKD + LS) the KD parts read standardized logits (`distill.logit_pair`), the CC/BC
parts and the masks the raw ones, as logit-standardization-KD's MLKD.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax import distill
from kdjax.data import device as device_data
from kdjax import losses


def class_gram_loss(student_logits, teacher_logits, temperature):
  """cc_loss: sum((P_t^T P_t - P_s^T P_s)^2) / C with P = softmax(z / T), [B, C]."""
  ps = jax.nn.softmax(jnp.asarray(student_logits, jnp.float32) / temperature, axis=-1)
  pt = jax.nn.softmax(jnp.asarray(teacher_logits, jnp.float32) / temperature, axis=-1)
  return jnp.sum((pt.T @ pt - ps.T @ ps) ** 2) / ps.shape[1]


def batch_gram_loss(student_logits, teacher_logits, temperature):
  """bc_loss: sum((P_t P_t^T - P_s P_s^T)^2) / B."""
  ps = jax.nn.softmax(jnp.asarray(student_logits, jnp.float32) / temperature, axis=-1)
  pt = jax.nn.softmax(jnp.asarray(teacher_logits, jnp.float32) / temperature, axis=-1)
  return jnp.sum((pt @ pt.T - ps @ ps.T) ** 2) / ps.shape[0]


def confidence_fractions(teacher_weak_logits):
  """(fraction of examples, fraction of classes) kept by the reference's masks: examples whose teacher max
  probability is <= its batch median, classes whose summed teacher probability is <= their median."""
  p = jax.nn.softmax(jax.lax.stop_gradient(jnp.asarray(teacher_weak_logits, jnp.float32)), axis=-1)
  conf = jnp.max(p, axis=-1)
  class_conf = jnp.sum(p, axis=0)
  mask = jnp.mean((conf <= jnp.percentile(conf, 50)).astype(jnp.float32))
  class_mask = jnp.mean((class_conf <= jnp.percentile(class_conf, 50)).astype(jnp.float32))
  return mask, class_mask


def mlkd_loss(weak, strong, raw_weak, temperatures, num_strong: int):
  """The 'mlkd' term from logits. `weak`, `strong`: (student, teacher) logits as the KD parts read them (standardized
  or not); `raw_weak`: the raw weak pair the CC/BC parts and the masks read; the strong-side KD of the first
  `num_strong` temperatures reads `strong`, the others' `weak`."""
  mask, class_mask = confidence_fractions(raw_weak[1])
  total = jnp.float32(0)
  for i, t in enumerate(temperatures):
    total += losses.kd_loss(*weak, t) * mask
    total += losses.kd_loss(*(strong if i < num_strong else weak), t)
    total += class_gram_loss(*raw_weak, t) * class_mask
    total += batch_gram_loss(*raw_weak, t) * mask
  return total


def _strong_context(ctx: distill.Context) -> distill.Context:
  student, teacher = ctx.views['strong']
  return ctx.replace(student=student, teacher=teacher, extras={})


def _mlkd(ctx: distill.Context, cfg):
  c = cfg.mlkd
  raw = (distill.Distiller.logits(ctx), ctx.teacher.logits)
  return mlkd_loss(distill.logit_pair(ctx, cfg), distill.logit_pair(_strong_context(ctx), cfg), raw,
                   tuple(float(t) for t in c.temperatures), int(c.num_strong))


def _ce_strong(ctx: distill.Context, cfg):
  return losses.cross_entropy(ctx.views['strong'][0].logits, ctx.labels, cfg.label_smoothing)


distill.register_view('strong', distill.View(device_data.strong_view, stream=4))
# Multi-Level-Logit-Distillation configs/cifar100/ours/*.yaml: (lr, epochs) per pair, the item 'mlkd_recipe'; the lr
# decays x0.1 at 150, 180 and 210 in every file, the 480-epoch ones included.
_TRAINING = {pair: {'optimizer.lr': lr, 'epochs': epochs} for pair, (lr, epochs) in {
    ('resnet32x4', 'resnet8x4'): (0.025, 240),
    ('wrn_40_2', 'wrn_16_2'): (0.025, 240),
    ('wrn_40_2', 'wrn_40_1'): (0.025, 240),
    ('vgg13', 'vgg8'): (0.025, 240),
    ('resnet110', 'resnet32'): (0.025, 240),
    ('resnet56', 'resnet20'): (0.025, 240),
    ('resnet32x4', 'ShuffleV1'): (0.01, 480),
    ('resnet32x4', 'ShuffleV2'): (0.01, 480),
    ('wrn_40_2', 'ShuffleV1'): (0.0025, 480),
    ('vgg13', 'MobileNetV2'): (0.0025, 480),
    ('ResNet50', 'MobileNetV2'): (0.0025, 480),
}.items()}

# KD / class / batch alignment at each temperature; the strong-side KD of the first num_strong temperatures reads the
# strong view, the others' the weak view (as the reference code does). mdistiller/engine/cfg.py KD.LOSS: CE_WEIGHT
# 0.1 on CE(weak) + CE(strong), KD_WEIGHT 0.9 on every distillation part.
distill.register_view('strong', distill.View(device_data.strong_view, stream=4))
distill.register('mlkd', distill.Method(
    _mlkd, views=('strong',),
    options=distill.Options(dict(temperatures=(4.0, 3.0, 5.0, 2.0, 6.0), num_strong=3),
                            ranges=dict(temperatures=distill.Range(0.0, low_ok=False), num_strong=distill.Range(0))),
    recipe=distill.Recipe(weights={'ce': 0.1, 'ce_strong': 0.1, 'mlkd': 0.9}, training=_TRAINING)))
distill.register('ce_strong', distill.Method(_ce_strong, needs_teacher=False, views=('strong',)))
