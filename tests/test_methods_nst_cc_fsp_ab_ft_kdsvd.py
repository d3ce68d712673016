"""NST, CC, FSP, AB, FT and KDSVD against NumPy re-implementations of their reference definitions (written from
RepDistiller distiller_zoo/*.py, models/util.py and mdistiller distillers/KDSVD.py, on NCHW arrays as there), their
modules' shapes, their detach points, and the pre-training stage (config.distill.init) in the compiled step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import config_lib
from kdjax import trainer as trainer_lib
from kdjax import data as data_lib
from kdjax import distill
from kdjax import models
from kdjax import optim
from kdjax import sharding
from kdjax import stages
from kdjax import step as step_lib
from kdjax import validate
from kdjax.errors import ConfigError
from kdjax.methods import repdistiller_zoo as zoo

RTOL, ATOL = 2e-5, 1e-6


def _nchw(x):
  return np.transpose(np.asarray(x, np.float64), (0, 3, 1, 2))


def _np_pool(x, size):
  """F.adaptive_avg_pool2d to (size, size) for an NCHW map whose sides are multiples of size."""
  n, c, h, w = x.shape
  return x.reshape(n, c, size, h // size, size, w // size).mean(axis=(3, 5))


def _np_align(a, b):
  ah, bh = a.shape[2], b.shape[2]
  if ah > bh:
    a = _np_pool(a, bh)
  elif ah < bh:
    b = _np_pool(b, ah)
  return a, b


def _np_normalize(x, axis):
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def _maps(key, shapes, relu=False):
  keys = jax.random.split(key, len(shapes))
  out = [jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, shapes)]
  return [jax.nn.relu(x) if relu else x for x in out]


# ------------------------------------------------------------------------------------------------------- NST
def _np_nst(f_s, f_t):
  f_s, f_t = _np_align(_nchw(f_s), _nchw(f_t))
  s = _np_normalize(f_s.reshape(f_s.shape[0], f_s.shape[1], -1), 2)
  t = _np_normalize(f_t.reshape(f_t.shape[0], f_t.shape[1], -1), 2)

  def poly(a, b):  # a.unsqueeze(1) * b.unsqueeze(2), summed over positions, squared
    return ((a[:, None, :, :] * b[:, :, None, :]).sum(-1) ** 2).mean()

  return poly(t, t) + poly(s, s) - 2 * poly(s, t)


def test_nst_matches_numpy_and_detaches_the_teacher_kernel():
  s1, t1, s2, t2 = _maps(jax.random.key(0), [(3, 8, 8, 5), (3, 4, 4, 7), (3, 4, 4, 6), (3, 4, 4, 9)], relu=True)
  np.testing.assert_allclose(zoo.nst_loss(s1, t1), _np_nst(s1, t1), rtol=RTOL, atol=ATOL)  # student map pooled
  np.testing.assert_allclose(zoo.nst_loss(s2, t2), _np_nst(s2, t2), rtol=RTOL, atol=ATOL)
  # The teacher-teacher kernel is detached: the loss's gradient to the teacher map is the cross term's alone.
  cross = lambda t: -2 * zoo.nst_kernel_mean(*[zoo._normalize(jnp.swapaxes(f.reshape(3, -1, f.shape[-1]), 1, 2), -1)
                                               for f in (s2, t)])
  np.testing.assert_allclose(jax.grad(lambda t: zoo.nst_loss(s2, t))(t2), jax.grad(cross)(t2), rtol=1e-5, atol=1e-7)


# -------------------------------------------------------------------------------------------------------- CC
def test_cc_matches_numpy():
  e_s, e_t = _maps(jax.random.key(1), [(6, 4), (6, 4)])
  d = np.abs(np.asarray(e_s, np.float64) - np.asarray(e_t, np.float64))
  expected = np.mean([np.sum(d[i] * d[i + 1]) for i in range(5)])
  np.testing.assert_allclose(zoo.cc_loss(e_s, e_t), expected, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------------------------------- FSP
def _np_fsp(g):
  out = []
  for bot, top in zip(g[:-1], g[1:]):
    bot, top = _np_align(_nchw(bot), _nchw(top))
    b = bot.reshape(bot.shape[0], 1, bot.shape[1], -1)
    t = top.reshape(top.shape[0], top.shape[1], 1, -1)
    out.append((b * t).mean(-1))
  return out


def test_fsp_matches_numpy():
  shapes_s = [(2, 8, 8, 3), (2, 8, 8, 4), (2, 4, 4, 5)]
  feats_s = _maps(jax.random.key(2), shapes_s)
  feats_t = _maps(jax.random.key(3), shapes_s)
  expected = sum(((s - t) ** 2).mean() for s, t in zip(_np_fsp(feats_s), _np_fsp(feats_t)))
  np.testing.assert_allclose(zoo.fsp_loss(feats_s, feats_t), expected, rtol=RTOL, atol=ATOL)
  assert zoo.fsp_matrix(feats_s[1], feats_s[2]).shape == (2, 5, 4)


# -------------------------------------------------------------------------------------------------------- AB
def _np_ab(sources, targets, margin):
  n, bsz, total = len(sources), sources[0].shape[0], 0.0
  for i, (s, t) in enumerate(zip(sources, targets)):
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    loss = ((s + margin) ** 2 * ((s > -margin) & (t <= 0)) + (s - margin) ** 2 * ((s <= margin) & (t > 0)))
    total += 2 ** (i - n + 1) * np.abs(loss).sum() / bsz / 1000 * 3
  return total


def test_ab_matches_numpy_and_connectors_follow_repdistiller():
  src = _maps(jax.random.key(4), [(3, 8, 8, 4), (3, 4, 4, 6), (3, 2, 2, 8)])
  tgt = _maps(jax.random.key(5), [(3, 8, 8, 4), (3, 4, 4, 6), (3, 2, 2, 8)])
  for margin in (1.0, 0.5):
    np.testing.assert_allclose(zoo.ab_loss(src, tgt, margin), _np_ab(src, tgt, margin), rtol=RTOL, atol=ATOL)
  # Identity where channels and heights match, conv -> BN (no ReLU) to the teacher's shape elsewhere.
  out = lambda pre: models.ModelOutput(logits=None, embedding=None, features=pre, preact=pre)
  student = out(tuple(_maps(jax.random.key(6), [(2, 8, 8, 3), (2, 8, 8, 4), (2, 4, 4, 5)])))
  conn = zoo.ABConnector(((8, 8, 4), (2, 2, 7)))
  variables = conn.init(jax.random.key(0), student, None, labels=None, indices=None, train=False,
                        teacher_classify=None)
  assert set(variables['params']) == {'connector1'} and 'batch_stats' in variables
  sources = conn.apply(variables, student, None, labels=None, indices=None, train=False,
                       teacher_classify=None)['sources']
  assert sources[0] is student.preact[1] and sources[1].shape == (2, 2, 2, 7)


# -------------------------------------------------------------------------------------------------------- FT
def _np_factor(f):
  f = _nchw(f)
  return _np_normalize((f ** 2).mean(1).reshape(f.shape[0], -1), 1)


def test_ft_matches_numpy_and_modules_have_the_reference_shapes():
  f_s, f_t = _maps(jax.random.key(7), [(3, 8, 8, 4), (3, 4, 4, 4)])
  a, b = _np_align(_nchw(f_s), _nchw(f_t))
  to_nhwc = lambda x: np.transpose(x, (0, 2, 3, 1))
  expected = np.abs(_np_factor(to_nhwc(a)) - _np_factor(to_nhwc(b))).mean()
  np.testing.assert_allclose(zoo.ft_loss(f_s, f_t), expected, rtol=RTOL, atol=ATOL)

  student = models.ModelOutput(logits=None, embedding=None, features=(f_s, f_s))
  teacher = models.ModelOutput(logits=None, embedding=None, features=(f_t, jnp.ones((3, 4, 4, 12))))
  ft = zoo.FT(12, 0.5)
  call = lambda v, train: ft.apply(v, student, teacher, labels=None, indices=None, train=train,
                                   teacher_classify=None, mutable=['batch_stats'] if train else False)
  variables = ft.init(jax.random.key(0), student, teacher, labels=None, indices=None, train=False,
                      teacher_classify=None)
  out = call(variables, False)
  assert out['factor_t'].shape == (3, 4, 4, 6) and out['reconstruction'].shape == (3, 4, 4, 12)
  assert out['factor_s'].shape == (3, 8, 8, 6)
  shapes = jax.tree.map(jnp.shape, variables['params'])
  # Paraphraser(t_shape=12, k=0.5): 12->12->6->6 conv3x3, 6->6->12->12 convT3x3; Translator(4 -> 6): 4->4->6->6.
  assert [shapes['paraphraser'][f'enc{i}']['kernel'] for i in range(3)] == [(3, 3, 12, 12), (3, 3, 12, 6),
                                                                          (3, 3, 6, 6)]
  # (flax's transposed-kernel layout is [k, k, out, in])
  assert [shapes['paraphraser'][f'dec{i}']['kernel'] for i in range(3)] == [(3, 3, 6, 6), (3, 3, 12, 6),
                                                                          (3, 3, 12, 12)]
  assert [shapes['translator'][f'conv{i}']['kernel'] for i in range(3)] == [(3, 3, 4, 4), (3, 3, 4, 6), (3, 3, 6, 6)]
  assert set(variables['batch_stats']) == {'translator'}  # the paraphraser has no BatchNorm (use_bn=False)
  # The 'ft' term gives the paraphraser no gradient; 'ft_rec' trains only the paraphraser.
  cfg = config_lib.base().distill

  def term(name):
    def f(params):
      extras, _ = call({**variables, 'params': params}, True)
      ctx = distill.Context(student=student, teacher=teacher, labels=None, extras={'ft': extras}, epoch=0.0)
      return distill.METHODS[name].loss(ctx, cfg)
    return jax.grad(f)(variables['params'])

  g_ft, g_rec = term('ft'), term('ft_rec')
  assert all(not np.any(g) for g in jax.tree.leaves(g_ft['paraphraser']))
  assert any(np.any(g) for g in jax.tree.leaves(g_ft['translator']))
  assert all(not np.any(g) for g in jax.tree.leaves(g_rec['translator']))
  assert all(np.any(g) for g in jax.tree.leaves(g_rec['paraphraser']))


# ----------------------------------------------------------------------------------------------------- KDSVD
def _np_kdsvd(g_s, g_t, k, layout):
  """mdistiller kdsvd_loss on NCHW arrays, with the teacher's vectors' sign fixed as kdjax does."""
  def matrix(f):
    f = _nchw(f)
    n, c, h, w = f.shape
    return f.reshape(n, c * h, w) if layout == 'mdistiller' else f.reshape(n, c, h * w).transpose(0, 2, 1)

  def svd(x, n):
    _, s, vh = np.linalg.svd(x, full_matrices=False)
    v = np.swapaxes(vh, -1, -2)
    return _np_normalize(s[:, :n], 1), _np_normalize(v[:, :, :n], 1)

  losses, prev = [], None
  for f_s, f_t in zip(g_s, g_t):
    s_t, v_t = svd(matrix(f_t), k)
    _, v_s = svd(matrix(f_s), k + 3)
    rows = np.abs(v_t).argmax(1)
    v_t = v_t * np.where(np.take_along_axis(v_t, rows[:, None, :], 1) < 0, -1.0, 1.0)
    cosine = np.matmul(np.swapaxes(v_s, -2, -1), v_t)
    mask = np.where(np.abs(cosine).max(1, keepdims=True) == np.abs(cosine), np.sign(cosine), 0.0)
    v_s = np.matmul(v_s, mask)
    v_t, v_s = v_t * s_t[:, None, :], v_s * s_t[:, None, :]
    if prev is not None:
      s_rbf = np.exp(-(v_s[:, :, None] - prev[0][:, None]) ** 2 / 8)
      t_rbf = np.exp(-(v_t[:, :, None] - prev[1][:, None]) ** 2 / 8)
      losses.append(((s_rbf - t_rbf) ** 2).sum())
    prev = (v_s, v_t)
  return sum(l / g_s[0].shape[0] for l in losses)


@pytest.mark.parametrize('layout', ['mdistiller', 'repdistiller'])
def test_kdsvd_matches_numpy(layout):
  shapes = [(2, 8, 8, 6), (2, 4, 4, 6), (2, 4, 4, 6)]
  g_s = _maps(jax.random.key(8), shapes, relu=True)
  g_t = _maps(jax.random.key(9), shapes, relu=True)
  got, grads = jax.jit(jax.value_and_grad(lambda g: zoo.kdsvd_loss(g, g_t, 1, layout)))(g_s)
  np.testing.assert_allclose(got, _np_kdsvd(g_s, g_t, 1, layout), rtol=1e-4, atol=1e-6)
  assert got > 0
  assert all(np.all(np.isfinite(g)) for g in grads) and any(np.any(g) for g in grads)


def test_nst_and_ft_gradients_are_finite_with_a_dead_channel():
  f_s, f_t = _maps(jax.random.key(12), [(2, 4, 4, 3), (2, 4, 4, 3)], relu=True)
  f_s = f_s.at[..., 1].set(0.0)  # a dead channel: its normalised spatial response is the zero vector
  for loss in (zoo.nst_loss, lambda s, t: zoo.ft_loss(s.at[0].set(0.0), t)):
    g = jax.grad(loss)(f_s, f_t)
    assert np.all(np.isfinite(g)) and np.any(g)


def test_kdsvd_sign_of_teacher_vectors_does_not_matter():
  shapes = [(2, 8, 8, 6), (2, 4, 4, 6)]
  g_s, g_t = _maps(jax.random.key(10), shapes, relu=True), _maps(jax.random.key(11), shapes, relu=True)
  flipped = [-f for f in g_t]  # flips every singular vector pair: the fixed sign makes the loss the same
  np.testing.assert_allclose(zoo.kdsvd_loss(g_s, g_t), zoo.kdsvd_loss(g_s, flipped), rtol=1e-5)


# --------------------------------------------------------------------------------------------- checks, configs
def _shapes(model, **kw):
  m = models.create(model, num_classes=100, **kw)
  return jax.eval_shape(lambda: m.apply(m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))), jnp.zeros((2, 32, 32, 3))))


def test_checks_refuse_pairs_in_one_line():
  wrn40_1, wrn40_2 = _shapes('wrn_40_1'), _shapes('wrn_40_2')
  cfg = config_lib.base().distill
  with pytest.raises(ConfigError, match=r'^fsp: needs equal channels') as e:
    distill.METHODS['fsp'].check(cfg, wrn40_1, wrn40_2, None)
  assert '\n' not in str(e.value)
  distill.METHODS['kdsvd'].check(cfg, wrn40_1, wrn40_2, None)  # mdistiller layout: equal widths
  cfg.kdsvd.layout = 'repdistiller'
  with pytest.raises(ConfigError, match=r'^kdsvd: the repdistiller layout .* channels'):
    distill.METHODS['kdsvd'].check(cfg, wrn40_1, wrn40_2, None)
  with pytest.raises(ConfigError, match=r"^ft_rec: .*add 'ft'"):
    distill.METHODS['ft_rec'].check(config_lib.base().distill, wrn40_1, wrn40_2, None)


def test_reference_weights_and_stages():
  assert distill.reference_weights('nst') == {'ce': 1.0, 'nst': 50.0}
  assert distill.reference_weights('cc') == {'ce': 1.0, 'cc': 0.02}
  assert distill.reference_weights('ft') == {'ce': 1.0, 'ft': 200.0}
  cfg = config_lib.base()
  cfg.student.model, cfg.teacher.model = 'resnet8x4', 'resnet32x4'
  cfg.distill.losses = {'ce': 1.0, 'ab': 0.0}
  cfg.distill.init = dict(distill.reference_init('ab'), epochs=30)
  cfg.epochs = 270
  validate.check(cfg)
  for field, value, match in (('epochs', 270, 'leaves no main training'), ('losses', {'nope': 1.0}, 'unknown'),
                              ('losses', {'ab': 0.0}, 'no term with a positive weight'),
                              ('train', (), 'is empty'), ('train', ('',), 'tuple of parameter paths')):
    bad = cfg.copy_and_resolve_references()
    bad.distill.init[field] = value
    with pytest.raises(ConfigError, match=match):
      validate.check(bad)


def test_schedule_runs_the_stage_rate_then_the_main_schedule_from_the_stage_end():
  cfg = config_lib.base()
  cfg.epochs, cfg.optimizer.lr = 12, 0.05
  cfg.schedule.update(name='step', decay_epochs=(5,), decay_factor=0.1)
  cfg.distill.init = dict(epochs=2, losses={'fsp': 1.0}, train=('student/backbone',), lr=0.01)
  lr = optim.schedule(cfg, 10)
  assert [float(lr(s)) for s in (0, 19)] == pytest.approx([0.01, 0.01])
  assert [float(lr(s)) for s in (20, 69, 70, 119)] == pytest.approx([0.05, 0.05, 0.005, 0.005])


# ------------------------------------------------------------------------------------------ the stage in the step
def _tiny_experiment():
  rng = np.random.RandomState(0)
  split = lambda n: data_lib.Split(rng.randint(0, 256, (n, 8, 8, 1), dtype=np.uint8),
                                   rng.randint(0, 10, (n,)).astype(np.int32))
  ds = data_lib.Dataset('synthetic_digits', 10, split(32), split(16), None, (0.5,), (0.25,), 'none')
  cfg = config_lib.base()
  cfg.student.model, cfg.teacher.model = 'cnn_small', 'cnn_small'
  cfg.student.kwargs = {'channels': (8, 16), 'hidden': (16,)}
  cfg.batch_size, cfg.eval_batch_size, cfg.epochs, cfg.num_devices = 16, 16, 3, 1
  cfg.distill.cache_teacher = 'off'
  cfg.distill.losses = {'ce': 1.0, 'ft': 200.0, 'ab': 0.0}
  cfg.distill.init = dict(epochs=1, losses={'ft_rec': 1.0, 'ab': 1.0}, lr=0.01,
                          train=('student/backbone', 'extras/ab', 'extras/ft/paraphraser'),
                          freeze_after=('extras/ab', 'extras/ft/paraphraser'))
  validate.check(cfg)
  teacher = models.create('cnn_small', num_classes=10)
  t_vars = teacher.init(jax.random.key(1), jnp.zeros((1, 8, 8, 1)))
  return trainer_lib.build(cfg, ds, sharding.make_mesh(1), teacher, t_vars)


def _np_tree(tree):
  return jax.tree.map(np.array, jax.device_get(tree))


def _same(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _moved(a, b):
  return all(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_the_stage_trains_only_its_parameters_then_the_main_losses_apply():
  exp = _tiny_experiment()
  assert exp.steps_per_epoch == 2 and exp.init_steps == 2 and exp.k == 1
  ts = exp.init_state()
  history = [(_np_tree(ts.params), _np_tree(ts.state), None)]
  for epoch in range(2):
    for start in range(2):
      ts, metrics = exp.train_chunk(ts, epoch, start)
      history.append((_np_tree(ts.params), _np_tree(ts.state), _np_tree(metrics), _np_tree(ts.opt_state)))
      if (epoch, start) == (0, 1):
        saved = _np_tree(ts)  # the end of the stage, as a checkpoint holds it
  sub = lambda t, *keys: [t := t[k] for k in keys][-1]
  (p0, s0, _), (p2, s2, m2, _), (p3, s3, m3, o3) = history[0], history[2], history[3]
  # Stage (2 steps): backbone, connectors (and their BN statistics) and paraphraser move; the head, the translator
  # and its statistics stay bit-identical. The loss is the stage's terms at weight 1.
  for keys in (('student', 'backbone'), ('extras', 'ab'), ('extras', 'ft', 'paraphraser')):
    assert _moved(sub(p2, *keys), sub(p0, *keys)), keys
  for keys in (('student', 'head'), ('extras', 'ft', 'translator')):
    assert _same(sub(p2, *keys), sub(p0, *keys)), keys
  assert _moved(sub(s2, 'extras', 'batch_stats', 'ab'), sub(s0, 'extras', 'batch_stats', 'ab'))
  assert _same(sub(s2, 'extras', 'batch_stats', 'ft'), sub(s0, 'extras', 'batch_stats', 'ft'))
  np.testing.assert_allclose(m2['loss'], m2['loss_ft_rec'] + m2['loss_ab'], rtol=1e-6)
  # Main (from step 2): the frozen paraphraser and connectors keep the stage's values (statistics too); the student
  # and the translator train on ce + 200 ft.
  for keys in (('extras', 'ab'), ('extras', 'ft', 'paraphraser')):
    assert _same(sub(p3, *keys), sub(p2, *keys)), keys
  assert _same(sub(s3, 'extras', 'batch_stats', 'ab'), sub(s2, 'extras', 'batch_stats', 'ab'))
  for keys in (('student', 'head'), ('student', 'backbone'), ('extras', 'ft', 'translator')):
    assert _moved(sub(p3, *keys), sub(p2, *keys)), keys
  np.testing.assert_allclose(m3['loss'], m3['loss_ce'] + 200 * m3['loss_ft'], rtol=1e-6)
  # The main stage starts with fresh momentum: the paraphraser gets no gradient there, so after the first main step
  # its momentum buffer is exactly weight_decay * p (0.9 * the stage's buffer + that, without the restart).
  trace = optax.tree_utils.tree_get(o3, 'trace')
  para = sub(p3, 'extras', 'ft', 'paraphraser')
  for buf, p in zip(jax.tree.leaves(trace['extras']['ft']['paraphraser']), jax.tree.leaves(para)):
    np.testing.assert_allclose(buf, 5e-4 * p, rtol=1e-6, atol=1e-12)
  # Resumed from the state at the stage's end, the main stage runs the same steps (the stage is read from ts.step).
  resumed, _ = exp.train_chunk(jax.device_put(saved), 1, 0)
  assert _same(_np_tree(resumed.params), p3) and _same(_np_tree(resumed.opt_state), o3)
  # A train-state path that names nothing is refused in one line (when the step is traced).
  cfg = exp.cfg.copy_and_resolve_references()
  cfg.distill.init.train = ('extras/nope',)
  with pytest.raises(ConfigError, match=r"distill\.init\.train: 'extras/nope' names no parameter"):
    stages.Masks(cfg, p3, tuple(exp.distiller.terms))
