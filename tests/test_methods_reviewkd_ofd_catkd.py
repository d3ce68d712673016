"""ReviewKD, OFD and CAT-KD against NumPy re-implementations written from the reference code (mdistiller
distillers/ReviewKD.py and OFD.py, GzyAftermath/CAT-KD distillers/CAT_KD.py and tools/train.py)."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kdjax import distill
from kdjax import models
from kdjax.errors import ConfigError
from kdjax.methods import cat
from kdjax.methods import ofd
from kdjax.methods import review
from kdjax.models import ModelOutput

EPS = 1e-5  # BatchNorm epsilon


# ------------------------------------------------------------------------------------------------ NumPy helpers
def np_pool(x, oh, ow):
  """F.adaptive_avg_pool2d on NHWC: bins [floor(i*in/out), ceil((i+1)*in/out))."""
  n, h, w, c = x.shape
  out = np.zeros((n, oh, ow, c), np.float64)
  for i in range(oh):
    r0, r1 = (i * h) // oh, -((-(i + 1) * h) // oh)
    for j in range(ow):
      c0, c1 = (j * w) // ow, -((-(j + 1) * w) // ow)
      out[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
  return out


def np_nearest(x, oh, ow):
  h, w = x.shape[1:3]
  rows = [int(math.floor(i * h / oh)) for i in range(oh)]
  cols = [int(math.floor(j * w / ow)) for j in range(ow)]
  return x[:, rows][:, :, cols]


def np_conv(x, kernel, bias=None):
  """Stride-1 'same' conv, NHWC x HWIO, zero padding k // 2."""
  kh, kw = kernel.shape[:2]
  xp = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  n, h, w, _ = x.shape
  out = np.zeros((n, h, w, kernel.shape[-1]))
  for a in range(kh):
    for b in range(kw):
      out += np.einsum('nhwc,cd->nhwd', xp[:, a:a + h, b:b + w], kernel[a, b])
  return out if bias is None else out + bias


def np_bn(x, params, stats):
  return (x - stats['mean']) / np.sqrt(stats['var'] + EPS) * params['scale'] + params['bias']


def _randomize(variables, seed):
  """Random params and running statistics (variances positive), so that nothing is an identity by accident."""
  rng = np.random.RandomState(seed)

  def one(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['var']"):
      return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), leaf.dtype)
    return jnp.asarray(rng.normal(0, 0.5, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(one, variables)


def _np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _output(features, preact, embedding, num_classes=5):
  b = embedding.shape[0]
  return ModelOutput(logits=jnp.zeros((b, num_classes)), embedding=jnp.asarray(embedding, jnp.float32),
                     features=tuple(jnp.asarray(f, jnp.float32) for f in features),
                     preact=tuple(jnp.asarray(f, jnp.float32) for f in preact))


def _ctx(student, teacher, extras, epoch=100.0):
  return distill.Context(student=student, teacher=teacher, labels=jnp.zeros((student.logits.shape[0],), jnp.int32),
                         extras=extras, epoch=jnp.float32(epoch))


def _cfg(**sections):
  c = ml_collections.ConfigDict({'reviewkd': dict(warmup_epochs=20, stu_preact=False, max_mid_channels=512),
                                 'ofd': dict(connector_kernel_size=1),
                                 'cat_kd': dict(cam_resolution=2, normalize=False)})
  for k, v in sections.items():
    c[k].update(v)
  return c


# --------------------------------------------------------------------------------------------------- ReviewKD
def np_hcl(fs_list, ft_list):
  loss_all = 0.0
  for fs, ft in zip(fs_list, ft_list):
    h = fs.shape[1]
    loss = np.mean((fs - ft) ** 2)
    cnt, tot = 1.0, 1.0
    for l in [4, 2, 1]:
      if l >= h:
        continue
      cnt /= 2.0
      loss += np.mean((np_pool(fs, l, l) - np_pool(ft, l, l)) ** 2) * cnt
      tot += cnt
    loss_all += loss / tot
  return loss_all


def test_hcl_matches_numpy():
  rng = np.random.RandomState(0)
  shapes = [(2, 8, 8, 3), (2, 6, 6, 4), (2, 3, 3, 2), (2, 1, 1, 5)]  # 6 -> 4 and 3 -> 2 pool with overlapping bins
  fs = [rng.normal(size=s) for s in shapes]
  ft = [rng.normal(size=s) for s in shapes]
  got = review.hcl_loss([jnp.asarray(a, jnp.float32) for a in fs], [jnp.asarray(a, jnp.float32) for a in ft])
  np.testing.assert_allclose(float(got), np_hcl(fs, ft), rtol=1e-5)


def np_abf(p, s, x, residual, out_hw):
  """mdistiller ABF.forward with the module's parameters (NHWC)."""
  x = np_bn(np_conv(x, p['conv1']['kernel']), p['bn1'], s['bn1'])
  if residual is not None:
    y = np_nearest(residual, x.shape[1], x.shape[2])
    z = 1.0 / (1.0 + np.exp(-np_conv(np.concatenate([x, y], -1), p['att_conv']['kernel'], p['att_conv']['bias'])))
    x = x * z[..., 0:1] + y * z[..., 1:2]
  if x.shape[1:3] != tuple(out_hw):
    x = np_nearest(x, *out_hw)
  return np_bn(np_conv(x, p['conv2']['kernel']), p['bn2'], s['bn2']), x


def test_abf_matches_numpy_with_fixed_weights():
  rng = np.random.RandomState(1)
  x, residual = rng.normal(size=(2, 4, 4, 3)), rng.normal(size=(2, 2, 2, 5))
  abf = review.ABF(mid_channels=5, out_channels=6, fuse=True)
  variables = _randomize(abf.init(jax.random.key(0), jnp.asarray(x, jnp.float32), jnp.asarray(residual, jnp.float32),
                                  (8, 8), False), 2)
  out, res = abf.apply(variables, jnp.asarray(x, jnp.float32), jnp.asarray(residual, jnp.float32), (8, 8), False)
  want_out, want_res = np_abf(_np(variables['params']), _np(variables['batch_stats']), x, residual, (8, 8))
  assert out.shape == (2, 8, 8, 6) and res.shape == (2, 8, 8, 5)
  np.testing.assert_allclose(np.asarray(res), want_res, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out), want_out, rtol=1e-4, atol=1e-4)


def _review_pair(rng):
  # student stages 16x16x3, 8x8x4 (+ embedding 4); teacher stages 16x16x6, 8x8x7 (+ embedding 7)
  s_feats = [rng.normal(size=(2, 16, 16, 2)), rng.normal(size=(2, 16, 16, 3)), rng.normal(size=(2, 8, 8, 4))]
  t_pre = [rng.normal(size=(2, 16, 16, 2)), rng.normal(size=(2, 16, 16, 6)), rng.normal(size=(2, 8, 8, 7))]
  student = _output(s_feats, [f - 1.0 for f in s_feats], rng.normal(size=(2, 4)))
  teacher = _output([np.maximum(f, 0) for f in t_pre], t_pre, rng.normal(size=(2, 7)))
  return student, teacher


def test_reviewkd_module_and_loss_match_numpy():
  rng = np.random.RandomState(3)
  student, teacher = _review_pair(rng)
  cfg = _cfg()
  module = review._module(cfg, student, teacher, None)
  assert module.mid_channels == 4 and module.teacher_channels == (6, 7, 7)
  assert module.teacher_hw == ((16, 16), (8, 8), (1, 1))
  kw = dict(labels=None, indices=None, train=False, teacher_classify=None)
  variables = _randomize(module.init(jax.random.key(0), student, teacher, **kw), 4)
  out = module.apply(variables, student, teacher, **kw)
  p, s = _np(variables['params']), _np(variables['batch_stats'])
  # The reference's forward: the reversed list [pooled, f3, f2, f1]; the first ABF has no fusion.
  levels = [np.asarray(f, np.float64) for f in student.features[1:]] + [np.asarray(student.embedding)[:, None, None]]
  results, residual = [None] * 3, None
  for i in (2, 1, 0):
    results[i], residual = np_abf(p[f'abf{i}'], s[f'abf{i}'], levels[i], residual, module.teacher_hw[i])
  for got, want in zip(out['results'], results):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
  t_levels = [np.asarray(f, np.float64) for f in teacher.preact[1:]] + [np.asarray(teacher.embedding)[:, None, None]]
  want = np_hcl(results, t_levels)
  # mdistiller: min(epoch / warmup, 1) with its epoch counted from 1; our ctx.epoch is epochs done (fractional).
  for epoch, factor in ((0.5, 1 / 20), (4.99, 5 / 20), (19.0, 1.0), (30.0, 1.0)):
    got = review.reviewkd_loss(_ctx(student, teacher, {'reviewkd': out}, epoch), cfg)
    np.testing.assert_allclose(float(got), factor * want, rtol=1e-4)


def test_reviewkd_gradient_reaches_every_abf_and_the_student_maps():
  rng = np.random.RandomState(5)
  student, teacher = _review_pair(rng)
  module = review._module(_cfg(), student, teacher, None)
  kw = dict(labels=None, indices=None, train=False, teacher_classify=None)
  variables = module.init(jax.random.key(0), student, teacher, **kw)

  def loss(params, student):
    out = module.apply({**variables, 'params': params}, student, teacher, **kw)
    return review.reviewkd_loss(_ctx(student, teacher, {'reviewkd': out}), _cfg())

  g_params, g_student = jax.grad(loss, argnums=(0, 1))(variables['params'], student)
  for i in range(3):  # the fusion of the deeper levels reaches each ABF, the attention conv included
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_params[f'abf{i}'])), i
  for g in (*g_student.features[1:], g_student.embedding):
    assert float(jnp.abs(g).max()) > 0
  assert float(jnp.abs(g_student.features[0]).max()) == 0  # the stem is not a ReviewKD level


def test_reviewkd_refuses_unequal_stage_counts():
  rng = np.random.RandomState(0)
  student, teacher = _review_pair(rng)
  teacher = teacher.replace(preact=teacher.preact[:2])
  with pytest.raises(ConfigError, match='reviewkd'):
    review._check(_cfg(), student, teacher, None)


# -------------------------------------------------------------------------------------------------------- OFD
def np_margin(gamma, beta):
  out = []
  for g, b in zip(gamma, beta):
    s, m = abs(g), b
    cdf = 0.5 * (1.0 + math.erf(-m / s / math.sqrt(2.0)))
    if cdf > 0.001:
      out.append(-s * math.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi) / cdf + m)
    else:
      out.append(-3 * s)
  return np.array(out)


def np_ofd_feat_loss(source, target, margin):
  loss = ((source - margin) ** 2 * ((source > margin) & (target <= margin))
          + (source - target) ** 2 * ((source > target) & (target > margin) & (target <= 0))
          + (source - target) ** 2 * (target > 0))
  return np.abs(loss).mean(axis=0).sum()


def test_ofd_margin_matches_the_gaussian_formula():
  gamma = np.array([1.0, -0.7, 0.3, 2.0, 1.0, 0.5])
  beta = np.array([0.0, 0.4, -0.2, 1.5, 4.0, -3.0])  # beta/|gamma| = 4: Phi(-4) < 0.001 -> -3|gamma|
  got = np.asarray(ofd.ofd_margin(jnp.asarray(gamma), jnp.asarray(beta)))
  np.testing.assert_allclose(got, np_margin(gamma, beta), rtol=1e-5, atol=1e-6)
  assert got[4] == pytest.approx(-3.0)
  # E[x | x < 0] for N(0, 1) is -sqrt(2 / pi).
  assert got[0] == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-5)


def test_ofd_partial_l2_matches_numpy():
  rng = np.random.RandomState(6)
  source, target = rng.normal(size=(3, 4, 4, 5)), rng.normal(size=(3, 4, 4, 5))
  margin = -np.abs(rng.normal(size=(5,)))
  got = ofd.ofd_feat_loss(jnp.asarray(source, jnp.float32), jnp.asarray(target, jnp.float32), jnp.asarray(margin))
  np.testing.assert_allclose(float(got), np_ofd_feat_loss(source, target, margin), rtol=1e-5)


def _tiny(name, num_classes=5, seed=0, hw=8):
  model = models.create(name, num_classes=num_classes)
  x = jnp.asarray(np.random.RandomState(seed).normal(size=(2, hw, hw, 3)), jnp.float32)
  variables = _randomize(model.init(jax.random.key(seed), x), seed + 10)
  return model, variables, model.apply(variables, x)


def _info(student, teacher):
  return distill.DataInfo(num_train=10, num_classes=5, student=student, teacher=teacher)


def test_ofd_module_reads_the_teacher_bn_and_matches_numpy():
  s_model, s_vars, s_out = _tiny('resnet8', seed=1)
  t_model, t_vars, t_out = _tiny('resnet14', seed=2)  # depth 14: two blocks per stage, BN2 of block 1 is the tap
  cfg = _cfg()
  module = ofd._module(cfg, s_out, t_out, _info(s_model, t_model))
  assert module.bn_paths == tuple(('backbone', f'layer{i}_1', 'bn2') for i in (1, 2, 3))
  kw = dict(labels=None, indices=None, train=False, teacher_classify=None)
  variables = _randomize(module.init(jax.random.key(0), s_out, t_out, teacher_variables=t_vars, **kw), 7)

  def loss(params, t_vars):
    out = module.apply({**variables, 'params': params}, s_out, t_out, teacher_variables=t_vars, **kw)
    return ofd.ofd_loss(_ctx(s_out, t_out, {'ofd': out}), cfg), out

  (got, out), (g_params, g_teacher) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      variables['params'], t_vars)
  p, st, tp = _np(variables['params']), _np(variables['batch_stats']), _np(t_vars['params']['backbone'])
  want, n = 0.0, 3
  for i in range(n):
    bn = tp[f'layer{i + 1}_1']['bn2']
    margin = np_margin(bn['scale'], bn['bias'])
    np.testing.assert_allclose(np.asarray(out['margins'][i]), margin, rtol=1e-5, atol=1e-6)
    src = np_bn(np_conv(np.asarray(s_out.preact[i + 1], np.float64), p[f'connector{i}_conv']['kernel']),
                p[f'connector{i}_bn'], st[f'connector{i}_bn'])
    tgt = np.asarray(t_out.preact[i + 1], np.float64)
    tgt = np_pool(tgt, *src.shape[1:3])
    want += np_ofd_feat_loss(src, tgt, margin) / 2 ** (n - i - 1)
  np.testing.assert_allclose(float(got), want, rtol=1e-4)
  # The margins are constants of the frozen teacher: no gradient reaches its BN parameters through them.
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(g_teacher))
  assert float(jnp.abs(g_params['connector2_conv']['kernel']).max()) > 0


def test_ofd_bn_paths_per_teacher_family():
  for name, want in (('wrn_16_1', [('backbone', 'block2_0', 'bn1'), ('backbone', 'block3_0', 'bn1'),
                                   ('backbone', 'bn1')]),
                     ('vgg13', [('backbone', f'block{b}_4') for b in (1, 2, 3, 4)]),
                     ('vgg8', [('backbone', f'block{b}_1') for b in (1, 2, 3, 4)]),
                     ('ResNet50', [('backbone', f'layer{i}_{n - 1}', 'bn3') for i, n in zip((1, 2, 3, 4),
                                                                                          (3, 4, 6, 3))])):
    model = models.create(name, num_classes=5)
    assert ofd._bn_paths(model) == want, name
    # every path names a BN whose channels are those of the pre-ReLU tap it stands for
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    outs = jax.eval_shape(model.apply, shapes, jnp.zeros((1, 32, 32, 3)))
    for path, tap in zip(want, outs.preact[1:]):
      node = shapes['params']
      for k in path:
        node = node[k]
      assert node['scale'].shape == (tap.shape[-1],), (name, path)


def test_ofd_refuses_a_teacher_without_bn_before_relu():
  rng = np.random.RandomState(0)
  student, teacher = _review_pair(rng)  # the check reads the teacher's family, not its maps' values
  s_model, t_model = models.create('resnet8', num_classes=5), models.create('MobileNetV2', num_classes=5)
  with pytest.raises(ConfigError, match=r'^ofd .*MobileNetV2'):
    ofd._check(_cfg(), student, teacher, _info(s_model, t_model))
  resnet = models.create('resnet32x4', num_classes=5)
  with pytest.raises(ConfigError, match=r'^ofd: .*CifarResNet has 2 pre-ReLU stage maps but 3'):
    ofd._check(_cfg(), student, teacher, _info(s_model, resnet))
  teacher = teacher.replace(preact=teacher.preact + teacher.preact[-1:])
  ofd._check(_cfg(), student, teacher, _info(s_model, resnet))  # three stages: accepted


# ----------------------------------------------------------------------------------------------------- CAT-KD
def np_cat_loss(cam_s, cam_t, resolution, normalize):
  """CAT_loss on NHWC CAMs at full resolution: pool, optionally L2-normalise each class map, MSE."""
  cam_s, cam_t = np_pool(cam_s, resolution, resolution), np_pool(cam_t, resolution, resolution)
  if normalize:
    unit = lambda x: x / np.maximum(np.sqrt((x * x).sum(axis=(1, 2), keepdims=True)), 1e-12)
    cam_s, cam_t = unit(cam_s), unit(cam_t)
  return np.mean((cam_s - cam_t) ** 2)


@pytest.mark.parametrize('name,kind', [('resnet8', 'features'), ('wrn_16_1', 'relu_preact')])
def test_cat_head_map_is_the_map_the_head_pools(name, kind):
  model, _, out = _tiny(name, seed=3, hw=16)
  assert cat._head_map_kind(model) == kind
  np.testing.assert_allclose(np.asarray(cat.head_map(out, kind).mean(axis=(1, 2))), np.asarray(out.embedding),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('normalize', [False, True])
def test_cat_kd_matches_numpy_and_detaches_the_teacher(normalize):
  s_model, s_vars, s_out = _tiny('resnet8', seed=4)
  t_model, t_vars, t_out = _tiny('wrn_16_1', seed=5)
  cfg = _cfg(cat_kd=dict(normalize=normalize, cam_resolution=2))
  module = cat._module(cfg, s_out, t_out, _info(s_model, t_model))

  def loss(s_params, t_vars):
    s_classify = lambda e: s_model.apply({'params': s_params}, e, method='classify')
    t_classify = lambda e: t_model.apply(t_vars, e, method='classify')
    out = module.apply({}, s_out, t_out, labels=None, indices=None, train=False, teacher_classify=t_classify,
                       student_classify=s_classify)
    return cat.cat_kd_loss(_ctx(s_out, t_out, {'cat_kd': out}), cfg)

  got, (g_s, g_t) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(s_vars['params'], t_vars)
  # CAMs at full resolution with the bias-free 1x1 conv made of each head's weight (CAT-KD tools/train.py).
  fs = np.asarray(s_out.features[-1], np.float64)
  ft = np.maximum(np.asarray(t_out.preact[-1], np.float64), 0.0)
  cam_s = np.einsum('nhwc,ck->nhwk', fs, np.asarray(s_vars['params']['head']['kernel'], np.float64))
  cam_t = np.einsum('nhwc,ck->nhwk', ft, np.asarray(t_vars['params']['head']['kernel'], np.float64))
  np.testing.assert_allclose(float(got), np_cat_loss(cam_s, cam_t, 2, normalize), rtol=1e-4)
  assert float(jnp.abs(g_s['head']['kernel']).max()) > 0
  chex.assert_trees_all_equal(g_s['head']['bias'], jnp.zeros_like(g_s['head']['bias']))  # the CAM has no bias
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(g_t))  # the teacher's CAM is detached


def test_cat_kd_refuses_a_model_whose_pooled_map_is_hidden():
  s_model, t_model = models.create('ShuffleV2', num_classes=5), models.create('resnet8', num_classes=5)
  with pytest.raises(ConfigError, match=r"^cat_kd .*student.*ShuffleNetV2"):
    cat._check(_cfg(), None, None, _info(s_model, t_model))


def test_extras_passes_the_optional_inputs_only_to_the_modules_that_list_them():
  rng = np.random.RandomState(8)
  student, teacher = _review_pair(rng)  # student features[-1]: 8x8x4, teacher's: 8x8x7
  w_s, w_t = rng.normal(size=(4, 5)), rng.normal(size=(7, 5))
  # ReviewKD's module takes neither optional input: it would fail on an unexpected keyword.
  extras = distill.Extras({'reviewkd': review._module(_cfg(), student, teacher, None),
                           'cat_kd': cat.CATKD('features', 'features', 2)})
  kw = dict(labels=None, indices=None, train=False, teacher_variables={'params': {}},
            teacher_classify=lambda e: e @ jnp.asarray(w_t, jnp.float32) + 3.0,
            student_classify=lambda e: e @ jnp.asarray(w_s, jnp.float32) - 2.0)
  out, _ = extras.init_with_output(jax.random.key(0), student, teacher, **kw)
  assert set(out) == {'reviewkd', 'cat_kd'}
  cam_s = np_pool(np.einsum('nhwc,ck->nhwk', np.asarray(student.features[-1], np.float64), w_s), 2, 2)
  cam_t = np_pool(np.einsum('nhwc,ck->nhwk', np.asarray(teacher.features[-1], np.float64), w_t), 2, 2)
  np.testing.assert_allclose(np.asarray(out['cat_kd']['cam_s']), cam_s, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(out['cat_kd']['cam_t']), cam_t, rtol=1e-4, atol=1e-4)
