"""MLKD (its loss and the on-device strong view), the DOT optimizer and several teachers (ensemble, a teacher per
term), each against an independent NumPy computation written from the reference code; and a digits run that
composes three method families with DOT, MLKD and two teachers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import config_lib
from kdjax import teacher as teacher_lib
from kdjax import trainer as trainer_lib
from kdjax import data as data_lib
from kdjax import distill
from kdjax import losses
from kdjax import optim
from kdjax import sharding
from kdjax import step as step_lib
from kdjax import train
from kdjax import validate
from kdjax.data import device as device_data
from kdjax.errors import CheckpointMismatchError, ConfigError
from kdjax.methods import mlkd
from kdjax.models import ModelOutput
from tests.util import digits_config, random_teacher

SMALL = {'channels': (8, 16), 'hidden': (16,)}


# --------------------------------------------------------------------------------------------- NumPy references
def _softmax(z):
  z = z - z.max(1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(1, keepdims=True)


def _np_kd(s, t, temp):  # mdistiller kd_loss, reduce=True
  ps, pt = _softmax(s / temp), _softmax(t / temp)
  return float(np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), 1)) * temp ** 2)


def _np_cc(s, t, temp):
  ps, pt = _softmax(s / temp), _softmax(t / temp)
  return float(np.sum((pt.T @ pt - ps.T @ ps) ** 2) / s.shape[1])


def _np_bc(s, t, temp):
  ps, pt = _softmax(s / temp), _softmax(t / temp)
  return float(np.sum((pt @ pt.T - ps @ ps.T) ** 2) / s.shape[0])


def _np_stand(z):  # logit-standardization-KD's normalize (torch std: ddof 1)
  return (z - z.mean(-1, keepdims=True)) / (1e-7 + z.std(-1, keepdims=True, ddof=1))


def _np_mlkd(sw, tw, ss, ts, stand, base=4.0):
  """KD_ours.forward_train / MLKD.forward_train's loss_kd + loss_cc + loss_bc, KD_WEIGHT left out."""
  pw = _softmax(tw)
  conf, class_conf = pw.max(1), pw.sum(0)
  mask = (conf <= np.percentile(conf, 50)).astype(np.float64)
  class_mask = (class_conf <= np.percentile(class_conf, 50)).astype(np.float64)
  f = _np_stand if stand else (lambda z: z)
  temps = (base, 3.0, 5.0, 2.0, 6.0)  # the code's self.temperature, then 3, 5, 2, 6
  kd_weak = sum((_np_kd(f(sw), f(tw), t) * mask).mean() for t in temps)
  kd_strong = (sum(_np_kd(f(ss), f(ts), t) for t in (base, 3.0, 5.0)) +
               sum(_np_kd(f(sw), f(tw), t) for t in (2.0, 6.0)))
  cc_weak = sum((_np_cc(sw, tw, t) * class_mask).mean() for t in temps)
  bc_weak = sum((_np_bc(sw, tw, t) * mask).mean() for t in temps)
  return kd_weak + kd_strong + cc_weak + bc_weak


def _out(logits):
  logits = jnp.asarray(logits, jnp.float32)
  return ModelOutput(logits=logits, embedding=logits)


# -------------------------------------------------------------------------------------------------------- MLKD
# MLKD, and MLKD + LS as logit-standardization-KD runs it (--logit-stand --base-temp 2: KD.TEMPERATURE = 2).
@pytest.mark.parametrize('stand,base', [(False, 4.0), (True, 2.0)])
def test_mlkd_loss_matches_numpy(stand, base):
  rng = np.random.default_rng(0)
  sw, tw, ss, ts = (rng.normal(scale=3.0, size=(12, 7)) for _ in range(4))
  labels = rng.integers(0, 7, size=12)
  cfg = config_lib.base().distill
  cfg.logit_standardize = stand
  cfg.mlkd.temperatures = (base, 3.0, 5.0, 2.0, 6.0)
  ctx = distill.Context(student=_out(sw), teacher=_out(tw), labels=jnp.asarray(labels), extras={}, epoch=0.0,
                        views={'strong': (_out(ss), _out(ts))})
  got = distill.METHODS['mlkd'].loss(ctx, cfg)
  np.testing.assert_allclose(float(got), _np_mlkd(sw, tw, ss, ts, stand, base), rtol=2e-5)
  # CE(strong), the reference's second CE term.
  ce = np.mean(-np.log(_softmax(ss)[np.arange(12), labels]))
  np.testing.assert_allclose(float(distill.METHODS['ce_strong'].loss(ctx, cfg)), ce, rtol=1e-5)


def test_mlkd_masks_are_detached_and_the_strong_student_gets_gradient():
  rng = np.random.default_rng(1)
  sw, tw, ss, ts = (jnp.asarray(rng.normal(scale=2.0, size=(8, 5)), jnp.float32) for _ in range(4))
  # The masks read the teacher's weak logits under stop_gradient (the reference's .detach()): no gradient.
  g = jax.grad(lambda t: sum(mlkd.confidence_fractions(t)))(tw)
  np.testing.assert_array_equal(np.asarray(g), 0.0)
  temps = (4.0, 3.0, 5.0, 2.0, 6.0)
  g_strong = jax.grad(lambda s: mlkd.mlkd_loss((sw, tw), (s, ts), (sw, tw), temps, 3))(ss)
  assert np.abs(np.asarray(g_strong)).sum() > 0
  # Without strong temperatures the strong view is not read at all (the code's kd_strong falls back to weak).
  g_none = jax.grad(lambda s: mlkd.mlkd_loss((sw, tw), (s, ts), (sw, tw), temps, 0))(ss)
  np.testing.assert_array_equal(np.asarray(g_none), 0.0)


def test_strong_ops_match_numpy():
  rng = np.random.default_rng(2)
  img = rng.integers(0, 256, size=(6, 5, 3)).astype(np.float32)
  ops = {name: fn for name, fn, _, _ in device_data.STRONG_OPS}
  np.testing.assert_allclose(ops['Brightness'](jnp.asarray(img), 0.3), img * 0.3, rtol=1e-6)
  np.testing.assert_array_equal(ops['Solarize'](jnp.asarray(img), 100.0), np.where(img >= 100, 255 - img, img))
  np.testing.assert_array_equal(ops['Posterize'](jnp.asarray(img), 5.7), (img.astype(np.uint8) & 0xF8))
  shifted = np.zeros_like(img)
  shifted[:, :-2] = img[:, 2:]  # PIL's TranslateX (1, 0, v*w, ...): output x samples input x + 2
  np.testing.assert_array_equal(ops['TranslateX'](jnp.asarray(img), 2.0 / 5), shifted)
  gray = img @ np.array([0.299, 0.587, 0.114])
  np.testing.assert_allclose(ops['Color'](jnp.asarray(img), 0.0), np.repeat(gray[..., None], 3, -1), rtol=1e-5)
  np.testing.assert_allclose(ops['Rotate'](jnp.asarray(img), 0.0), img)
  # Cutout: side 2 at (3, 1): the box [2, 4] x [0, 2] (PIL's rectangle includes its far corner).
  cut = np.asarray(device_data.cutout(jnp.asarray(img), 2.0, 3.0, 1.0))
  expected = img.copy()
  expected[0:3, 2:5] = (125, 123, 114)
  np.testing.assert_array_equal(cut, expected)


def test_rand_augment_is_a_pure_function_of_its_key():
  images = jnp.asarray(np.random.default_rng(3).integers(0, 256, size=(16, 8, 8, 1)), jnp.uint8)
  a = device_data.rand_augment(jax.random.key(0), images)
  b = device_data.rand_augment(jax.random.key(0), images)
  c = device_data.rand_augment(jax.random.key(1), images)
  assert a.dtype == jnp.uint8 and a.shape == images.shape
  np.testing.assert_array_equal(a, b)
  assert np.any(np.asarray(a) != np.asarray(c)) and np.any(np.asarray(a) != np.asarray(images))


# --------------------------------------------------------------------------------------------------------- DOT
def _np_dot(p, grads, lr, momentum, delta, wd):
  """mdistiller engine/dot.py's `dot` for parameters reached by both losses: the task buffer (weight decay in)
  at m - delta, the distillation buffer at m + delta; torch's first step copies the gradient into the buffer."""
  buf = buf_kd = None
  for g_task, g_kd in grads:
    d = g_task + wd * p
    buf = d.copy() if buf is None else (momentum - delta) * buf + d
    p = p - lr * buf
    buf_kd = g_kd.copy() if buf_kd is None else (momentum + delta) * buf_kd + g_kd
    p = p - lr * buf_kd
  return p


def test_dot_matches_the_reference_optimizer():
  cfg = digits_config(epochs=1)
  cfg.optimizer.update(name='dot', lr=0.1, momentum=0.9, weight_decay=5e-4, dot_delta=0.075)
  cfg.schedule.name = 'constant'
  tx = optim.optimizer(cfg, steps_per_epoch=5)
  rng = np.random.default_rng(4)
  p0 = rng.normal(size=(6,))
  grads = [(rng.normal(size=(6,)), rng.normal(size=(6,))) for _ in range(5)]
  params = jnp.asarray(p0, jnp.float32)
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(tuple(jnp.asarray(x, jnp.float32) for x in g), state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(np.asarray(params), _np_dot(p0, grads, 0.1, 0.9, 0.075, 5e-4), rtol=1e-5, atol=1e-6)


def test_dot_config_errors():
  cfg = digits_config(epochs=1)
  cfg.optimizer.update(name='dot', momentum=0.95, dot_delta=0.075)
  with pytest.raises(ConfigError, match='dot_delta'):
    validate.check(cfg)
  cfg.optimizer.momentum = 0.9
  cfg.student.freeze_backbone = True
  with pytest.raises(ConfigError, match='frozen backbone'):
    optim.optimizer(cfg, 5)


# ------------------------------------------------------------------------------------------- several teachers
@pytest.fixture(scope='module')
def teachers(tmp_path_factory):
  """Teacher 0 trained for 2 epochs (~85% test accuracy), teacher 1 randomly initialised."""
  root = tmp_path_factory.mktemp('teachers')
  cfg = digits_config('cnn_small', epochs=2)
  cfg.student.kwargs = SMALL
  train.run(cfg, str(root / 't0'))
  return str(root / 't0'), random_teacher(str(root / 't1'), 'cnn_small', seed=1, **SMALL)


def _two_teacher_cfg(teachers, losses_, epochs=1, **overrides):
  cfg = digits_config('cnn_small', losses_, epochs=epochs, **overrides)
  cfg.student.kwargs = SMALL
  cfg.teacher.update(model='cnn_small', kwargs=SMALL, checkpoint=teachers[0])
  cfg.teachers = [dict(model='cnn_small', kwargs=SMALL, checkpoint=teachers[1])]
  cfg.distill.fitnet.hint_layer = 1
  return cfg


def test_ensemble_and_per_term_teachers_feed_the_right_terms(teachers):
  cfg = _two_teacher_cfg(teachers, {'ce': 1.0, 'kd': 1.0, 'fitnet': 1.0})
  cfg.distill.ensemble = True
  cfg.distill.teacher_for = {'fitnet': 1}
  ds = data_lib.load(cfg.data)
  mesh = sharding.make_mesh(1)
  group, variables = teacher_lib.prepare_all(cfg, ds, mesh, train.train_and_evaluate)
  exp = trainer_lib.build(cfg, ds, mesh, group, variables)
  ts = step_lib.student(exp.init_state(), 0)
  x = device_data.normalize(ds.train.images[:16], ds.mean, ds.std, jnp.float32)
  y = jnp.asarray(ds.train.labels[:16])
  ctx, _ = step_lib.forward(exp.parts, ts.params, ts.state, variables, x, y, y, jax.random.key(0), False, 0.0)
  separate = [m.apply(v, x) for m, v in zip(group.modules, variables)]  # each teacher on its own
  np.testing.assert_allclose(ctx.teacher.logits, np.mean([np.asarray(o.logits) for o in separate], 0), rtol=1e-6)
  _, terms = exp.distiller.losses(ctx)
  np.testing.assert_allclose(terms['kd'], losses.kd_loss(ctx.student.logits, ctx.teacher.logits, 4.0), rtol=1e-6)
  # FitNet reads teacher 1's map through a regressor sized for it: its MSE against teacher 1, not teacher 0.
  hint = ctx.extras['fitnet']['hint']
  np.testing.assert_allclose(terms['fitnet'], np.mean((np.asarray(hint) - np.asarray(separate[1].features[1])) ** 2),
                             rtol=1e-5)
  assert not np.allclose(np.asarray(separate[0].features[1]), np.asarray(separate[1].features[1]))
  # The cached teacher outputs (digits is not augmented) hold both teachers' outputs.
  assert exp.teacher_table is not None


@pytest.mark.slow
def test_cached_outputs_of_several_teachers_give_the_uncached_step(teachers):
  """digits is not augmented, so both teachers' outputs are computed once and read back: the same step as running
  the two teachers every step (a DOT step, MLKD's strong view computed live beside the cached weak outputs)."""
  metrics = {}
  for mode in ('on', 'off'):
    cfg = _two_teacher_cfg(teachers, {'ce': 0.1, 'ce_strong': 0.1, 'kd': 0.9, 'mlkd': 0.9, 'fitnet': 1.0},
                           distill__cache_teacher=mode)
    cfg.distill.update(ensemble=True, teacher_for={'fitnet': 1})
    cfg.optimizer.name = 'dot'
    ds = data_lib.load(cfg.data)
    mesh = sharding.make_mesh(1)
    exp = trainer_lib.build(cfg, ds, mesh, *teacher_lib.prepare_all(cfg, ds, mesh, train.train_and_evaluate))
    assert (exp.teacher_table is not None) == (mode == 'on')
    ts = exp.init_state()
    for i in range(2):
      ts, m = exp.train_chunk(ts, 0, i)
    metrics[mode] = jax.tree.map(np.asarray, m)
  for k in metrics['off']:
    np.testing.assert_allclose(metrics['on'][k], metrics['off'][k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_several_teacher_config_errors(teachers, tmp_path):
  cfg = _two_teacher_cfg(teachers, {'ce': 1.0, 'kd': 1.0})
  cfg.distill.teacher_for = {'kd': 2}
  with pytest.raises(ConfigError, match=r'teacher_for.kd=2: teacher index out of range'):
    validate.check(cfg)
  cfg.distill.teacher_for = {}
  cfg.teachers = [dict(model='resnet_nope')]
  with pytest.raises(ConfigError, match=r"config.teachers\[0\].model: unknown model 'resnet_nope'"):
    validate.check(cfg)
  # An ensemble member trained for another class count is refused when it is loaded, naming its checkpoint.
  other = random_teacher(str(tmp_path / 't5'), 'cnn_small', num_classes=5, **SMALL)
  cfg.teachers = [dict(model='cnn_small', kwargs=SMALL, checkpoint=other)]
  cfg.distill.ensemble = True
  ds = data_lib.load(cfg.data)
  with pytest.raises(CheckpointMismatchError, match='has 5 classes'):
    teacher_lib.prepare_all(cfg, ds, sharding.make_mesh(1), train.train_and_evaluate)


# ------------------------------------------------------------------------------------------ composed digits run
@pytest.mark.slow
def test_three_families_with_dot_mlkd_and_two_teachers_train_on_digits(teachers, tmp_path):
  """kd (logits, the two teachers' ensemble) + at (features, teacher 1) + rkd (embeddings) + MLKD with its strong
  view, trained with DOT: two epochs on digits; the loss falls and both teachers stay frozen."""
  losses_ = {'ce': 0.1, 'ce_strong': 0.1, 'kd': 0.9, 'at': 100.0, 'rkd': 1.0, 'mlkd': 0.9}
  cfg = _two_teacher_cfg(teachers, losses_, epochs=2)
  cfg.distill.ensemble = True
  cfg.distill.teacher_for = {'at': 1}
  cfg.optimizer.update(name='dot', lr=0.01)  # ten loss parts at lr 0.05 diverge on these tiny networks
  summary = train.run(cfg, str(tmp_path))
  records = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  records = [r for r in records if 'epoch' in r]
  assert len(records) == 2
  for name in losses_:
    assert np.isfinite(records[-1][f'loss_{name}'])
  assert records[1]['train_loss'] < records[0]['train_loss']
  for name in ('ce', 'kd', 'mlkd'):
    assert records[1][f'loss_{name}'] < records[0][f'loss_{name}'], name
  exp = summary.trainer
  from tests.util import load_digits_model
  for path, after in zip(teachers, exp.teacher_vars):
    before = load_digits_model(path, 'cnn_small', **SMALL)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, after))
