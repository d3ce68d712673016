"""kdjax.losses against independent float64 NumPy re-implementations.

The NumPy references below are written in the references' own layout (NCHW:
inputs are transposed from NHWC first), following the PyTorch code of
RepDistiller / mdistiller / SimKD line by line, so that an axis mistake in the
NHWC port shows up as a mismatch.  JAX runs in float32, hence rtol ~1e-5.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses as L

RTOL = 2e-5
ATOL = 1e-6


def close(actual, expected, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def rand(rng, *shape, scale=1.0):
  # float32-representable values so JAX and NumPy see identical inputs.
  return (rng.standard_normal(shape) * scale).astype(np.float32)


def nchw(x):
  return np.transpose(np.asarray(x, np.float64), (0, 3, 1, 2))


# Jitted entry points, shared by all tests so each shape compiles once.
J = {
  'ce': jax.jit(L.cross_entropy, static_argnames='label_smoothing'),
  'kd': jax.jit(L.kd_loss),
  'dkd_terms': jax.jit(L.dkd_terms),
  'dkd': jax.jit(L.dkd_loss),
  'dkd_grad': jax.jit(jax.grad(L.dkd_loss)),
  'hint': jax.jit(L.hint_loss),
  'pool': jax.jit(L.adaptive_avg_pool, static_argnames='out_hw'),
  'align': jax.jit(L.align_spatial),
  'at': jax.jit(L.at_loss),
  'at_multi': jax.jit(L.at_loss_multi),
  'sp': jax.jit(L.sp_loss),
  'sp_multi': jax.jit(L.sp_loss_multi),
  'rkd': jax.jit(L.rkd_loss),
  'pdist': jax.jit(L.rkd_pdist),
  'pkt': jax.jit(L.pkt_loss),
  'vid': jax.jit(L.vid_loss),
  'crd_scores': jax.jit(L.crd_scores),
  'crd_nce': jax.jit(L.crd_nce_loss, static_argnames='n_data'),
  'crd_update': jax.jit(L.crd_memory_update, static_argnames='momentum'),
  'crd_loss': jax.jit(L.crd_loss),
  'crd_init': jax.jit(L.crd_memory_init, static_argnums=(1, 2)),
  'crd_sample': jax.jit(L.crd_sample_indices, static_argnums=(2, 3)),
  'l2n': jax.jit(L.l2_normalize),
  'simkd': jax.jit(L.simkd_loss),
  'sub_cls': jax.jit(L.subclass_to_class_logits, static_argnames='num_classes'),
  'sub_aux': jax.jit(L.subclass_aux_loss, static_argnames='normalize_over'),
}


# ----------------------------------------------------------------------------
# NumPy references (float64, NCHW, written from the PyTorch code)
# ----------------------------------------------------------------------------

def np_log_softmax(x, axis=1):
  m = np.max(x, axis=axis, keepdims=True)
  return x - m - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def np_softmax(x, axis=1):
  return np.exp(np_log_softmax(x, axis))


def np_kl_div_sum(log_input, target):
  """torch F.kl_div(input, target, reduction='sum') with its xlogy(0, 0) = 0."""
  with np.errstate(divide='ignore', invalid='ignore'):
    terms = np.where(target > 0, target * (np.log(np.where(target > 0, target, 1.0)) - log_input), 0.0)
  return terms.sum()


def np_ce(logits, labels, ls=0.0):
  logits = np.asarray(logits, np.float64)
  c = logits.shape[1]
  tgt = np.full(logits.shape, ls / c)
  tgt[np.arange(len(labels)), labels] += 1.0 - ls
  return -(tgt * np_log_softmax(logits)).sum(1).mean()


def np_kd(s, t, T):
  s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
  return np_kl_div_sum(np_log_softmax(s / T), np_softmax(t / T)) * T ** 2 / s.shape[0]


def np_dkd_terms(s, t, y, T):
  # mdistiller DKD.py including the -1000 * gt_mask trick.
  s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
  gt = np.zeros_like(s)
  gt[np.arange(len(y)), y] = 1.0
  other = 1.0 - gt
  ps, pt = np_softmax(s / T), np_softmax(t / T)
  cat = lambda p: np.stack([(p * gt).sum(1), (p * other).sum(1)], 1)
  bs, bt = cat(ps), cat(pt)
  tckd = np_kl_div_sum(np.log(bs), bt) * T ** 2 / len(y)
  pt2 = np_softmax(t / T - 1000.0 * gt)
  lps2 = np_log_softmax(s / T - 1000.0 * gt)
  nckd = np_kl_div_sum(lps2, pt2) * T ** 2 / len(y)
  return tckd, nckd


def np_adaptive_pool(x, oh, ow):
  # NCHW, PyTorch bins [floor(i*in/out), ceil((i+1)*in/out)).
  n, c, h, w = x.shape
  out = np.zeros((n, c, oh, ow))
  for i in range(oh):
    h0, h1 = (i * h) // oh, math.ceil((i + 1) * h / oh)
    for j in range(ow):
      w0, w1 = (j * w) // ow, math.ceil((j + 1) * w / ow)
      out[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
  return out


def np_align(fs, ft):
  # The references compare H; for our non-square cases pool to the other's (H, W).
  if fs.shape[2] > ft.shape[2]:
    fs = np_adaptive_pool(fs, ft.shape[2], ft.shape[3])
  elif fs.shape[2] < ft.shape[2]:
    ft = np_adaptive_pool(ft, fs.shape[2], fs.shape[3])
  return fs, ft


def np_normalize(x, axis=1, eps=1e-12):
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), eps)


def np_at(fs, ft, p=2):
  fs, ft = np_align(fs, ft)
  at = lambda f: np_normalize((f ** p).mean(1).reshape(f.shape[0], -1))
  return ((at(fs) - at(ft)) ** 2).mean()


def np_sp(fs, ft):
  b = fs.shape[0]
  fs, ft = fs.reshape(b, -1), ft.reshape(b, -1)
  gs, gt = np_normalize(fs @ fs.T), np_normalize(ft @ ft.T)
  return ((gt - gs) ** 2).sum() / (b * b)


def np_pdist(e, squared=False, eps=1e-12):
  sq = (e ** 2).sum(1)
  res = np.maximum(sq[:, None] + sq[None, :] - 2 * e @ e.T, eps)
  if not squared:
    res = np.sqrt(res)
  res = res.copy()
  res[np.arange(len(e)), np.arange(len(e))] = 0
  return res


def np_smooth_l1(a, b):
  d = np.abs(a - b)
  return np.where(d < 1, 0.5 * d ** 2, d - 0.5).mean()


def np_rkd(fs, ft, wd=25.0, wa=50.0):
  s, t = fs.reshape(fs.shape[0], -1), ft.reshape(ft.shape[0], -1)
  td = np_pdist(t)
  td = td / td[td > 0].mean()
  d = np_pdist(s)
  d = d / d[d > 0].mean()
  loss_d = np_smooth_l1(d, td)

  def angles(e):
    n = len(e)
    out = np.zeros((n, n, n))
    for i in range(n):
      u = np_normalize(e - e[i], axis=1)  # rows e[j] - e[i]
      out[i] = u @ u.T
    return out.reshape(-1)

  loss_a = np_smooth_l1(angles(s), angles(t))
  return wd * loss_d + wa * loss_a


def np_pkt(fs, ft, eps=1e-7):
  def prob(x):
    x = x.reshape(x.shape[0], -1)
    x = x / (np.sqrt((x ** 2).sum(1, keepdims=True)) + eps)
    x[np.isnan(x)] = 0
    k = (x @ x.T + 1.0) / 2.0
    return k / k.sum(1, keepdims=True)

  ps, pt = prob(fs), prob(ft)
  return (pt * np.log((pt + eps) / (ps + eps))).mean()


def np_vid(pred_nchw, log_scale, target_nchw, eps=1e-5):
  var = np.log(1.0 + np.exp(log_scale)) + eps
  var = var.reshape(1, -1, 1, 1)
  return (0.5 * ((pred_nchw - target_nchw) ** 2 / var + np.log(var))).mean()


def np_crd_scores(anchor, memory, idx, z, T):
  out = np.zeros(idx.shape)
  for b in range(idx.shape[0]):
    for k in range(idx.shape[1]):
      out[b, k] = np.exp(memory[idx[b, k]] @ anchor[b] / T)
  if z < 0:
    z = out.mean() * memory.shape[0]
  return out / z, z


def np_crd_nce(x, n_data, eps=1e-7):
  bsz, m = x.shape[0], x.shape[1] - 1
  pn = 1.0 / n_data
  log_d1 = np.log(x[:, 0] / (x[:, 0] + m * pn + eps))
  log_d0 = np.log(np.full_like(x[:, 1:], m * pn) / (x[:, 1:] + m * pn + eps))
  return -(log_d1.sum() + log_d0.sum()) / bsz


def np_crd_update(memory, emb, idx, mom):
  memory = memory.copy()
  for b, i in enumerate(idx):
    row = memory[i] * mom + emb[b] * (1 - mom)
    memory[i] = row / np.sqrt((row ** 2).sum())
  return memory


def np_subclass_aux(z, T, mode, eps=1e-9):
  z = np.asarray(z, np.float64)
  b, n = z.shape
  if mode == 'example':
    mean, var = z.mean(1, keepdims=True), z.var(1, keepdims=True)
    v = (z - mean) / np.sqrt(var + eps) / np.sqrt(T * n)
    corr = v @ v.T
    lse = np.log(np.exp(corr).sum(1))
    return lse.mean() - 1.0 / T - np.log(b)
  mean, var = z.mean(0, keepdims=True), z.var(0, keepdims=True)
  v = (z - mean) / np.sqrt(var + eps) / np.sqrt(n)
  logits = v @ v.T / T
  return -np.mean(np.diag(logits) - np.log(np.exp(logits).sum(1)))


# ----------------------------------------------------------------------------
# Logit losses
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('b,c', [(2, 5), (7, 100)])
@pytest.mark.parametrize('ls', [0.0, 0.1])
def test_cross_entropy(b, c, ls):
  rng = np.random.default_rng(b * c)
  logits = rand(rng, b, c, scale=3)
  y = rng.integers(0, c, b)
  close(J['ce'](logits, y, label_smoothing=ls), np_ce(logits, y, ls))


@pytest.mark.parametrize('b,c,T', [(2, 3, 1.0), (8, 100, 4.0), (5, 10, 2.5)])
def test_kd_matches_reference(b, c, T):
  rng = np.random.default_rng(c)
  s, t = rand(rng, b, c, scale=3), rand(rng, b, c, scale=3)
  close(J['kd'](s, t, temperature=T), np_kd(s, t, T))


def test_kd_special_values():
  rng = np.random.default_rng(0)
  x = rand(rng, 4, 10, scale=5)
  assert abs(float(J['kd'](x, x, temperature=4.0))) < 1e-6
  # Hand-derived: s uniform over 2 classes, teacher probs (3/4, 1/4) at T=1.
  s = np.zeros((1, 2), np.float32)
  t = np.array([[np.log(3.0), 0.0]], np.float32)
  expect = 0.75 * np.log(0.75 / 0.5) + 0.25 * np.log(0.25 / 0.5)
  close(J['kd'](s, t, temperature=1.0), expect)
  # At T=2 the teacher is softmax([log3/2, 0]) and the result is scaled by T^2 = 4.
  p = np.sqrt(3.0) / (1.0 + np.sqrt(3.0))
  expect2 = 4.0 * (p * np.log(p / 0.5) + (1 - p) * np.log((1 - p) / 0.5))
  close(J['kd'](s, t, temperature=2.0), expect2)
  # T^2 scaling: kd(T*s, T*t; T) == T^2 * kd(s, t; 1).
  a, b = rand(rng, 3, 7), rand(rng, 3, 7)
  close(J['kd'](a * 3, b * 3, temperature=3.0), 9.0 * float(J['kd'](a, b, temperature=1.0)), rtol=1e-5)


@pytest.mark.parametrize('b,c,T', [(2, 3, 4.0), (16, 100, 4.0), (6, 10, 1.0)])
def test_dkd_matches_mdistiller(b, c, T):
  rng = np.random.default_rng(b + c)
  s, t = rand(rng, b, c, scale=3), rand(rng, b, c, scale=3)
  y = rng.integers(0, c, b)
  tckd, nckd = J['dkd_terms'](s, t, y, temperature=T)
  ref_t, ref_n = np_dkd_terms(s, t, y, T)
  close(tckd, ref_t)
  close(nckd, ref_n)
  close(J['dkd'](s, t, y, alpha=1.0, beta=8.0, temperature=T), ref_t + 8.0 * ref_n)
  close(J['dkd'](s, t, y, alpha=0.5, beta=2.0, temperature=T), 0.5 * ref_t + 2.0 * ref_n)


def test_dkd_special_values_and_masking():
  rng = np.random.default_rng(1)
  b, c = 4, 10
  s, t = rand(rng, b, c, scale=3), rand(rng, b, c, scale=3)
  y = rng.integers(0, c, b)
  assert abs(float(J['dkd'](s, s, y, alpha=1.0, beta=8.0, temperature=4.0))) < 1e-6
  tckd0, nckd0 = J['dkd_terms'](s, t, y, temperature=4.0)
  # Changing only the target-class logit of the teacher (or the student)
  # changes TCKD but leaves NCKD untouched: the target class is masked out.
  rows = np.arange(b)
  for arr_name in ('teacher', 'student'):
    s2, t2 = s.copy(), t.copy()
    (t2 if arr_name == 'teacher' else s2)[rows, y] += 5.0
    tckd1, nckd1 = J['dkd_terms'](s2, t2, y, temperature=4.0)
    close(nckd1, float(nckd0), rtol=1e-5)
    assert abs(float(tckd1) - float(tckd0)) > 1e-3
  # Changing a non-target logit changes NCKD.
  t3 = t.copy()
  t3[rows, (y + 1) % c] += 2.0
  assert abs(float(J['dkd_terms'](s, t3, y, temperature=4.0)[1]) - float(nckd0)) > 1e-4
  # The paper's decomposition (one sample): KD = TCKD + (1 - p_t^gt) * NCKD.
  T = 4.0
  s1, t1, y1 = s[:1], t[:1], y[:1]
  tk, nk = J['dkd_terms'](s1, t1, y1, temperature=T)
  pt_gt = np_softmax(t1.astype(np.float64) / T)[0, y1[0]]
  close(J['kd'](s1, t1, temperature=T), float(tk) + (1 - pt_gt) * float(nk), rtol=1e-5)


def test_dkd_saturated_logits_finite():
  # Student/teacher logit gaps far beyond the -1000 trick's comfortable range.
  s = np.array([[400.0, -400.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
  t = np.array([[-400.0, 400.0, 10.0], [5.0, -5.0, 0.0]], np.float32)
  y = np.array([0, 1])
  val = J['dkd'](s, t, y, alpha=1.0, beta=8.0, temperature=1.0)
  assert np.isfinite(float(val))
  g = J['dkd_grad'](s, t, y, 1.0, 8.0, 1.0)
  assert np.all(np.isfinite(np.asarray(g)))


# ----------------------------------------------------------------------------
# Spatial alignment
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('hw,out', [((8, 8), (4, 4)), ((6, 6), (4, 4)), ((7, 5), (3, 2)), ((8, 6), (4, 3))])
def test_adaptive_avg_pool(hw, out):
  rng = np.random.default_rng(hw[0] * 10 + hw[1])
  x = rand(rng, 2, hw[0], hw[1], 3)
  got = np.transpose(np.asarray(J['pool'](x, out_hw=out)), (0, 3, 1, 2))
  close(got, np_adaptive_pool(nchw(x), *out))


def test_align_spatial():
  rng = np.random.default_rng(3)
  a, b = rand(rng, 2, 8, 8, 3), rand(rng, 2, 4, 4, 5)
  pa, pb = J['align'](a, b)
  assert pa.shape == (2, 4, 4, 3) and pb.shape == (2, 4, 4, 5)
  pb2, pa2 = J['align'](b, a)
  assert pa2.shape == (2, 4, 4, 3)
  close(pa2, np.asarray(pa))
  with pytest.raises(ValueError):
    J['align'](rand(rng, 1, 8, 2, 1), rand(rng, 1, 4, 4, 1))


# ----------------------------------------------------------------------------
# Feature losses
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('shape', [(2, 4, 4, 3), (3, 5, 7, 8)])
def test_hint_and_simkd(shape):
  rng = np.random.default_rng(sum(shape))
  s, t = rand(rng, *shape), rand(rng, *shape)
  ref = ((nchw(s) - nchw(t)) ** 2).mean()
  close(J['hint'](s, t), ref)
  close(J['simkd'](s, t), ref)
  assert L.fitnet_loss is L.hint_loss
  # Hand-derived: a constant offset of 0.5 gives 0.25.
  close(J['hint'](s, s + np.float32(0.5)), 0.25)


AT_SHAPES = [
  ((2, 8, 8, 4), (2, 8, 8, 6)),    # same size
  ((2, 8, 8, 4), (2, 4, 4, 6)),    # student larger: pool student
  ((3, 4, 4, 4), (3, 8, 8, 2)),    # teacher larger: pool teacher
  ((2, 6, 6, 3), (2, 4, 4, 5)),    # non-divisible adaptive pooling
  ((2, 8, 6, 3), (2, 4, 3, 5)),    # non-square
]


@pytest.mark.parametrize('ss,ts', AT_SHAPES)
def test_at_matches_reference(ss, ts):
  rng = np.random.default_rng(sum(ss) + sum(ts))
  s, t = rand(rng, *ss), rand(rng, *ts)
  close(J['at'](s, t), np_at(nchw(s), nchw(t)))


def test_at_multi_and_special_values():
  rng = np.random.default_rng(5)
  pairs = [(rand(rng, *a), rand(rng, *b)) for a, b in AT_SHAPES[:3]]
  ref = sum(np_at(nchw(a), nchw(b)) for a, b in pairs)
  close(J['at_multi']([p[0] for p in pairs], [p[1] for p in pairs]), ref)
  f = rand(rng, 2, 4, 4, 3)
  assert abs(float(J['at'](f, f))) < 1e-12
  # Positive rescaling and channel permutation do not change the attention map.
  assert float(J['at'](f, 3.0 * f[..., ::-1])) < 1e-12
  # Hand-derived: batch 1, 1x2 maps, one channel [1, 0] vs [0, 1]:
  # normalised maps [1, 0] and [0, 1] -> mean of squared diffs = (1 + 1) / 2.
  a = np.array([1.0, 0.0], np.float32).reshape(1, 1, 2, 1)
  close(J['at'](a, a[:, :, ::-1]), 1.0)


@pytest.mark.parametrize('ss,ts', [((2, 4, 4, 3), (2, 4, 4, 5)), ((6, 3, 5, 4), (6, 2, 2, 7)), ((5, 16), (5, 8))])
def test_sp_matches_reference(ss, ts):
  rng = np.random.default_rng(sum(ss))
  s, t = rand(rng, *ss), rand(rng, *ts)
  to_ref = nchw if len(ss) == 4 else (lambda x: np.asarray(x, np.float64))
  close(J['sp'](s, t), np_sp(to_ref(s), to_ref(t)))


def test_sp_special_values():
  rng = np.random.default_rng(6)
  f = rand(rng, 4, 3, 3, 2)
  assert abs(float(J['sp'](f, f))) < 1e-12
  close(J['sp'](f, 2.0 * f), 0.0)
  # Hand-derived, b=2: student rows orthogonal -> G_s = diag, normalised to I;
  # teacher rows equal -> G_t normalised to all 1/sqrt(2).
  # ||G_t - G_s||^2 = 2 (1/sqrt2 - 1)^2 + 2 (1/sqrt2)^2; divided by b^2 = 4.
  s = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
  t = np.array([[1.0, 1.0], [1.0, 1.0]], np.float32)
  r = 1 / np.sqrt(2)
  close(J['sp'](s, t), (2 * (r - 1) ** 2 + 2 * r ** 2) / 4)
  close(J['sp_multi']([s, f], [t, f]), float(J['sp'](s, t)), atol=1e-7)


@pytest.mark.parametrize('b,ds,dt', [(2, 5, 7), (6, 8, 8), (9, 16, 4)])
def test_rkd_matches_reference(b, ds, dt):
  rng = np.random.default_rng(b * ds)
  s, t = rand(rng, b, ds), rand(rng, b, dt, scale=2.0)
  close(J['rkd'](s, t), np_rkd(np.float64(s), np.float64(t)), rtol=5e-5)
  # Weights are plain multipliers of the distance and angle terms.
  close(J['rkd'](s, t, 1.0, 0.0), np_rkd(np.float64(s), np.float64(t), 1.0, 0.0), rtol=5e-5)


def test_rkd_special_values():
  rng = np.random.default_rng(7)
  f = rand(rng, 5, 6)
  assert float(J['rkd'](f, f)) < 1e-8
  # Distances are divided by their mean and angles are scale-free.
  assert float(J['rkd'](f, 3.0 * f + 0.0)) < 1e-8
  # pdist: diagonal exactly 0, off-diagonal the Euclidean distance, and the
  # mean used for normalisation is over off-diagonal pairs only.
  e = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0]], np.float32)
  d = np.asarray(J['pdist'](e))
  close(d, [[0, 5, 4], [5, 0, 3], [4, 3, 0]])
  # Hand-derived distance term: student triangle (3,4,5) vs teacher equilateral.
  # normalised student distances = d / 4, teacher = 1 off-diagonal; diagonals 0.
  tri = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]], np.float32)
  ds = np.array([5, 4, 3]) / 4.0
  expect = 2 * sum(0.5 * (x - 1) ** 2 for x in ds) / 9  # b^2 = 9 entries, 6 off-diag
  close(J['rkd'](e, tri, 1.0, 0.0), expect, rtol=1e-5)
  # 4-D input is flattened per sample (pairwise relations ignore the order).
  close(J['rkd'](e.reshape(3, 1, 1, 2), tri, 1.0, 0.0), expect, rtol=1e-5)


@pytest.mark.parametrize('b,ds,dt', [(2, 5, 7), (8, 16, 32)])
def test_pkt_matches_reference(b, ds, dt):
  rng = np.random.default_rng(b + ds)
  s, t = rand(rng, b, ds), rand(rng, b, dt)
  close(J['pkt'](s, t), np_pkt(np.float64(s), np.float64(t)))


def test_pkt_special_values():
  rng = np.random.default_rng(8)
  f = rand(rng, 4, 6)
  assert abs(float(J['pkt'](f, f))) < 1e-7
  close(J['pkt'](f, 2.0 * f), 0.0, atol=1e-7)
  # A zero feature row: the reference's NaN->0 guard is never needed (eps in
  # the denominator), the row's cosine similarities are 0, i.e. kernel 1/2.
  z = f.copy()
  z[1] = 0
  close(J['pkt'](z, f), np_pkt(np.float64(z), np.float64(f)))


@pytest.mark.parametrize('shape', [(2, 4, 4, 3), (3, 2, 5, 6)])
def test_vid_matches_reference(shape):
  rng = np.random.default_rng(sum(shape))
  mu, tgt = rand(rng, *shape), rand(rng, *shape)
  log_scale = rand(rng, shape[-1])
  close(J['vid'](mu, log_scale, tgt), np_vid(nchw(mu), np.float64(log_scale), nchw(tgt)))


def test_vid_special_values():
  # With pred == target and the reference's initial log_scale, var == 5.
  c = 4
  ls0 = L.vid_log_scale_init(5.0, 1e-5)
  log_scale = np.full((c,), ls0, np.float32)
  x = np.ones((2, 3, 3, c), np.float32)
  close(J['vid'](x, log_scale, x), 0.5 * np.log(5.0), rtol=1e-5)
  # A unit error everywhere adds 0.5 / var.
  close(J['vid'](x + 1, log_scale, x), 0.5 * (1 / 5.0 + np.log(5.0)), rtol=1e-5)


# ----------------------------------------------------------------------------
# CRD
# ----------------------------------------------------------------------------

def _unit(rng, *shape):
  x = rand(rng, *shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_crd_scores_z_estimation():
  rng = np.random.default_rng(9)
  n, d, b, k = 50, 8, 4, 6
  memory = _unit(rng, n, d)
  anchor = _unit(rng, b, d)
  idx = rng.integers(0, n, (b, k + 1)).astype(np.int32)
  T = 0.07
  out, z = J['crd_scores'](anchor, memory, idx, -1.0, temperature=T)
  ref_out, ref_z = np_crd_scores(np.float64(anchor), np.float64(memory), idx, -1.0, T)
  close(z, ref_z, rtol=1e-5)
  close(out, ref_out, rtol=1e-5)
  # Estimated from the batch: the normalised scores average to 1 / n_data.
  close(np.mean(np.asarray(out)), 1.0 / n, rtol=1e-5)
  # Once set, Z is kept (here a different anchor batch, same Z).
  anchor2 = _unit(rng, b, d)
  out2, z2 = J['crd_scores'](anchor2, memory, idx, z, temperature=T)
  assert float(z2) == float(z)
  ref_out2, _ = np_crd_scores(np.float64(anchor2), np.float64(memory), idx, float(z), T)
  close(out2, ref_out2, rtol=1e-5)
  # Z = 0 also counts as unset.
  _, z0 = J['crd_scores'](anchor, memory, idx, 0.0, temperature=T)
  close(z0, ref_z, rtol=1e-5)


def test_crd_nce_loss():
  rng = np.random.default_rng(10)
  n_data = 1000
  x = np.exp(rand(rng, 5, 17)) / 300.0
  close(J['crd_nce'](x, n_data=n_data), np_crd_nce(np.float64(x), n_data), rtol=1e-5)
  # Hand-derived: every score equal to m*Pn (=: q): each term is log(q/(2q+eps)).
  m, b = 16, 5
  q = m / n_data
  x = np.full((b, m + 1), q, np.float32)
  expect = -(b * np.log(q / (2 * q + 1e-7)) + b * m * np.log(q / (2 * q + 1e-7))) / b
  close(J['crd_nce'](x, n_data=n_data), expect, rtol=1e-5)


def test_crd_memory_update():
  rng = np.random.default_rng(11)
  n, d = 20, 6
  memory = rand(rng, n, d)
  emb = _unit(rng, 3, d)
  idx = np.array([4, 0, 17], np.int32)
  new = np.asarray(J['crd_update'](memory, emb, idx, momentum=0.5))
  close(new, np_crd_update(np.float64(memory), np.float64(emb), idx, 0.5))
  untouched = np.setdiff1d(np.arange(n), idx)
  assert np.array_equal(new[untouched], memory[untouched])
  close(np.linalg.norm(new[idx], axis=1), np.ones(3))
  # Hand-derived: old row e0, new row e1, momentum 0.5 -> (e0 + e1)/sqrt(2).
  mem = np.zeros((2, 2), np.float32)
  mem[0] = [1.0, 0.0]
  out = np.asarray(J['crd_update'](mem, np.array([[0.0, 1.0]], np.float32), np.array([0], np.int32), momentum=0.5))
  close(out[0], [1 / np.sqrt(2), 1 / np.sqrt(2)])
  close(out[1], [0.0, 0.0])


def test_crd_loss_full_step():
  rng = np.random.default_rng(12)
  n, d, b, k = 40, 8, 4, 5
  mem_s = np.asarray(J['crd_init'](jax.random.PRNGKey(0), n, d))
  mem_t = np.asarray(J['crd_init'](jax.random.PRNGKey(1), n, d))
  stdv = 1 / np.sqrt(d / 3)
  assert mem_s.shape == (n, d) and np.all(np.abs(mem_s) <= stdv)
  es, et = _unit(rng, b, d), _unit(rng, b, d)
  idx = np.array([3, 7, 11, 30], np.int32)
  sample = np.asarray(J['crd_sample'](jax.random.PRNGKey(2), idx, n, k))
  assert sample.shape == (b, k + 1) and np.array_equal(sample[:, 0], idx)
  loss, (ms2, mt2, zs, zt) = J['crd_loss'](es, et, mem_s, mem_t, idx, sample, -1.0, -1.0)
  # Reference: out_v1 = student anchor vs teacher memory (memory_v2), etc.
  out_s, ref_zs = np_crd_scores(np.float64(es), np.float64(mem_t), sample, -1.0, 0.07)
  out_t, ref_zt = np_crd_scores(np.float64(et), np.float64(mem_s), sample, -1.0, 0.07)
  close(loss, np_crd_nce(out_s, n) + np_crd_nce(out_t, n), rtol=1e-5)
  close(zs, ref_zs, rtol=1e-5)
  close(zt, ref_zt, rtol=1e-5)
  close(ms2, np_crd_update(np.float64(mem_s), np.float64(es), idx, 0.5))
  close(mt2, np_crd_update(np.float64(mem_t), np.float64(et), idx, 0.5))
  # Gradient reaches both embeddings (both heads are trained), not the memory.
  grad_fn = jax.jit(jax.grad(lambda a, c, m: L.crd_loss(a, c, m, mem_t, idx, sample, zs, zt)[0],
                argnums=(0, 1, 2)))
  gs, gt, gm = grad_fn(es, et, mem_s)
  assert np.all(np.isfinite(gs)) and np.any(np.asarray(gs) != 0)
  assert np.any(np.asarray(gt) != 0)
  assert not np.any(np.asarray(gm))
  close(J['l2n'](np.array([[3.0, 4.0]])), [[0.6, 0.8]])


# ----------------------------------------------------------------------------
# Subclass distillation
# ----------------------------------------------------------------------------

def test_subclass_class_logits():
  rng = np.random.default_rng(13)
  b, c, s = 3, 4, 5
  z = rand(rng, b, c * s, scale=2)
  got = np.asarray(J['sub_cls'](z, num_classes=c))
  z64 = np.float64(z).reshape(b, c, s)  # class k owns columns k*s .. k*s + s - 1
  m = z64.max(-1, keepdims=True)
  close(got, (m + np.log(np.exp(z64 - m).sum(-1, keepdims=True)))[..., 0])
  # softmax over classes == subclass softmax summed within each class.
  close(np_softmax(np.float64(got)), np_softmax(np.float64(z)).reshape(b, c, s).sum(-1))
  with pytest.raises(ValueError):
    L.subclass_to_class_logits(z, 7)


@pytest.mark.parametrize('mode', ['example', 'batch'])
@pytest.mark.parametrize('b,n,T', [(2, 4, 1.0), (8, 10, 0.5)])
def test_subclass_aux_matches_reference(mode, b, n, T):
  rng = np.random.default_rng(b * n)
  z = rand(rng, b, n, scale=2)
  close(J['sub_aux'](z, temperature=T, normalize_over=mode), np_subclass_aux(z, T, mode), rtol=1e-5, atol=1e-5)


def test_subclass_aux_special_values():
  # Collapsed batch: identical rows -> loss 0 in the authors' form.
  row = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
  z = np.tile(row, (5, 1))
  close(J['sub_aux'](z, temperature=1.0, normalize_over='example'), 0.0, atol=1e-5)
  # One-hot rows (B = n): standardised one-hots have cosine -1/(n-1) with each
  # other, so L = log(e^{1/T} + (B-1) e^{-1/((n-1)T)}) - 1/T - log B.
  n, T = 5, 0.5
  z = np.eye(n, dtype=np.float32)
  expect = np.log(np.exp(1 / T) + (n - 1) * np.exp(-1 / ((n - 1) * T))) - 1 / T - np.log(n)
  close(J['sub_aux'](z, temperature=T, normalize_over='example'), expect, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# jit / bfloat16 / gradients for every loss
# ----------------------------------------------------------------------------

def _cases():
  rng = np.random.default_rng(42)
  b, c = 4, 10
  s_log, t_log = rand(rng, b, c, scale=2), rand(rng, b, c, scale=2)
  y = rng.integers(0, c, b)
  fs, ft = rand(rng, b, 8, 8, 3), rand(rng, b, 4, 4, 5)
  es, et = rand(rng, b, 6), rand(rng, b, 9)
  n, d, k = 30, 8, 5
  mem = _unit(rng, n, d)
  sample = rng.integers(0, n, (b, k + 1)).astype(np.int32)
  anchor = _unit(rng, b, d)
  same_s, same_t = rand(rng, b, 4, 4, 3), rand(rng, b, 4, 4, 3)
  log_scale = rand(rng, 3)
  # name -> (fn(x, *aux), x, aux): x is the student-side input the gradient is
  # taken with respect to, aux the teacher-side float inputs.
  return {
    'cross_entropy': (lambda x: L.cross_entropy(x, y, 0.1), s_log, ()),
    'kd': (lambda x, t: L.kd_loss(x, t, 4.0), s_log, (t_log,)),
    'dkd': (lambda x, t: L.dkd_loss(x, t, y, 1.0, 8.0, 4.0), s_log, (t_log,)),
    'hint': (L.hint_loss, same_s, (same_t,)),
    'at': (L.at_loss, fs, (ft,)),
    'sp': (L.sp_loss, fs, (ft,)),
    'rkd': (L.rkd_loss, es, (et,)),
    'pkt': (L.pkt_loss, es, (et,)),
    'vid': (lambda x, ls, t: L.vid_loss(x, ls, t), same_s, (log_scale, same_t)),
    'crd': (lambda x, m: L.crd_nce_loss(L.crd_scores(L.l2_normalize(x), m, sample, 5.0, 0.07)[0], n),
        anchor, (mem,)),
    'simkd': (L.simkd_loss, same_s, (same_t,)),
    'subclass_aux': (lambda x: L.subclass_aux_loss(x, 1.0), s_log, ()),
    'subclass_ce': (lambda x: L.cross_entropy(L.subclass_to_class_logits(x, 5), y % 5), s_log, ()),
  }


CASES = _cases()
# bfloat16 inputs carry ~3 significant digits; on these inputs every loss stays
# within 0.3% of its float32 value, so 1% leaves a margin without hiding a
# missing upcast (which would show up as bfloat16 accumulation error or dtype).
BF16_RTOL = 1e-2


@pytest.mark.parametrize('name', sorted(CASES))
def test_jit_bf16_and_grad(name):
  fn, x, aux = CASES[name]
  val_and_grad = jax.jit(jax.value_and_grad(fn))
  v32, g32 = val_and_grad(jnp.asarray(x), *aux)
  assert v32.dtype == jnp.float32 and v32.shape == ()
  assert np.all(np.isfinite(np.asarray(g32))) and np.any(np.asarray(g32) != 0)
  # All float inputs in bfloat16: they are upcast inside, so the value equals
  # the float32 value of the bf16-rounded inputs (up to float32 rounding) and
  # is within BF16_RTOL of the float32 value.
  bf = lambda a: jnp.asarray(a).astype(jnp.bfloat16)
  vb, gb = val_and_grad(bf(x), *map(bf, aux))
  assert vb.dtype == jnp.float32
  up = lambda a: bf(a).astype(jnp.float32)
  close(vb, float(val_and_grad(up(x), *map(up, aux))[0]), rtol=1e-6)
  close(vb, float(v32), rtol=BF16_RTOL, atol=1e-4)
  assert np.all(np.isfinite(np.asarray(gb, np.float32)))


def test_grads_finite_on_degenerate_features():
  # Duplicate samples, zero features and all-zero maps are where naive norms
  # and square roots produce NaN gradients.
  rng = np.random.default_rng(14)
  e = rand(rng, 4, 6)
  e[1] = e[0]
  e[2] = 0.0
  t = rand(rng, 4, 5)
  maps = np.zeros((2, 4, 4, 3), np.float32)
  tmaps = rand(rng, 2, 4, 4, 3)
  fns = [
    lambda e, m: L.rkd_loss(e, t),
    lambda e, m: L.rkd_loss(t, e),
    lambda e, m: L.pkt_loss(e, t),
    lambda e, m: L.sp_loss(e, t),
    lambda e, m: L.at_loss(m, tmaps),
    lambda e, m: L.l2_normalize(e).sum(),
  ]
  values, grads = jax.jit(lambda e, m: ([f(e, m) for f in fns],
                     [jax.grad(f, argnums=(0, 1))(e, m) for f in fns]))(e, maps)
  for v, g in zip(values, grads):
    assert np.isfinite(float(v))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in g)
  # A memory row that cancels to exactly zero stays finite (the reference would
  # write NaN into the bank).
  mem = np.zeros((5, 6), np.float32)
  mem[2] = -e[0]
  new = J['crd_update'](mem, e, np.array([2, 0, 1, 3], np.int32), momentum=0.5)
  assert np.all(np.isfinite(np.asarray(new)))
