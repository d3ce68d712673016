"""The logit frontier: logit standardization on every logit term, DIST, NKD and CTKD against NumPy re-implementations
written from the reference code (image_classification_sota dist_kd.py, cls_KD nkd.py, zhengli97/CTKD), CTKD's
gradient reversal and curriculum, the LS configs, and one shared digits run of the three new terms."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import config_lib
from kdjax import distill
from kdjax import losses
from kdjax import methods  # noqa: F401  (registers the methods)
from kdjax import models
from kdjax import train
from kdjax.methods import logit
from tests.util import config_module, digits_config, load_digits_model, np_log_softmax, np_softmax, random_teacher



CIFAR100 = config_module('cifar100.py')


# --------------------------------------------------------------------------------------------- NumPy references


def np_standardize(z):
  # logit-standardization-KD mdistiller/distillers/KD.py `normalize`: torch's std is the unbiased one.
  return (z - z.mean(-1, keepdims=True)) / (1e-7 + z.std(-1, ddof=1, keepdims=True))


def np_kd(s, t, temp):
  p_t = np_softmax(t / temp)
  return (p_t * (np_log_softmax(t / temp) - np_log_softmax(s / temp))).sum(1).mean() * temp ** 2


def np_dist(s, t, beta, gamma, tau):
  # DIST: 1 - mean Pearson r over the rows (inter-class) and over the columns (intra-class) of softmax(z / tau).
  y_s, y_t = np_softmax(s / tau), np_softmax(t / tau)
  inter = 1 - np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(y_s, y_t)])
  intra = 1 - np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(y_s.T, y_t.T)])
  return tau ** 2 * (beta * inter + gamma * intra)


def np_nkd(s, t, labels, temp, gamma):
  # cls_KD NKDLoss.forward: the target term at T = 1; the non-target classes cut out (the boolean mask), then
  # softmax at temp among them.
  n, c = s.shape
  rows = np.arange(n)
  loss_t = -(np_softmax(t)[rows, labels] * np_log_softmax(s)[rows, labels]).mean()
  keep = np.ones((n, c), bool)
  keep[rows, labels] = False
  s_non, t_non = s[keep].reshape(n, c - 1), t[keep].reshape(n, c - 1)
  loss_non = (np_softmax(t_non / temp) * np_log_softmax(s_non / temp)).sum(1).mean()
  return loss_t - gamma * temp ** 2 * loss_non


def np_ctkd_decay(epoch_number, max_value, min_value, num_loops):
  # zhengli97/CTKD train_student.py CosineDecay.get_value
  i = min(max(epoch_number, 0), num_loops)
  value = (math.cos(i * math.pi / num_loops) + 1.0) * 0.5
  return value * (max_value - min_value) + min_value


def _logits(seed, b=6, c=9, scale=3.0):
  rng = np.random.RandomState(seed)
  return (rng.randn(b, c) * scale + 1).astype(np.float32), (rng.randn(b, c) * scale * 2).astype(np.float32), \
      rng.randint(0, c, b)


def _ctx(s, t, labels, epoch=0.0, global_t=1.0):
  out = lambda z: models.ModelOutput(logits=jnp.asarray(z), embedding=jnp.zeros((z.shape[0], 1)))
  return distill.Context(student=out(s), teacher=out(t), labels=jnp.asarray(labels),
                         extras={'ctkd': {'global_t': jnp.float32(global_t)}}, epoch=jnp.float32(epoch))


def _cfg(**kw):
  c = config_lib.base().distill
  c.update(kw)
  return c


# ------------------------------------------------------------------------------------------ the three new terms
def test_dist_matches_numpy():
  s, t, _ = _logits(0)
  for beta, gamma, tau in ((1.0, 1.0, 4.0), (2.0, 0.5, 1.0)):
    np.testing.assert_allclose(logit.dist_loss(s, t, beta, gamma, tau), np_dist(s, t, beta, gamma, tau),
                               rtol=2e-5, atol=1e-6)
  cfg = _cfg()  # the defaults: beta 1, gamma 1, tau 4
  np.testing.assert_allclose(distill.METHODS['dist'].loss(_ctx(s, t, _), cfg), np_dist(s, t, 1.0, 1.0, 4.0),
                             rtol=2e-5, atol=1e-6)
  # One example: every class column is constant across the batch; the loss and its gradient stay finite.
  g = jax.grad(lambda z: logit.dist_loss(z, t[:1]))(jnp.asarray(s[:1]))
  assert np.all(np.isfinite(np.asarray(g)))


def test_nkd_matches_numpy_and_detaches_the_teacher_target():
  s, t, labels = _logits(1)
  for temp, gamma in ((3.0, 3.5), (1.0, 1.5)):
    np.testing.assert_allclose(logit.nkd_loss(s, t, labels, temp, gamma), np_nkd(s, t, labels, temp, gamma),
                               rtol=1e-5)
  np.testing.assert_allclose(distill.METHODS['nkd'].loss(_ctx(s, t, labels), _cfg()), np_nkd(s, t, labels, 3.0, 3.5),
                             rtol=1e-5)
  # The reference detaches the teacher's target probability: with gamma 0 nothing flows to the teacher.
  g_t = jax.grad(lambda z: logit.nkd_loss(s, z, labels, 3.0, 0.0))(jnp.asarray(t))
  np.testing.assert_array_equal(np.asarray(g_t), 0.0)
  # The student's gradient is finite, and zero through nothing else than its own logits' target-free softmax.
  g_s = jax.grad(lambda z: logit.nkd_loss(z, t, labels, 3.0, 3.5))(jnp.asarray(s))
  assert np.all(np.isfinite(np.asarray(g_s)))


def test_ctkd_schedule_is_the_reference_cosine_decay():
  # Our epoch is the fractional count of completed epochs; the reference's epoch number starts at 1.
  for epoch, number in ((0.0, 1), (0.7, 1), (4.2, 5), (9.0, 10), (9.99, 10), (37.0, 38)):
    want = -np_ctkd_decay(number, 0.0, -1.0, 10)
    assert float(logit.ctkd_lambda(epoch, 1.0, 10.0)) == pytest.approx(want, abs=1e-6), epoch
    assert float(logit.ctkd_lambda(epoch, 0.5, 4.0)) == pytest.approx(-np_ctkd_decay(number, 0.0, -0.5, 4),
                                                                      abs=1e-6), epoch
  assert float(logit.ctkd_lambda(0.0, 1.0, 10.0)) == pytest.approx((1 - math.cos(math.pi / 10)) / 2)
  assert float(logit.ctkd_lambda(12.0, 1.0, 10.0)) == 1.0


def test_ctkd_loss_and_gradient_reversal():
  s, t, labels = _logits(2)
  cfg = _cfg()
  g0, epoch = 0.3, 4.5  # epoch number 5: lambda = (1 - cos(pi / 2)) / 2 = 0.5
  lam = -np_ctkd_decay(5, 0.0, -1.0, 10)
  assert lam == pytest.approx(0.5)
  temp = lambda g: 1.0 + 20.0 / (1.0 + np.exp(-g))
  loss = lambda g: np_kd(s.astype(np.float64), t.astype(np.float64), temp(g))
  np.testing.assert_allclose(distill.METHODS['ctkd'].loss(_ctx(s, t, labels, epoch, g0), cfg), loss(g0), rtol=1e-5)
  # Forward is KD at the learned temperature (1 + 20 sigmoid(1) = 15.62 at initialisation).
  np.testing.assert_allclose(distill.METHODS['ctkd'].loss(_ctx(s, t, labels, 0.0, 1.0), cfg), loss(1.0), rtol=1e-5)

  grad_g = jax.grad(lambda g: distill.METHODS['ctkd'].loss(_ctx(s, t, labels, epoch, g), cfg))(jnp.float32(g0))
  h = 1e-5
  ordinary = (loss(g0 + h) - loss(g0 - h)) / (2 * h)  # central difference, float64
  assert abs(ordinary) > 1e-4  # a real gradient to reverse
  np.testing.assert_allclose(float(grad_g), -lam * ordinary, rtol=1e-3)
  # The student's logits see the plain KD gradient at that temperature: the reversal touches the temperature only.
  grad_s = jax.grad(lambda z: distill.METHODS['ctkd'].loss(_ctx(z, t, labels, epoch, g0), cfg))(jnp.asarray(s))
  want_s = jax.grad(lambda z: losses.kd_loss(z, t, float(temp(g0))))(jnp.asarray(s))
  np.testing.assert_allclose(np.asarray(grad_s), np.asarray(want_s), rtol=1e-4, atol=1e-7)
  # The reversal itself: identity forward, -lambda x the cotangent backward.
  y, vjp = jax.vjp(lambda x: logit.gradient_reversal(x, jnp.float32(0.25)), jnp.arange(3.0))
  np.testing.assert_array_equal(np.asarray(y), [0.0, 1.0, 2.0])
  np.testing.assert_allclose(np.asarray(vjp(jnp.asarray([1.0, -2.0, 4.0]))[0]), [-0.25, 0.5, -1.0])


# --------------------------------------------------------------------------------------- logit standardization
@pytest.mark.parametrize('term', ['kd', 'dkd', 'dist', 'nkd', 'ctkd'])
def test_every_logit_term_reads_standardized_logits(term):
  """The term with `logit_standardize` on equals the same term with it off on (NumPy-)standardized logits."""
  s, t, labels = _logits(3, b=5, c=7)
  cfg_on, cfg_off = _cfg(temperature=2.0, logit_standardize=True), _cfg(temperature=2.0)
  cfg_on.dkd.temperature = cfg_off.dkd.temperature = 2.0
  on = distill.METHODS[term].loss(_ctx(s, t, labels, 25.0, 0.4), cfg_on)
  off = distill.METHODS[term].loss(_ctx(np_standardize(s), np_standardize(t), labels, 25.0, 0.4), cfg_off)
  np.testing.assert_allclose(on, off, rtol=2e-5, atol=1e-6)
  raw = distill.METHODS[term].loss(_ctx(s, t, labels, 25.0, 0.4), cfg_off)
  assert not np.allclose(on, raw, rtol=1e-3)


def test_ls_configs_carry_the_authors_settings():
  kd = CIFAR100.get_config('kd,resnet32x4,resnet8x4,ls').distill
  assert kd.logit_standardize and dict(kd.losses) == {'ce': 0.1, 'kd': 9.0} and kd.temperature == 2.0
  dkd = CIFAR100.get_config('dkd,resnet32x4,resnet8x4,ls').distill
  assert dkd.logit_standardize and dict(dkd.losses) == {'ce': 1.0, 'dkd': 1.0}
  assert (dkd.dkd.alpha, dkd.dkd.beta, dkd.dkd.temperature, dkd.dkd.warmup_epochs) == (9.0, 72.0, 2.0, 20)
  assert CIFAR100.get_config('ls,dkd,resnet56,resnet20').distill.dkd.beta == 18.0  # 9 x mdistiller's pair beta 2
  ctkd = CIFAR100.get_config('ctkd,resnet32x4,resnet8x4,ls').distill
  assert ctkd.logit_standardize and dict(ctkd.losses) == {'ce': 0.1, 'ctkd': 9.0}
  assert (ctkd.ctkd.t_start, ctkd.ctkd.t_end) == (1.0, 20.0)
  plain = CIFAR100.get_config('dkd,resnet32x4,resnet8x4').distill
  assert not plain.logit_standardize and (plain.dkd.alpha, plain.dkd.beta, plain.dkd.temperature) == (1.0, 8.0, 4.0)
  assert CIFAR100.get_config('kd,ls,digits').distill.logit_standardize
  with pytest.raises(ValueError, match="no 'ls' settings for 'fitnet'; the ls item applies to kd, dkd, ctkd"):
    CIFAR100.get_config('fitnet,resnet32x4,resnet8x4,ls')


def test_reference_configs_of_the_new_methods():
  dist = CIFAR100.get_config('dist,resnet32x4,resnet8x4').distill
  assert dict(dist.losses) == {'ce': 1.0, 'dist': 2.0} and dict(dist.dist) == {'beta': 1.0, 'gamma': 1.0, 'tau': 4.0}
  nkd = CIFAR100.get_config('nkd,resnet32x4,resnet8x4').distill
  assert dict(nkd.losses) == {'ce': 1.0, 'nkd': 1.0} and (nkd.nkd.temperature, nkd.nkd.gamma) == (3.0, 3.5)
  ctkd = CIFAR100.get_config('ctkd,resnet32x4,resnet8x4').distill
  assert dict(ctkd.losses) == {'ce': 0.1, 'ctkd': 0.9}
  assert dict(ctkd.ctkd) == {'t_start': 1.0, 't_end': 20.0, 'lambda_max': 1.0, 'loops': 10.0}


# -------------------------------------------------------------------------------------------- one digits run
@pytest.mark.slow
def test_new_terms_train_on_digits_with_a_learned_temperature_per_student(tmp_path):
  """DIST + NKD + CTKD (with LS) at once, two students of a t_end sweep: the temperature is a trained parameter of
  each student (stacked on the students axis, in the train state), the teacher stays frozen."""
  teacher = random_teacher(str(tmp_path / 'teacher'), 'cnn_small')
  cfg = digits_config('cnn_small', {'ce': 0.1, 'dist': 1.0, 'nkd': 1.0, 'ctkd': 0.9}, epochs=1)
  cfg.student.kwargs = {'channels': (16, 32), 'hidden': (32,)}
  cfg.teacher.update(model='cnn_small', checkpoint=teacher)
  cfg.distill.logit_standardize = True
  cfg.sweep = 'distill.ctkd.t_end=10,20'
  before = load_digits_model(teacher, 'cnn_small')
  summary = train.run(cfg, str(tmp_path / 'run'))
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, summary.trainer.teacher_vars))
  global_t = np.asarray(summary.state.params['extras']['ctkd']['global_t'])
  assert global_t.shape == (2,) and np.all(np.isfinite(global_t))
  assert np.all(global_t != 1.0) and global_t[0] != global_t[1]
  records = [json.loads(l) for l in open(tmp_path / 'run' / 'metrics.jsonl') if '"epoch"' in l]
  assert len(records) == 2
  for r in records:
    for term in ('dist', 'nkd', 'ctkd'):
      assert np.isfinite(r[f'loss_{term}']) and r[f'loss_{term}'] > 0
