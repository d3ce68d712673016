"""Knowledge-distillation losses as pure functions of arrays.

Every function here takes arrays and returns arrays: no Flax modules, no hidden
state.  Where a method needs state (CRD's memory banks and normalisation
constants) the state is an argument and its new value is a return value.

Conventions
-----------
* Feature maps are NHWC (channels last).  The PyTorch references are NCHW, so
 "mean over channels" is ``axis=-1`` here and spatial axes are 1 and 2.
* Each loss upcasts its inputs to float32 first: the model may run in bfloat16,
 but reductions over a batch / classes / pixels need float32 accumulation.
* Small matrix products inside losses (Gram matrices, pairwise distances, memory
 scores) are computed at ``Precision.HIGHEST`` so that accelerators that would
 otherwise use TF32/bf16 passes for float32 matmuls do not distort quantities
 such as ``|a|^2 + |b|^2 - 2 a.b`` that cancel heavily.
* Teacher tensors are NOT stop-gradient'ed here except where the reference
 detaches them inside the loss itself (RKD's teacher relations, CRD's memory
 rows and normalisation constant).  The training step is expected to compute
 teacher outputs outside the differentiated function.
* Losses return float32 scalars (reference modules returning shape-(1,) tensors
 are reduced to scalars).

Sources (formulas, normalisations and defaults follow these):
 RepDistiller  HobbitLong/RepDistiller   distiller_zoo/*.py, crd/criterion.py,
                     crd/memory.py, train_student.py
 mdistiller    megvii-research/mdistiller mdistiller/distillers/*.py,
                     mdistiller/engine/cfg.py
 SimKD         DefangChen/SimKD          models/util.py, train_student.py
 Subclass      google-research/google-research
                     subclass_distillation/mnist_colab.ipynb
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
  'cross_entropy',
  'kd_loss',
  'dkd_terms',
  'dkd_loss',
  'hint_loss',
  'fitnet_loss',
  'adaptive_avg_pool',
  'align_spatial',
  'attention_map',
  'at_loss',
  'at_loss_multi',
  'sp_loss',
  'sp_loss_multi',
  'rkd_pdist',
  'rkd_loss',
  'pkt_loss',
  'vid_log_scale_init',
  'vid_loss',
  'l2_normalize',
  'crd_memory_init',
  'crd_sample_indices',
  'crd_scores',
  'crd_nce_loss',
  'crd_memory_update',
  'crd_loss',
  'simkd_loss',
  'subclass_to_class_logits',
  'subclass_aux_loss',
]

_HIGHEST = jax.lax.Precision.HIGHEST


def _f32(x):
  return jnp.asarray(x).astype(jnp.float32)


def _safe_norm(x, axis=-1, keepdims=True):
  """Euclidean norm whose gradient at the zero vector is 0 instead of NaN."""
  sq = jnp.sum(x * x, axis=axis, keepdims=keepdims)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def _torch_normalize(x, axis=-1, eps=1e-12):
  """``x / max(||x||, eps)``: the semantics of torch.nn.functional.normalize."""
  return x / jnp.maximum(_safe_norm(x, axis=axis), eps)


def _flatten(x):
  return x.reshape(x.shape[0], -1)


def _smooth_l1(a, b):
  """PyTorch ``F.smooth_l1_loss`` with beta=1 and mean reduction."""
  d = jnp.abs(a - b)
  return jnp.mean(jnp.where(d < 1.0, 0.5 * d * d, d - 0.5))


# ----------------------------------------------------------------------------
# Logit losses
# ----------------------------------------------------------------------------

def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  """Softmax cross entropy with integer labels, averaged over the batch.

  ``label_smoothing`` uses the same convention as ``torch.nn.CrossEntropyLoss``:
  target = (1 - eps) * onehot + eps / num_classes.
  """
  logits = _f32(logits)
  labels = jnp.asarray(labels)
  if isinstance(label_smoothing, (int, float)) and label_smoothing == 0.0:
    per = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  else:
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    per = optax.softmax_cross_entropy(logits, optax.smooth_labels(onehot, label_smoothing))
  return jnp.mean(per)


def soft_cross_entropy(logits, targets, label_smoothing: float = 0.0):
  """Softmax cross entropy with soft targets [B, C] (mixup/cutmix's mixed labels), averaged over the batch;
  ``label_smoothing`` as in ``cross_entropy`` (torch's convention, applied to the soft target: linear, so the same
  as smoothing each one-hot before mixing)."""
  logits = _f32(logits)
  targets = optax.smooth_labels(jnp.asarray(targets, jnp.float32), label_smoothing)
  return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def kd_loss(student_logits, teacher_logits, temperature: float = 4.0):
  """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network".

    L = T^2 * mean_b sum_c p_t(c) * (log p_t(c) - log p_s(c)),
    p_t = softmax(z_t / T),  p_s = softmax(z_s / T).

  Equals RepDistiller ``DistillKL`` (kl_div summed, /batch, *T^2) and
  mdistiller ``kd_loss``.  Classes where the teacher probability underflows
  to 0 contribute 0 (``kl_div``'s xlogy convention); using log_softmax for the
  teacher keeps the log finite whenever the probability is not exactly 0.
  """
  s = _f32(student_logits) / temperature
  t = _f32(teacher_logits) / temperature
  log_ps = jax.nn.log_softmax(s, axis=-1)
  log_pt = jax.nn.log_softmax(t, axis=-1)
  per = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
  return jnp.mean(per) * (temperature ** 2)


def dkd_terms(student_logits, teacher_logits, labels, temperature: float = 4.0):
  """Return ``(tckd, nckd)`` of Decoupled KD (Zhao et al., CVPR 2022).

  TCKD: binary KL between [p(gt), 1 - p(gt)] of teacher and student.
  NCKD: KL between teacher and student distributions over the NON-target
  classes only, each renormalised among those classes.  Both are summed over
  their (2 or C-1) entries, averaged over the batch and multiplied by T^2,
  as in mdistiller/distillers/DKD.py.

  mdistiller removes the target class from the NCKD softmaxes by subtracting
  1000 from its (temperature-scaled) logit; in float32 that makes its
  probability exactly 0.  We mask it out exactly instead (-inf logit, term
  dropped), which agrees with the trick to float rounding but does not depend
  on the logit range.  The binary probabilities are formed in log space
  (log p_gt and logsumexp of the others) so a saturated student gives a finite
  value rather than log(0).
  """
  s = _f32(student_logits) / temperature
  t = _f32(teacher_logits) / temperature
  num_classes = s.shape[-1]
  gt = jax.nn.one_hot(jnp.asarray(labels), num_classes, dtype=jnp.bool_)

  def binary_log_probs(z):
    logp = jax.nn.log_softmax(z, axis=-1)
    log_gt = jnp.sum(jnp.where(gt, logp, 0.0), axis=-1)
    log_other = jax.nn.logsumexp(jnp.where(gt, -jnp.inf, logp), axis=-1)
    return jnp.stack([log_gt, log_other], axis=-1)

  log_bs = binary_log_probs(s)
  log_bt = binary_log_probs(t)
  tckd = jnp.sum(jnp.exp(log_bt) * (log_bt - log_bs), axis=-1)

  log_qs = jax.nn.log_softmax(jnp.where(gt, -jnp.inf, s), axis=-1)
  log_qt = jax.nn.log_softmax(jnp.where(gt, -jnp.inf, t), axis=-1)
  # Zero the masked entries before subtracting so no inf - inf is formed.
  log_qs = jnp.where(gt, 0.0, log_qs)
  log_qt = jnp.where(gt, 0.0, log_qt)
  qt = jnp.where(gt, 0.0, jnp.exp(log_qt))
  nckd = jnp.sum(qt * (log_qt - log_qs), axis=-1)

  scale = temperature ** 2
  return jnp.mean(tckd) * scale, jnp.mean(nckd) * scale


def dkd_loss(student_logits, teacher_logits, labels, alpha: float = 1.0,
       beta: float = 8.0, temperature: float = 4.0):
  """Decoupled KD (Zhao et al., CVPR 2022): ``alpha * TCKD + beta * NCKD``.

  Defaults are mdistiller's (cfg.DKD: ALPHA=1, BETA=8, T=4).  mdistiller's
  CIFAR-100 configs override beta per teacher/student pair (2.0 for
  res56/res20 and res110/res32; 6.0 for wrn40_2/wrn16_2, wrn40_2/wrn40_1,
  vgg13/vgg8, vgg13/MobileNetV2; 8.0 otherwise).  The warm-up factor
  ``min(epoch / 20, 1)`` is applied by the caller.  See ``dkd_terms``.
  """
  tckd, nckd = dkd_terms(student_logits, teacher_logits, labels, temperature)
  return alpha * tckd + beta * nckd


# ----------------------------------------------------------------------------
# Feature-map helpers
# ----------------------------------------------------------------------------

def _adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  # PyTorch bins: [floor(i*in/out), ceil((i+1)*in/out)); bins may overlap.
  m = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x, out_hw: tuple[int, int]):
  """``F.adaptive_avg_pool2d`` for NHWC maps, exact PyTorch bin boundaries.

  When the sizes divide this is plain non-overlapping average pooling; other
  sizes use PyTorch's (possibly overlapping) floor/ceil bins.
  """
  x = _f32(x)
  _, h, w, _ = x.shape
  oh, ow = int(out_hw[0]), int(out_hw[1])
  if (oh, ow) == (h, w):
    return x
  if h % oh == 0 and w % ow == 0:
    n, _, _, c = x.shape
    return x.reshape(n, oh, h // oh, ow, w // ow, c).mean(axis=(2, 4))
  ph = jnp.asarray(_adaptive_pool_matrix(h, oh))
  pw = jnp.asarray(_adaptive_pool_matrix(w, ow))
  x = jnp.einsum('oh,nhwc->nowc', ph, x, precision=_HIGHEST)
  return jnp.einsum('pw,nowc->nopc', pw, x, precision=_HIGHEST)


def align_spatial(f_s, f_t):
  """Average-pool the spatially larger of two NHWC maps to the other's size.

  RepDistiller/mdistiller/SimKD compare heights only and pool to a square
  ``(H, H)``; for square maps that is what this does.  For non-square maps the
  references would produce mismatched shapes, so we pool to the smaller map's
  full ``(H, W)``.  Returns float32 ``(f_s, f_t)``.
  """
  f_s, f_t = _f32(f_s), _f32(f_t)
  (sh, sw), (th, tw) = f_s.shape[1:3], f_t.shape[1:3]
  if (sh, sw) == (th, tw):
    return f_s, f_t
  if sh >= th and sw >= tw:
    return adaptive_avg_pool(f_s, (th, tw)), f_t
  if sh <= th and sw <= tw:
    return f_s, adaptive_avg_pool(f_t, (sh, sw))
  raise ValueError(f'cannot align spatial sizes {(sh, sw)} and {(th, tw)}: '
           'neither map is at least as large as the other in both dims')


# ----------------------------------------------------------------------------
# Feature losses
# ----------------------------------------------------------------------------

def hint_loss(student_feat, teacher_feat):
  """FitNets (Romero et al., ICLR 2015) hint loss: ``mean((f_s - f_t)^2)``.

  ``student_feat`` is the output of the regressor (ConvReg), already matching
  the teacher's shape.  ``nn.MSELoss()`` mean over all elements, as in
  RepDistiller distiller_zoo/FitNet.py.
  """
  d = _f32(student_feat) - _f32(teacher_feat)
  return jnp.mean(d * d)


fitnet_loss = hint_loss


def attention_map(f, p: int = 2):
  """AT map: ``normalize(mean_c f^p)`` flattened to ``(N, H*W)``.

  The channel mean is over the last (NHWC) axis; the flattening order (H then
  W) matches ``.view(N, -1)`` of PyTorch's ``(N, H, W)`` map.
  """
  f = _f32(f)
  a = jnp.mean(f ** p, axis=-1)
  return _torch_normalize(_flatten(a), axis=-1)


def at_loss(f_s, f_t, p: int = 2):
  """Attention Transfer (Zagoruyko & Komodakis, ICLR 2017), one pair of maps.

    L = mean((Q_s - Q_t)^2),  Q = normalize(mean_c f^p).flatten()

  mean over batch and H*W.  The larger map is adaptive-average-pooled to the
  smaller one first (RepDistiller distiller_zoo/AT.py, p=2).
  """
  f_s, f_t = align_spatial(f_s, f_t)
  d = attention_map(f_s, p) - attention_map(f_t, p)
  return jnp.mean(d * d)


def at_loss_multi(feats_s: Sequence, feats_t: Sequence, p: int = 2):
  """Sum of ``at_loss`` over pairs (RepDistiller sums its list; beta=1000 is
  applied by the caller)."""
  if len(feats_s) != len(feats_t):
    raise ValueError('feats_s and feats_t must have the same length')
  return sum(at_loss(a, b, p) for a, b in zip(feats_s, feats_t))


def sp_loss(f_s, f_t):
  """Similarity-Preserving KD (Tung & Mori, ICCV 2019), one pair.

    G = F F^T (F = feature flattened per sample), G <- row-L2-normalise(G),
    L = ||G_t - G_s||_F^2 / b^2.

  RepDistiller distiller_zoo/SP.py.  The Gram matrix does not depend on the
  order in which features are flattened, so NHWC input gives the same value.
  """
  b = f_s.shape[0]
  fs, ft = _flatten(_f32(f_s)), _flatten(_f32(f_t))
  gs = _torch_normalize(jnp.matmul(fs, fs.T, precision=_HIGHEST), axis=1)
  gt = _torch_normalize(jnp.matmul(ft, ft.T, precision=_HIGHEST), axis=1)
  d = gt - gs
  return jnp.sum(d * d) / (b * b)


def sp_loss_multi(feats_s: Sequence, feats_t: Sequence):
  """Sum of ``sp_loss`` over pairs (the reference returns a list that the
  training loop sums; RepDistiller uses the single pair feat[-2])."""
  if len(feats_s) != len(feats_t):
    raise ValueError('feats_s and feats_t must have the same length')
  return sum(sp_loss(a, b) for a, b in zip(feats_s, feats_t))


def rkd_pdist(e, squared: bool = False, eps: float = 1e-12):
  """Pairwise Euclidean distances as in RKD's ``pdist``.

  ``|a|^2 + |b|^2 - 2 a.b`` clamped below at ``eps`` (before the square
  root), diagonal set to exactly 0.
  """
  e = _f32(e)
  sq = jnp.sum(e * e, axis=1)
  prod = jnp.matmul(e, e.T, precision=_HIGHEST)
  res = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * prod, eps)
  if not squared:
    res = jnp.sqrt(res)
  return jnp.where(jnp.eye(e.shape[0], dtype=jnp.bool_), 0.0, res)


def _mean_positive(d):
  pos = d > 0
  return jnp.sum(jnp.where(pos, d, 0.0)) / jnp.sum(pos)


def _rkd_angles(e):
  # diff[i, j] = e[j] - e[i] (the reference's unsqueeze(0) - unsqueeze(1)).
  diff = e[None, :, :] - e[:, None, :]
  u = _torch_normalize(diff, axis=-1)
  return jnp.einsum('ijd,ikd->ijk', u, u, precision=_HIGHEST).reshape(-1)


def rkd_loss(f_s, f_t, distance_weight: float = 25.0, angle_weight: float = 50.0,
       squared: bool = False, eps: float = 1e-12):
  """Relational KD (Park et al., CVPR 2019).

    psi_D(i,j) = ||e_i - e_j|| / mu,  mu = mean of the positive distances
           (all off-diagonal pairs) in the batch
    psi_A(i,j,k) = <(e_j - e_i)/||.||, (e_k - e_i)/||.||>
    L = w_d * smoothL1(psi_D^s, psi_D^t) + w_a * smoothL1(psi_A^s, psi_A^t)

  smooth-L1 with beta=1 averaged over all b^2 (resp. b^3) entries, diagonal
  included.  Defaults w_d=25, w_a=50, pdist eps=1e-12, not squared
  (RepDistiller distiller_zoo/RKD.py; mdistiller RKD.py / cfg.RKD).  The
  references feed the pooled embedding (``feat[-1]`` / ``pooled_feat``);
  inputs are flattened per sample.  Teacher relations are stop-gradient'ed,
  as the reference computes them under ``torch.no_grad()``.
  """
  s = _flatten(_f32(f_s))
  t = jax.lax.stop_gradient(_flatten(_f32(f_t)))

  t_d = rkd_pdist(t, squared, eps)
  t_d = t_d / _mean_positive(t_d)
  d = rkd_pdist(s, squared, eps)
  d = d / _mean_positive(d)
  loss_d = _smooth_l1(d, t_d)

  loss_a = _smooth_l1(_rkd_angles(s), _rkd_angles(t))
  return distance_weight * loss_d + angle_weight * loss_a


def pkt_loss(f_s, f_t, eps: float = 1e-7):
  """Probabilistic Knowledge Transfer (Passalis & Tefas, ECCV 2018).

    x <- x / (||x|| + eps)  (NaN -> 0),  K = (x x^T + 1) / 2,
    P = K / rowsum(K),
    L = mean_{i,j} P_t * log((P_t + eps) / (P_s + eps))

  over all b^2 entries, exactly as RepDistiller distiller_zoo/PKT.py
  (``cosine_similarity_loss``).  Inputs are flattened per sample (the
  references pass the pooled embedding).
  """
  def kernel(x):
    x = _flatten(_f32(x))
    x = x / (_safe_norm(x, axis=1) + eps)
    x = jnp.where(jnp.isnan(x), 0.0, x)
    k = (jnp.matmul(x, x.T, precision=_HIGHEST) + 1.0) / 2.0
    return k / jnp.sum(k, axis=1, keepdims=True)

  ps, pt = kernel(f_s), kernel(f_t)
  return jnp.mean(pt * jnp.log((pt + eps) / (ps + eps)))


def vid_log_scale_init(init_pred_var: float = 5.0, eps: float = 1e-5) -> float:
  """Initial value of VID's per-channel ``log_scale`` so that
  ``softplus(log_scale) + eps == init_pred_var`` (RepDistiller VID.py)."""
  return float(np.log(np.exp(init_pred_var - eps) - 1.0))


def vid_loss(pred_mean, log_scale, target, eps: float = 1e-5):
  """Variational Information Distillation (Ahn et al., CVPR 2019).

    var_c = softplus(log_scale_c) + eps        (per channel)
    L = mean_{n,h,w,c} 0.5 * ((mu - t)^2 / var_c + log var_c)

  ``pred_mean`` is the student regressor's output (NHWC, same shape as
  ``target``); ``log_scale`` has shape ``(C,)`` and broadcasts over the last
  axis (the reference's ``view(1, -1, 1, 1)`` in NCHW).  Spatial pooling of the
  inputs before the regressor is the caller's job (``align_spatial``).
  RepDistiller distiller_zoo/VID.py; ``log(1 + exp(x))`` is evaluated as the
  numerically stable softplus.
  """
  mu, tgt = _f32(pred_mean), _f32(target)
  var = jax.nn.softplus(_f32(log_scale)) + eps
  d = mu - tgt
  return jnp.mean(0.5 * (d * d / var + jnp.log(var)))


# ----------------------------------------------------------------------------
# CRD (Tian et al., ICLR 2020): pure pieces of ContrastMemory + ContrastLoss
# ----------------------------------------------------------------------------

def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
  """``x / ||x||`` along ``axis`` (CRD's Normalize layer after the Linear of
  the embed head).  The reference divides without an epsilon; ``eps`` only
  matters for norms below 1e-12, where the reference would return inf/NaN."""
  return _torch_normalize(_f32(x), axis=axis, eps=eps)


def crd_memory_init(key, n_data: int, feat_dim: int = 128):
  """A memory bank initialised as in crd/memory.py: U(-stdv, stdv) with
  ``stdv = 1 / sqrt(feat_dim / 3)`` (rows are not normalised initially).
  CRD keeps two banks (student and teacher): call this twice."""
  stdv = 1.0 / np.sqrt(feat_dim / 3.0)
  return jax.random.uniform(key, (n_data, feat_dim), jnp.float32, -stdv, stdv)


def crd_sample_indices(key, pos_idx, n_data: int, nce_k: int = 16384):
  """``(B, K+1)`` memory indices: column 0 the positive (the sample's own
  dataset index), columns 1..K drawn uniformly from ``[0, n_data)``.

  This is ContrastMemory's fallback when no ``contrast_idx`` is given (its
  AliasMethod over uniform unigrams is uniform sampling).  RepDistiller's
  default 'exact' mode instead takes negatives from other classes in the data
  loader; pass such indices to ``crd_scores`` directly.
  """
  pos_idx = jnp.asarray(pos_idx)
  neg = jax.random.randint(key, (pos_idx.shape[0], nce_k), 0, n_data, dtype=pos_idx.dtype)
  return jnp.concatenate([pos_idx[:, None], neg], axis=1)


def crd_scores(anchor, memory, sample_idx, z, temperature: float = 0.07):
  """Normalised NCE scores of ``anchor`` against sampled memory rows.

    out[b, k] = exp(<memory[sample_idx[b, k]], anchor[b]> / T) / Z

  ``anchor``: ``(B, D)`` L2-normalised embedding; ``memory``: ``(n_data, D)``
  bank of the OTHER network (student anchor -> teacher bank and vice versa);
  ``sample_idx``: ``(B, K+1)`` with the positive in column 0.

  Z is the constant of crd/memory.py: while unset (``z <= 0``; the reference
  stores -1) it is estimated from this batch as ``mean(exp(.)) * n_data`` and
  then kept fixed for the rest of training.  Returns ``(out, z_new)``; store
  ``z_new`` as the state.  Memory rows and Z carry no gradient (the reference
  detaches the rows and uses ``Z.item()``).
  """
  anchor = _f32(anchor)
  memory = jax.lax.stop_gradient(_f32(memory))
  n_data = memory.shape[0]
  weights = jnp.take(memory, sample_idx, axis=0)  # (B, K+1, D)
  out = jnp.exp(jnp.einsum('bkd,bd->bk', weights, anchor, precision=_HIGHEST) / temperature)
  z = jnp.asarray(z, jnp.float32)
  z_est = jax.lax.stop_gradient(jnp.mean(out) * n_data)
  z_new = jnp.where(z > 0, z, z_est)
  return out / z_new, z_new


def crd_nce_loss(x, n_data: int, eps: float = 1e-7):
  """CRD's NCE objective (ContrastLoss in crd/criterion.py, Eq. 18).

    m = K, Pn = 1 / n_data,
    L = -[ sum_b log(x_b0 / (x_b0 + m Pn + eps))
        + sum_{b,k>=1} log(m Pn / (x_bk + m Pn + eps)) ] / B

  ``x``: ``(B, K+1)`` output of ``crd_scores`` (positive in column 0).
  """
  x = _f32(x)
  bsz = x.shape[0]
  m = x.shape[1] - 1
  mpn = m * (1.0 / float(n_data))
  pos = x[:, 0]
  neg = x[:, 1:]
  log_d1 = jnp.log(pos / (pos + mpn + eps))
  log_d0 = jnp.log(mpn / (neg + mpn + eps))
  return -(jnp.sum(log_d1) + jnp.sum(log_d0)) / bsz


def crd_memory_update(memory, embedding, idx, momentum: float = 0.5):
  """Momentum update of the rows ``idx`` of a CRD memory bank.

    row <- momentum * row + (1 - momentum) * embedding;  row <- row / ||row||

  scattered back at ``idx`` (crd/memory.py, under ``no_grad``; a row whose
  norm is below 1e-12 is left near 0 instead of becoming NaN).  Indices in a
  batch are expected to be distinct (dataset indices); with duplicates one of
  the updates wins, as with ``index_copy_``.  Returns the new bank.
  """
  memory = jax.lax.stop_gradient(jnp.asarray(memory))
  emb = jax.lax.stop_gradient(_f32(embedding))
  rows = jnp.take(memory, idx, axis=0).astype(jnp.float32)
  rows = rows * momentum + emb * (1.0 - momentum)
  # The reference divides by the bare norm; the 1e-12 floor only keeps a row
  # that cancels to exactly 0 from turning into NaN and poisoning the bank.
  rows = _torch_normalize(rows, axis=1)
  return memory.at[idx].set(rows.astype(memory.dtype))


def crd_loss(embed_s, embed_t, memory_s, memory_t, idx, sample_idx, z_s, z_t,
       temperature: float = 0.07, momentum: float = 0.5):
  """CRD loss (CRDLoss.forward without the embed heads) and the new state.

  ``embed_s`` / ``embed_t``: L2-normalised ``(B, feat_dim)`` embeddings of the
  student and teacher heads.  ``memory_s`` / ``memory_t``: the banks holding
  past student / teacher embeddings (the reference's memory_v1 / memory_v2).
  ``idx``: ``(B,)`` dataset indices; ``sample_idx``: ``(B, K+1)`` with
  ``sample_idx[:, 0] == idx``.  ``z_s`` / ``z_t``: normalisation constants
  (``<= 0`` while unset) for the student-anchored and teacher-anchored scores.

  Student anchor vs teacher bank and teacher anchor vs student bank, NCE on
  each, summed.  Scores use the banks before this batch's update, like the
  reference.  Returns ``(loss, (memory_s, memory_t, z_s, z_t))``.
  Defaults: nce_t=0.07, nce_m=0.5 (RepDistiller train_student.py; feat_dim=128
  and nce_k=16384 are set by the caller through the shapes).
  """
  n_data = memory_s.shape[0]
  out_s, z_s = crd_scores(embed_s, memory_t, sample_idx, z_s, temperature)
  out_t, z_t = crd_scores(embed_t, memory_s, sample_idx, z_t, temperature)
  loss = crd_nce_loss(out_s, n_data) + crd_nce_loss(out_t, n_data)
  memory_s = crd_memory_update(memory_s, embed_s, idx, momentum)
  memory_t = crd_memory_update(memory_t, embed_t, idx, momentum)
  return loss, (memory_s, memory_t, z_s, z_t)


# ----------------------------------------------------------------------------
# SimKD
# ----------------------------------------------------------------------------

def simkd_loss(projected_student_feat, teacher_feat):
  """SimKD (Chen et al., CVPR 2022) feature loss: ``nn.MSELoss()`` (mean over
  all elements) between the projector's output and the teacher's last feature
  map, after spatial alignment (DefangChen/SimKD models/util.py SimKD,
  train_student.py criterion_kd = MSELoss)."""
  return hint_loss(projected_student_feat, teacher_feat)


# ----------------------------------------------------------------------------
# Subclass distillation (Müller, Kornblith & Hinton, 2020)
# ----------------------------------------------------------------------------

def subclass_to_class_logits(subclass_logits, num_classes: int):
  """Class logits = logsumexp over each class's subclasses.

  Layout: with ``S = num_subclasses // num_classes``, class ``c`` owns
  subclass columns ``c*S .. c*S + S - 1`` (a reshape to ``(B, C, S)``, as in
  the authors' ``class_logits_from_subclass_logits``).  softmax of the result
  equals the subclass softmax summed within each class.
  """
  z = _f32(subclass_logits)
  n = z.shape[-1]
  if n % num_classes != 0:
    raise ValueError(f'{n} subclass logits is not a multiple of {num_classes} classes')
  z = z.reshape(z.shape[:-1] + (num_classes, n // num_classes))
  return jax.nn.logsumexp(z, axis=-1)


def subclass_aux_loss(subclass_logits, temperature: float = 1.0,
           normalize_over: str = 'example', epsilon: float = 1e-9):
  """Auxiliary loss that makes the teacher spread examples over subclasses.

  Source: the authors' code, google-research/google-research
  subclass_distillation/mnist_colab.ipynb (``negative_sampling_loss``); the
  paper's full text was not available to us.  With ``n`` subclass logits and
  batch size ``B``:

  ``normalize_over='example'`` (default, the authors' code): each example's
  logit vector is standardised over its own ``n`` entries (population
  variance, + epsilon) and scaled by ``1/sqrt(n)``, giving ``v_i`` with
  ``|v_i| ~= 1``; then

    L = mean_i logsumexp_j(v_i . v_j / T) - 1/T - log B

  i.e. a contrastive loss whose positive term ``v_i.v_i/T`` is taken as the
  constant ``1/T``.  A collapsed batch (all ``v_i`` equal) gives L = 0; the
  more the examples' subclass patterns differ, the more negative L gets.
  (The authors can gather the logits of all TPU replicas first; this
  function sees only the batch it is given.)

  ``normalize_over='batch'``: the paper's formula as summarised in the project
  spec (not checked against the paper's text): each logit dimension
  standardised over the batch, ``/sqrt(n)``, and

    L = -mean_i log( exp(v_i.v_i/T) / sum_j exp(v_i.v_j/T) )

  (exact diagonal, no ``log B`` offset).  The two agree up to the
  normalisation axis and additive constants.
  """
  z = _f32(subclass_logits)
  bsz, n = z.shape
  if normalize_over == 'example':
    axis = -1
  elif normalize_over == 'batch':
    axis = 0
  else:
    raise ValueError("normalize_over must be 'example' or 'batch'")
  mean = jnp.mean(z, axis=axis, keepdims=True)
  var = jnp.mean(jnp.square(z - mean), axis=axis, keepdims=True)
  v = (z - mean) * jax.lax.rsqrt(var + epsilon) / np.sqrt(n)
  logits = jnp.matmul(v, v.T, precision=_HIGHEST) / temperature
  lse = jax.nn.logsumexp(logits, axis=-1)
  if normalize_over == 'example':
    return jnp.mean(lse) - 1.0 / temperature - np.log(bsz)
  return jnp.mean(lse - jnp.diagonal(logits))
