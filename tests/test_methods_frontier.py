"""The 2022-2025 frontier: WTTM, SDD (SD-KD, SD-DKD, SD-NKD), WKD (WKD-L, WKD-F), MGD and CRLD against NumPy
re-implementations written from the reference code (zkxufo/TTM distiller_zoo/wttm.py; SDD-CVPR2024
mdistiller/models/cifar/utils.py `SPP`, distillers/KD.py `sdd_kd_loss`, distillers/SDD_DKD.py `multi_dkd`,
distillers/SDD_nkd.py; JiamingLv/WKD mdistiller/distillers/WKD.py; yzd-v/MGD cls/mmcls/distillation/losses/mgd.py;
CRLD's distillers/CRLD.py), on NCHW arrays and with the references' index order and masks, their detach points,
refusals, configs and one digits run."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import config_lib
from kdjax import distill
from kdjax import methods  # noqa: F401  (registers the methods)
from kdjax import models
from kdjax import train
from kdjax.errors import ConfigError
from kdjax.methods import crld, mgd, sdd, wkd, wttm
from tests.util import config_module, digits_config, load_digits_model, np_log_softmax, np_softmax, random_teacher

RTOL, ATOL = 2e-5, 1e-6


CIFAR100 = config_module('cifar100.py')




def _logits(seed, b=6, c=7, scale=3.0):
  rng = np.random.RandomState(seed)
  return rng.randn(b, c) * scale, rng.randn(b, c) * scale * 1.5, rng.randint(0, c, b)


# ------------------------------------------------------------------------------------------------------- WTTM
def np_wttm(y_s, y_t, l):
  # wttm.py WTTM.forward: p_t = softmax(y_t) ** l, norm = its row sum, p_t /= norm, KL summed per row, mean(norm * KL)
  p_s = np_log_softmax(y_s)
  p_t = np_softmax(y_t) ** l
  norm = p_t.sum(1)
  p_t = p_t / norm[:, None]
  kl = (p_t * (np.log(p_t) - p_s)).sum(1)
  return np.mean(norm * kl)


@pytest.mark.parametrize('gamma', [0.2, 0.5, 1.0])
def test_wttm_matches_numpy(gamma):
  s, t, _ = _logits(0)
  np.testing.assert_allclose(wttm.wttm_loss(s.astype(np.float32), t.astype(np.float32), gamma), np_wttm(s, t, gamma),
                             rtol=RTOL, atol=ATOL)


def test_wttm_gradient_is_the_weighted_softmax_residual():
  """d/dz_s = norm * (softmax(z_s) - q) / B: the weight and q act as constants of the teacher, no T^2."""
  s, t, _ = _logits(1)
  gamma = 0.3
  grad = jax.grad(wttm.wttm_loss)(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), gamma)
  p = np_softmax(t) ** gamma
  norm = p.sum(1, keepdims=True)
  expected = norm * (np_softmax(s) - p / norm) / s.shape[0]
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


# -------------------------------------------------------------------------------------------------------- SDD
def np_adaptive_pool(x, out):
  """F.adaptive_avg_pool2d (NCHW) with PyTorch's floor/ceil bins."""
  n, c, h, w = x.shape
  y = np.zeros((n, c, out, out))
  for i in range(out):
    h0, h1 = (i * h) // out, -((-(i + 1) * h) // out)
    for j in range(out):
      w0, w1 = (j * w) // out, -((-(j + 1) * w) // out)
      y[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
  return y


def np_spp_scores(x, weight, bias, m):
  # utils.py SPP.forward then resnet.py forward: [B, C, N] pooled features -> permute(2, 0, 1) -> fc -> [B, K, N]
  x4 = np_adaptive_pool(x, 4)
  parts = {1: np_adaptive_pool(x4, 1), 2: np_adaptive_pool(x4, 2), 4: x4}
  feat = np.concatenate([parts[s].reshape(x.shape[0], x.shape[1], -1) for s in m], axis=2)
  scores = np.transpose(feat, (2, 0, 1)) @ weight.T + bias  # [N, B, K]
  return np.transpose(scores, (1, 2, 0))


def np_region_weights(out_t, target, b):
  # KD.py sdd_kd_loss / SDD_DKD.py multi_dkd: the masks, literally (rows ordered region-major: row = n * B + b)
  n = out_t.shape[0] // b
  target_r = np.tile(target, n)
  pred = out_t.argmax(1)
  mask_true, mask_false = pred == target_r, pred != target_r
  glob = pred[:b]
  gtrue_r, gfalse_r = np.tile(glob == target, n), np.tile(glob != target, n)
  mask_false[gfalse_r] = False
  mask_false[:b] = False
  gt_lw = mask_false
  mask_true[gtrue_r] = False
  mask_true[:b] = False
  gw_lt = mask_true
  mask_false, mask_true = pred != target_r, pred == target_r
  mask_false[gtrue_r] = False
  gw_lw = mask_false
  mask_true[gfalse_r] = False
  gt_lt = mask_true
  assert gt_lt.sum() + gw_lw.sum() + gt_lw.sum() + gw_lt.sum() == len(target_r)
  index = np.zeros(len(target_r))
  index[gw_lw] = 1.0
  index[gt_lt] = 1.0
  index[gw_lt] = 2.0
  index[gt_lw] = 2.0
  return index, target_r


def _rows(scores):
  # [B, K, N] -> permute(2, 0, 1) -> [N * B, K]
  return np.transpose(scores, (2, 0, 1)).reshape(-1, scores.shape[1])


def np_sdd_kd(patch_s, patch_t, temp, target):
  out_s, out_t = _rows(patch_s), _rows(patch_t)
  kl = (np_softmax(out_t / temp) * (np_log_softmax(out_t / temp) - np_log_softmax(out_s / temp))).sum(1) * temp ** 2
  index, target_r = np_region_weights(out_t, target, len(target))
  return np.sum(kl * index) / len(target_r), index


def np_dkd_rows(s, t, target, alpha, beta, temp):
  # SDD_DKD.py dkd_loss: per row, each divided by the number of rows
  n, k = s.shape
  gt = np.zeros((n, k), bool)
  gt[np.arange(n), target] = True
  ps, pt = np_softmax(s / temp), np_softmax(t / temp)
  cat = lambda p: np.stack([(p * gt).sum(1), (p * ~gt).sum(1)], 1)
  bs, bt = cat(ps), cat(pt)
  tckd = (bt * (np.log(bt) - np.log(bs))).sum(1) * temp ** 2 / n
  pt2 = np_softmax(t / temp - 1000.0 * gt)
  ls2 = np_log_softmax(s / temp - 1000.0 * gt)
  nckd = np.where(pt2 > 0, pt2 * (np.log(np.where(pt2 > 0, pt2, 1.0)) - ls2), 0.0).sum(1) * temp ** 2 / n
  return alpha * tckd + beta * nckd


def np_sdd_dkd(patch_s, patch_t, target, alpha, beta, temp):
  out_s, out_t = _rows(patch_s), _rows(patch_t)
  index, target_r = np_region_weights(out_t, target, len(target))
  return np.sum(np_dkd_rows(out_s, out_t, target_r, alpha, beta, temp) * index)


def np_nkd_rows(s, t, label, temp, gamma):
  # SDD_nkd.py nkd_loss: its mask `ones_like(s).scatter_(1, label, 1)` is all True, so no column is removed
  n = s.shape[0]
  rows = np.arange(n)
  loss_t = -(np_softmax(t)[rows, label] * np_log_softmax(s)[rows, label])
  loss_non = -gamma * temp ** 2 * (np_softmax(t / temp) * np_log_softmax(s / temp)).sum(1)
  return loss_t + loss_non


def np_sdd_nkd(patch_s, patch_t, target, temp, gamma):
  out_s, out_t = _rows(patch_s), _rows(patch_t)
  index, target_r = np_region_weights(out_t, target, len(target))
  return np.sum(np_nkd_rows(out_s, out_t, target_r, temp, gamma) * index) / len(target_r)


def _sdd_inputs(seed, hw, b=8, c=6, k=4):
  rng = np.random.RandomState(seed)
  f_s, f_t = rng.randn(b, c, hw, hw), rng.randn(b, c + 2, hw, hw) * 2
  w_s, b_s = rng.randn(k, c), rng.randn(k) * 0.1
  w_t, b_t = rng.randn(k, c + 2), rng.randn(k) * 0.1
  return f_s, f_t, (w_s, b_s), (w_t, b_t), rng.randint(0, k, b)


def _jax_regions(f, head, scales):
  w, b = head
  nhwc = jnp.asarray(np.transpose(f, (0, 2, 3, 1)), jnp.float32)
  return sdd.region_logits(nhwc, lambda x: x @ jnp.asarray(w.T, jnp.float32) + jnp.asarray(b, jnp.float32), scales)


@pytest.mark.parametrize('scales,hw', [((1, 2, 4), 8), ((1, 2), 6), ((1, 2, 4), 2)])
def test_sdd_regions_and_losses_match_numpy(scales, hw):
  f_s, f_t, head_s, head_t, y = _sdd_inputs(hw, hw)
  r_s, r_t = _jax_regions(f_s, head_s, scales), _jax_regions(f_t, head_t, scales)
  p_s, p_t = np_spp_scores(f_s, *head_s, scales), np_spp_scores(f_t, *head_t, scales)
  np.testing.assert_allclose(r_s, np.transpose(p_s, (0, 2, 1)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(r_t, np.transpose(p_t, (0, 2, 1)), rtol=1e-5, atol=1e-5)
  expected, index = np_sdd_kd(p_s, p_t, 4.0, y)
  if len(scales) > 1:
    assert set(index) == {1.0, 2.0}  # both kinds of terms occur, so the weights are exercised
  weights = sdd.region_weights(r_t, jnp.asarray(y))
  np.testing.assert_array_equal(np.asarray(weights).T.reshape(-1), index)  # [B, N] vs the reference's row order
  np.testing.assert_allclose(sdd.sdd_kd_loss(r_s, r_t, jnp.asarray(y), 4.0), expected, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(sdd.sdd_dkd_loss(r_s, r_t, jnp.asarray(y), 1.0, 8.0, 4.0),
                             np_sdd_dkd(p_s, p_t, y, 1.0, 8.0, 4.0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(sdd.sdd_nkd_loss(r_s, r_t, jnp.asarray(y), 4.0, 6.0),
                             np_sdd_nkd(p_s, p_t, y, 4.0, 6.0), rtol=1e-4, atol=1e-6)


def test_sdd_module_detaches_the_teacher_and_trains_the_student_head():
  f_s, f_t, head_s, head_t, y = _sdd_inputs(3, 8)
  out = lambda f: models.ModelOutput(logits=jnp.zeros((f.shape[0], 4)), embedding=jnp.zeros((f.shape[0], 1)),
                                     features=(jnp.asarray(np.transpose(f, (0, 2, 3, 1)), jnp.float32),))
  module = sdd.SDD('features', 'features', (1, 2, 4))
  lin = lambda w: (lambda x: x @ w[0] + w[1])

  def loss(ws, wt, ft):
    res = module.apply({}, out(f_s), ft, labels=None, indices=None, train=True,
                       teacher_classify=lin(wt), student_classify=lin(ws))
    return sdd.sdd_kd_loss(res['regions_s'], res['regions_t'], jnp.asarray(y), 4.0)

  ws = (jnp.asarray(head_s[0].T, jnp.float32), jnp.asarray(head_s[1], jnp.float32))
  wt = (jnp.asarray(head_t[0].T, jnp.float32), jnp.asarray(head_t[1], jnp.float32))
  g_s, g_t, g_f = jax.grad(loss, argnums=(0, 1, 2))(ws, wt, out(f_t))
  assert float(jnp.abs(g_s[0]).sum()) > 0 and float(jnp.abs(g_s[1]).sum()) > 0
  assert float(jnp.abs(g_t[0]).sum()) == 0 and float(jnp.abs(g_f.features[0]).sum()) == 0


# -------------------------------------------------------------------------------------------------------- WKD
def np_sinkhorn(w1, w2, cost, reg, max_iter):
  # WKD.py sinkhorn: [B, N, 1] vectors, bmm
  dim = w1.shape[1]
  w1, w2 = w1[:, :, None], w2[:, :, None]
  u = np.ones_like(w1) / dim
  k = np.exp(-cost / reg)
  kt = np.transpose(k, (0, 2, 1))
  for _ in range(max_iter):
    v = w2 / (kt @ u + 1e-8)
    u = w1 / (k @ v + 1e-8)
  return u.reshape(len(w1), -1, 1) * k * v.reshape(len(w1), 1, -1)


def np_wkd_l(s, t, label, temp, gamma, fc_weight, sharpen, reg=0.05, iters=10):
  proto = fc_weight / np.linalg.norm(fc_weight, axis=-1, keepdims=True)
  dist = 1 - proto @ proto.T
  if sharpen != 0:
    dist = 1 - np.exp(-sharpen * dist)
  n, c = s.shape
  rows = np.arange(n)
  loss_t = -(np_softmax(t)[rows, label] * np_log_softmax(s)[rows, label]).mean()
  mask = np.ones((n, c), bool)
  mask[rows, label] = False
  s_nt, t_nt = s[mask].reshape(n, -1), t[mask].reshape(n, -1)
  cost = np.repeat(dist[None], n, 0)[mask[:, None, :] & mask[:, :, None]].reshape(n, c - 1, c - 1)
  ps, pt = np_softmax(s_nt / temp), np_softmax(t_nt / temp)
  cost = np.maximum(cost, 0) + 1e-8
  flow = np_sinkhorn(ps, pt, cost, reg, iters)
  return loss_t + gamma * (flow * cost).sum(-1).sum(-1).mean()


def _wkd_l_inputs(seed, b=5, k=6, d=4):
  s, t, y = _logits(seed, b, k)
  return s, t, y, np.random.RandomState(seed + 7).randn(k, d)


@pytest.mark.parametrize('sharpen,temp', [(1.0, 8.0), (0.0, 2.0)])
def test_wkd_l_matches_numpy(sharpen, temp):
  s, t, y, fc = _wkd_l_inputs(0)
  cost = wkd.classifier_cost(jnp.asarray(fc.T, jnp.float32), sharpen)
  got = wkd.wkd_logit_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(y), cost, temp, 30.0)
  np.testing.assert_allclose(got, np_wkd_l(s, t, y, temp, 30.0, fc, sharpen), rtol=1e-4, atol=1e-6)


def test_wkd_l_gradient_flows_through_sinkhorn():
  """The student's gradient (through the 10 Sinkhorn iterations) against central differences of the NumPy
  reference, in float64 with x64 off: a loose tolerance; the teacher's target probability is detached."""
  s, t, y, fc = _wkd_l_inputs(2)
  cost = wkd.classifier_cost(jnp.asarray(fc.T, jnp.float32), 1.0)
  f = lambda z, zt: wkd.wkd_logit_loss(z, zt, jnp.asarray(y), cost, 4.0, 5.0)
  g = np.asarray(jax.grad(f)(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)))
  eps, num = 1e-4, np.zeros_like(s)
  for i in range(s.shape[0]):
    for j in range(s.shape[1]):
      d = np.zeros_like(s)
      d[i, j] = eps
      num[i, j] = (np_wkd_l(s + d, t, y, 4.0, 5.0, fc, 1.0) - np_wkd_l(s - d, t, y, 4.0, 5.0, fc, 1.0)) / (2 * eps)
  np.testing.assert_allclose(g, num, rtol=2e-2, atol=2e-4)
  # the target term alone: its teacher factor is a constant (zero gradient w.r.t. the teacher's target logit)
  g_t = jax.grad(lambda zt: wkd.wkd_logit_loss(jnp.asarray(s, jnp.float32), zt, jnp.asarray(y), cost, 4.0, 0.0))(
      jnp.asarray(t, jnp.float32))
  assert float(jnp.abs(g_t).sum()) == 0


def np_wkd_f(f_s, f_t, ratio, eps, grid):
  # WKD.py wkd_feature_loss (grid 1) / adaptive_avg_std_pool2d (grid > 1); torch's var is the unbiased one
  def stats(x):
    b, c, h, w = x.shape
    mu, sd = np.zeros((b, c, grid, grid)), np.zeros((b, c, grid, grid))
    for i in range(grid):
      h0, h1 = int(np.floor(i * h / grid)), int(np.ceil((i + 1) * h / grid))
      for j in range(grid):
        w0, w1 = int(np.floor(j * w / grid)), int(np.ceil((j + 1) * w / grid))
        block = x[:, :, h0:h1, w0:w1].reshape(b, c, -1)
        mu[:, :, i, j] = block.mean(-1)
        sd[:, :, i, j] = np.sqrt(block.var(-1, ddof=1) + eps)
    return mu, sd
  (ms, ss), (mt, st) = stats(f_s), stats(f_t)
  n = grid ** 2 * f_s.shape[0]
  return ratio * ((ms - mt) ** 2).sum() / n + ((ss - st) ** 2).sum() / n


@pytest.mark.parametrize('grid,hw', [(1, 4), (2, 5)])
def test_wkd_f_matches_numpy(grid, hw):
  rng = np.random.RandomState(grid)
  f_s, f_t = rng.randn(3, 5, hw, hw), rng.randn(3, 5, hw, hw) * 2 + 1
  nhwc = lambda x: jnp.asarray(np.transpose(x, (0, 2, 3, 1)), jnp.float32)
  np.testing.assert_allclose(wkd.wkd_feature_loss(nhwc(f_s), nhwc(f_t), 4.0, 1e-5, grid),
                             np_wkd_f(f_s, f_t, 4.0, 1e-5, grid), rtol=1e-5, atol=1e-6)


def test_wkd_f_bottleneck_projector_matches_numpy():
  """WKD _common.py ConvRegBottleNeck (equal sizes): conv1 1x1 -> conv2 3x3 -> conv3 1x1, BN, ReLU; BN here with its
  initial running statistics (eval mode)."""
  rng = np.random.RandomState(0)
  f = rng.randn(2, 3, 4, 4)
  reg = wkd.BottleneckReg(5, hidden=6)
  x = jnp.asarray(np.transpose(f, (0, 2, 3, 1)), jnp.float32)
  variables = reg.init(jax.random.key(0), x)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables['params'])
  y = np_conv(np_conv(np_conv(f, p['conv1']['kernel'], p['conv1']['bias'], 0), p['conv2']['kernel'],
                      p['conv2']['bias'], 1), p['conv3']['kernel'], p['conv3']['bias'], 0)
  y = np.maximum(y / np.sqrt(1 + 1e-5) * p['bn']['scale'][None, :, None, None] + p['bn']['bias'][None, :, None, None],
                 0)
  np.testing.assert_allclose(np.transpose(np.asarray(reg.apply(variables, x)), (0, 3, 1, 2)), y, rtol=1e-4,
                             atol=1e-5)


def test_wkd_cosine_decay_is_the_references():
  for epoch in (0.0, 148.5, 149.0, 150.0, 151.2, 200.0, 239.0):
    e = math.floor(epoch) + 1
    expected = 0.5 * (1 + math.cos((e - 150) / (240 - 150) * math.pi)) if e > 150 else 1.0
    np.testing.assert_allclose(wkd.cosine_decay(epoch, 150.0, 240.0), expected, rtol=1e-6, atol=1e-7)


# -------------------------------------------------------------------------------------------------------- MGD
def np_conv(x, kernel, bias, pad):
  """nn.Conv2d (NCHW, stride 1, zero padding `pad`) with a Flax kernel [kh, kw, in, out]."""
  kh, kw = kernel.shape[:2]
  xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  h, w = xp.shape[2] - kh + 1, xp.shape[3] - kw + 1
  out = np.zeros((x.shape[0], kernel.shape[3], h, w))
  for i in range(kh):
    for j in range(kw):
      out += np.einsum('nchw,co->nohw', xp[:, :, i:i + h, j:j + w], kernel[i, j])
  return out + bias[None, :, None, None]


def np_mgd(preds_s, preds_t, params, mat):
  # mgd.py MGDLoss: align (1x1) when the channels differ, masked by `mat`, generation conv3x3-ReLU-conv3x3, sum MSE / N
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  if 'align' in p:
    preds_s = np_conv(preds_s, p['align']['kernel'], p['align']['bias'], 0)
  x = preds_s * mat
  x = np_conv(x, p['generation0']['kernel'], p['generation0']['bias'], 1)
  x = np_conv(np.maximum(x, 0), p['generation1']['kernel'], p['generation1']['bias'], 1)
  return x, ((x - preds_t) ** 2).sum() / preds_t.shape[0]


def _mgd_case(seed, c_s=3, c_t=5, hw=4, b=2):
  rng = np.random.RandomState(seed)
  f_s, f_t = rng.randn(b, c_s, hw, hw), rng.randn(b, c_t, hw, hw)
  out = lambda f: models.ModelOutput(logits=jnp.zeros((b, 2)), embedding=jnp.zeros((b, 1)),
                                     features=(jnp.asarray(np.transpose(f, (0, 2, 3, 1)), jnp.float32),))
  return f_s, f_t, out(f_s), out(f_t)


@pytest.mark.parametrize('ratio', [0.15, 1.0 - 1e-7])
def test_mgd_matches_numpy(ratio):
  """Without the 'sample' stream nothing is masked; with a ratio of almost 1 everything is, after the 1x1 align (a
  zero map then reaches the generator, so its output is the generator's biases alone)."""
  f_s, f_t, s_out, t_out = _mgd_case(0)
  module = mgd.MGD(-1, 5, 'channel', ratio)
  kw = dict(labels=None, indices=None, train=True, teacher_classify=None)
  params = module.init(jax.random.key(1), s_out, t_out, **kw)
  for rngs, mat in (({}, np.ones((2, 1, 1, 1))), ({'sample': jax.random.key(2)}, None)):
    if mat is None:
      if ratio < 0.5:
        continue
      mat = np.zeros((2, 1, 1, 1))
    got = module.apply(params, s_out, t_out, rngs=rngs, **kw)['generated']
    expected, loss = np_mgd(f_s, f_t, params['params'], mat)
    np.testing.assert_allclose(np.transpose(np.asarray(got), (0, 3, 1, 2)), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(mgd.mgd_loss(got, t_out.features[-1]), loss, rtol=1e-4)


@pytest.mark.parametrize('kind,shape', [('channel', (64, 1, 1, 32)), ('pixel', (64, 4, 4, 1))])
def test_mgd_masks_drop_whole_channels_or_positions_at_the_ratio(kind, shape):
  mask = np.asarray(mgd.random_mask(jax.random.key(0), (64, 4, 4, 32), kind, 0.15))
  assert mask.shape == shape and set(np.unique(mask)) == {0.0, 1.0}
  assert abs((mask == 0).mean() - 0.15) < 0.03


# ------------------------------------------------------------------------------------------------------- CRLD
def np_crld(s_w, s_s, t_w, t_s, temp, tau_w, tau_s, wv, cv):
  # CRLD.py forward_train: per-example kd_loss (reduce=False), masks conf.ge(tau) of the teacher's softmax
  kd = lambda s, t: (np_softmax(t / temp) * (np_log_softmax(t / temp) - np_log_softmax(s / temp))).sum(1) * temp ** 2
  mask_w = np_softmax(t_w).max(1) >= tau_w
  mask_s = np_softmax(t_s).max(1) >= tau_s
  return wv * ((kd(s_w, t_w) + kd(s_s, t_s)) * mask_w).mean() + cv * ((kd(s_s, t_w) + kd(s_w, t_s)) * mask_s).mean()


def test_crld_matches_numpy_and_detaches_the_masks():
  s_w, t_w, _ = _logits(4, b=16, c=5, scale=2.0)
  s_s, t_s, _ = _logits(5, b=16, c=5, scale=1.0)
  tau_w, tau_s = 0.6, 0.62
  mask_w, mask_s = np_softmax(t_w).max(1) >= tau_w, np_softmax(t_s).max(1) >= tau_s
  assert 0 < mask_w.sum() < 16 and 0 < mask_s.sum() < 16  # both masks keep some examples and drop others
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  loss = lambda sw, ss, tw, ts: crld.crld_loss((sw, tw), (ss, ts), tw, ts, 4.0, tau_w, tau_s, 2.0, 0.5)
  np.testing.assert_allclose(loss(f32(s_w), f32(s_s), f32(t_w), f32(t_s)),
                             np_crld(s_w, s_s, t_w, t_s, 4.0, tau_w, tau_s, 2.0, 0.5), rtol=1e-5, atol=1e-6)
  g_w, g_s = jax.grad(loss, argnums=(0, 1))(f32(s_w), f32(s_s), f32(t_w), f32(t_s))
  # an example masked out of both terms gets no gradient; the masks themselves carry none
  dropped = ~mask_w & ~mask_s
  assert dropped.any() and (~dropped).any()
  assert float(jnp.abs(g_w[dropped]).sum()) == 0 and float(jnp.abs(g_s[dropped]).sum()) == 0
  assert float(jnp.abs(g_w[~dropped]).sum()) > 0
  assert float(jnp.abs(jax.grad(lambda t: jnp.sum(crld.confidence_mask(t, 0.5)))(f32(t_w))).sum()) == 0


# ------------------------------------------------------------------------------------------ refusals, configs
def _refusal(term, student, teacher, **cfg_sections):
  cfg = config_lib.base()
  for k, v in cfg_sections.items():
    cfg.distill[k].update(v)
  s_model, t_model = models.create(student, num_classes=10), models.create(teacher, num_classes=10)
  x = jnp.zeros((2, 8, 8, 1))
  shapes = lambda m: jax.eval_shape(lambda: m.apply(m.init(jax.random.key(0), x), x))
  info = distill.DataInfo(10, 10, s_model, t_model, student, teacher)
  with pytest.raises(ConfigError) as e:
    distill.check_pair(term, distill.METHODS[term], cfg.distill, shapes(s_model), shapes(t_model), info)
  message = str(e.value)
  assert '\n' not in message and message.startswith(term) and f'student {student}, teacher {teacher}' in message
  return message


def test_pairs_the_methods_cannot_use_are_refused_in_one_line():
  assert 'does not expose that map' in _refusal('sdd_kd', 'cnn_small', 'resnet8')
  assert 'does not expose that map' in _refusal('sdd_dkd', 'resnet8', 'mlp')
  assert 'does not expose that map' in _refusal('sdd_nkd', 'MobileNetV2', 'resnet8')
  assert 'convolutional feature maps' in _refusal('wkd_f', 'mlp', 'cnn_small')
  assert 'distill.wkd_f.grid' in _refusal('wkd_f', 'cnn_small', 'cnn_small', wkd_f=dict(grid=8))
  assert 'at the same size' in _refusal('mgd', 'cnn_small', 'resnet8')
  assert 'bottleneck projector' in _refusal('wkd_f', 'cnn_small', 'resnet8', wkd_f=dict(projector='bottleneck'))


def test_bad_options_are_refused_by_name():
  from kdjax import validate
  for path, value in (('wttm.gamma', 0.0), ('sdd.scales', (1, 3)), ('wkd_l.sinkhorn_iter', 0),
                      ('wkd_f.eps', 0.0), ('mgd.lambda_mgd', 1.0), ('mgd.mask', 'box'), ('crld.tau_w', 1.5),
                      ('wkd_f.projector', 'mlp')):
    cfg = digits_config('cnn_small')
    section, field = path.split('.')
    cfg.distill[section][field] = value
    with pytest.raises(ConfigError, match=f'distill.{path}'):
      validate.check(cfg)


def test_reference_configs():
  c = CIFAR100.get_config('wttm,resnet32x4,resnet8x4').distill
  assert dict(c.losses) == {'ce': 1.0, 'wttm': 4.0} and c.wttm.gamma == 0.2
  c = CIFAR100.get_config('sdd_kd,resnet32x4,resnet8x4').distill
  assert dict(c.losses) == {'ce': 0.1, 'sdd_kd': 0.9} and tuple(c.sdd.scales) == (1, 2) and c.sdd.temperature == 4
  assert tuple(CIFAR100.get_config('sdd_kd,resnet32x4,ShuffleV1').distill.sdd.scales) == (1, 2, 4)
  c = CIFAR100.get_config('sdd_dkd,vgg13,vgg8').distill
  assert dict(c.losses) == {'ce': 1.0, 'sdd_dkd': 1.0} and c.dkd.beta == 6.0 and c.dkd.warmup_epochs == 20
  c = CIFAR100.get_config('sdd_nkd,resnet56,resnet20').distill
  assert dict(c.losses) == {'ce': 1.0, 'sdd_nkd': 1.0} and (c.dkd.beta, c.dkd.temperature) == (2.0, 4.0)
  c = CIFAR100.get_config('wkd_l,resnet32x4,resnet8x4').distill
  assert dict(c.losses) == {'ce': 1.0, 'wkd_l': 1.0}
  assert (c.wkd_l.logit_weight, c.wkd_l.temperature, c.wkd_l.sinkhorn_iter, c.wkd_l.decay_start) == (600, 8, 10, 150)
  c = CIFAR100.get_config('wkd_f,resnet32x4,resnet8x4').distill
  assert dict(c.losses) == {'ce': 1.0, 'wkd_f': 0.08} and (c.wkd_f.mean_cov_ratio, c.wkd_f.grid) == (4.0, 1)
  c = CIFAR100.get_config('mgd,resnet32x4,resnet8x4').distill
  assert dict(c.losses) == {'ce': 1.0, 'mgd': 7e-5}
  assert (c.mgd.lambda_mgd, c.mgd.mask, c.mgd.layer) == (0.15, 'channel', -1)
  c = CIFAR100.get_config('crld,resnet32x4,resnet8x4').distill
  assert dict(c.losses) == {'ce': 1.0, 'ce_strong': 1.0, 'crld': 1.0}
  assert dict(c.crld) == {'temperature': 4.0, 'tau_w': 0.9, 'tau_s': 0.2, 'wv_weight': 2.0, 'cv_weight': 0.5}


# ------------------------------------------------------------------------------------------------ digits run
@pytest.mark.slow
def test_frontier_terms_train_on_digits_with_a_frozen_teacher(tmp_path):
  """Every new term at once on digits (resnet8 -> resnet8; the final 2x2 map pooled to 1, 2 and 4 regions a side;
  CRLD with the strong view): each term finite, the training loss falls, the teacher stays bit-identical, WKD-F's
  regressor and MGD's generator are trained parameters."""
  teacher = random_teacher(str(tmp_path / 'teacher'), 'resnet8', seed=3)
  cfg = digits_config('resnet8', {'ce': 1.0, 'wttm': 1.0, 'sdd_kd': 0.9, 'sdd_dkd': 1.0, 'sdd_nkd': 1.0, 'wkd_l': 1.0,
                                  'wkd_f': 0.08, 'mgd': 7e-5, 'crld': 1.0, 'ce_strong': 1.0}, epochs=2)
  cfg.teacher.update(model='resnet8', checkpoint=teacher)
  cfg.distill.dkd.warmup_epochs = 1
  cfg.distill.wkd_l.logit_weight = 30.0
  cfg.distill.crld.update(tau_w=0.0, tau_s=0.0)  # a random teacher is never confident: keep every example
  before = load_digits_model(teacher, 'resnet8')
  summary = train.run(cfg, str(tmp_path / 'run'))
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, summary.trainer.teacher_vars))
  records = [json.loads(l) for l in open(tmp_path / 'run' / 'metrics.jsonl') if '"epoch"' in l]
  assert len(records) == 2
  for term in ('wttm', 'sdd_kd', 'sdd_dkd', 'sdd_nkd', 'wkd_l', 'wkd_f', 'mgd', 'crld', 'ce_strong'):
    assert all(np.isfinite(r[f'loss_{term}']) and r[f'loss_{term}'] > 0 for r in records), term
  assert records[1]['train_loss'] < records[0]['train_loss']
  assert 'regressor' in summary.state.params['extras']['wkd_f']
  assert set(summary.state.params['extras']['mgd']) == {'generation0', 'generation1'}  # equal widths: no align
