"""Contrastive Representation Distillation (Tian, Krishnan & Isola, ICLR 2020), RepDistiller crd/*.py.

Two trainable embed heads (Linear -> L2 normalise, to `feat_dim`) on the student's and the teacher's pooled
embeddings; two memory banks ([num_train, feat_dim]: past student and past teacher embeddings, one row per training
example) and the NCE normalisation constants Z live in the non-trained variable collection 'memory'. Each train
step scores the student embedding against the teacher bank and vice versa (the positive row plus `nce_k` sampled
negatives), computes the loss on the banks as they were before the step, then writes the batch's embeddings into
the banks at the batch's dataset indices with momentum and renormalises them. Outside training (evaluation, init)
the collection is not mutable and nothing is sampled or updated.
"""

from __future__ import annotations

import math

from absl import logging
import flax.linen as nn
import jax.numpy as jnp

from kdjax import distill
from kdjax import losses
from kdjax.models import layers


class CRD(nn.Module):
  student_dim: int
  teacher_dim: int
  num_data: int
  feat_dim: int = 128
  nce_k: int = 16384
  nce_t: float = 0.07
  nce_m: float = 0.5

  @nn.compact
  def __call__(self, student, teacher, *, labels, indices, train, teacher_classify):
    del labels, teacher_classify
    n, d = self.num_data, self.feat_dim
    flat = lambda x: x.reshape(x.shape[0], -1).astype(jnp.float32)
    embed_s = losses.l2_normalize(layers.dense(d, fan_in=self.student_dim, name='embed_s')(flat(student.embedding)))
    embed_t = losses.l2_normalize(layers.dense(d, fan_in=self.teacher_dim, name='embed_t')(flat(teacher.embedding)))
    # crd/memory.py: memory_v1 holds student embeddings, memory_v2 teacher ones; U(+-1/sqrt(feat_dim/3)) at first.
    memory_s = self.variable('memory', 'memory_s', lambda: losses.crd_memory_init(self.make_rng('memory'), n, d))
    memory_t = self.variable('memory', 'memory_t', lambda: losses.crd_memory_init(self.make_rng('memory'), n, d))
    # Z_v1 (student anchor) and Z_v2 (teacher anchor): -1 until the first training batch estimates them.
    z_s = self.variable('memory', 'z_s', lambda: jnp.full((), -1.0, jnp.float32))
    z_t = self.variable('memory', 'z_t', lambda: jnp.full((), -1.0, jnp.float32))
    out = {'embed_s': embed_s, 'embed_t': embed_t}
    if not train:
      return out
    # Negatives drawn uniformly over the training set: ContrastMemory's own sampler (AliasMethod over uniform
    # unigrams). RepDistiller's default data loader (--mode exact) instead passes `contrast_idx` with negatives
    # drawn from the other classes only; with 100 classes about 1% of the uniform draws share the anchor's class.
    sample_idx = losses.crd_sample_indices(self.make_rng('sample'), indices, n, self.nce_k)
    scores_s, new_z_s = losses.crd_scores(embed_s, memory_t.value, sample_idx, z_s.value, self.nce_t)
    scores_t, new_z_t = losses.crd_scores(embed_t, memory_s.value, sample_idx, z_t.value, self.nce_t)
    # The banks the scores were read from ride along: the NCE's noise distribution is uniform over their rows.
    out.update(scores_s=scores_s, scores_t=scores_t, memory_s=memory_s.value, memory_t=memory_t.value)
    if self.is_mutable_collection('memory'):
      z_s.value, z_t.value = new_z_s, new_z_t
      memory_s.value = losses.crd_memory_update(memory_s.value, embed_s, indices, self.nce_m)
      memory_t.value = losses.crd_memory_update(memory_t.value, embed_t, indices, self.nce_m)
    return out


def _module(cfg, student_shapes, teacher_shapes, info: distill.DataInfo):
  c = cfg.crd
  nce_k = int(c.nce_k)
  if nce_k >= info.num_train:
    # RepDistiller assumes nce_k (16384) negatives out of CIFAR's 50000 rows; a tiny training set (digits) cannot
    # supply that many distinct ones, so draw at most num_train - 1 per anchor.
    logging.warning('crd: nce_k=%d >= the %d training examples; using nce_k=%d', nce_k, info.num_train,
                    info.num_train - 1)
    nce_k = max(info.num_train - 1, 1)
  size = lambda s: math.prod(s.embedding.shape[1:])
  return CRD(size(student_shapes), size(teacher_shapes), info.num_train, int(c.feat_dim), nce_k, float(c.nce_t),
             float(c.nce_m))


def crd_loss(ctx: distill.Context, cfg):
  """NCE loss of both anchors (crd/criterion.py ContrastLoss, student anchor + teacher anchor)."""
  del cfg
  out = ctx.extras['crd']
  if 'scores_s' not in out:
    raise ValueError('the crd loss is only defined on a training step (the memory is sampled only then)')
  n_data = out['memory_s'].shape[0]
  return losses.crd_nce_loss(out['scores_s'], n_data) + losses.crd_nce_loss(out['scores_t'], n_data)


# RepDistiller train_student.py: --feat_dim 128, --nce_k 16384, --nce_t 0.07, --nce_m 0.5;
# scripts/run_cifar_distill.sh -r 1 -a 0 -b 0.8. The digits stand-in draws 1024 negatives (of ~1300 rows).
distill.register('crd', distill.Method(
    crd_loss, module=_module, needs_indices=True,
    options=distill.Options(dict(feat_dim=128, nce_k=16384, nce_t=0.07, nce_m=0.5),
                            ranges=dict(feat_dim=distill.Range(1), nce_k=distill.Range(1),
                                        nce_t=distill.Range(0.0, low_ok=False), nce_m=distill.Range(0.0, 1.0))),
    recipe=distill.Recipe(weights={'ce': 1.0, 'crd': 0.8}, digits={'crd.nce_k': 1024})))
