"""DeiT's distillation token (kdjax/methods/deit.py): the hard and soft losses against a NumPy re-implementation of
facebookresearch/deit losses.py, the one-line refusal of a student without the token, and a digits run of a tiny
distilled ViT whose evaluation reports each head and their average (DeiT's inference rule) as the run's accuracy,
checked against the student's own heads recomputed here."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import distill
from kdjax import methods  # noqa: F401  (registers the methods)
from kdjax import models
from kdjax import train
from kdjax.data import load as load_data
from kdjax.errors import ConfigError
from kdjax.methods import deit
from tests.util import digits_config, load_digits_model, random_teacher


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_deit(s, t, kind, tau):
  """losses.py `DistillationLoss`: hard F.cross_entropy(outputs_kd, teacher.argmax(1)); soft
  F.kl_div(log_softmax(s / T), log_softmax(t / T), reduction='sum', log_target=True) * T * T / s.numel()."""
  s, t = s.astype(np.float64), t.astype(np.float64)
  if kind == 'hard':
    return -np.mean(np_log_softmax(s)[np.arange(len(s)), t.argmax(1)])
  log_s, log_t = np_log_softmax(s / tau), np_log_softmax(t / tau)
  return np.sum(np.exp(log_t) * (log_t - log_s)) * tau * tau / s.size


@pytest.mark.parametrize('kind,tau', [('hard', 1.0), ('soft', 1.0), ('soft', 3.0)])
def test_loss_matches_numpy(kind, tau):
  rng = np.random.default_rng(0)
  s, t = (rng.normal(scale=3.0, size=(16, 10)).astype(np.float32) for _ in range(2))
  got = float(deit.deit_loss(jnp.asarray(s), jnp.asarray(t), kind, tau))
  assert got > 0.05
  np.testing.assert_allclose(got, np_deit(s, t, kind, tau), rtol=1e-5)
  # The term reads the student's distillation head and the teacher's logits, not the class head.
  out = lambda z, d=None: models.ModelOutput(logits=jnp.asarray(z), embedding=jnp.zeros((16, 4)), dist_logits=d)
  ctx = distill.Context(student=out(np.zeros_like(s), jnp.asarray(s)), teacher=out(t), labels=jnp.zeros(16, int),
                        extras={}, epoch=jnp.float32(0))
  cfg = digits_config(losses={'ce': 0.5, 'deit': 0.5}).distill
  cfg.deit.kind, cfg.deit.tau = kind, tau
  np.testing.assert_allclose(float(distill.METHODS['deit'].loss(ctx, cfg)), got, rtol=1e-6)


def test_refuses_a_student_without_the_token(tmp_path):
  teacher = random_teacher(str(tmp_path / 'teacher'), 'cnn_small')
  cfg = digits_config('vit_test', {'ce': 0.5, 'deit': 0.5}, epochs=1)
  cfg.teacher.update(model='cnn_small', checkpoint=teacher)
  with pytest.raises(ConfigError) as e:
    train.run(cfg, str(tmp_path / 'run'))
  assert str(e.value) == ('deit trains the distillation head of a student with a distillation token; this '
                          'student has none (use e.g. deit_tiny_distilled, or student.kwargs.distilled = True on a '
                          'ViT) (student vit_test, teacher cnn_small)')


def test_refuses_a_distilled_student_without_a_term_for_its_second_head(tmp_path):
  cfg = digits_config('vit_test_distilled', {'ce': 1.0}, epochs=1)
  with pytest.raises(ConfigError) as e:
    train.run(cfg, str(tmp_path / 'run'))
  assert str(e.value) == ('student vit_test_distilled has a distillation token, but no term of config.distill.losses '
                          'trains its head (deit would): add one, or use the model without the token')


def _heads(model, variables, images):
  out = model.apply(variables, images)
  return np.asarray(out.cls_logits), np.asarray(out.dist_logits), np.asarray(out.logits)


@pytest.mark.slow
def test_digits_run_of_a_tiny_distilled_vit_reports_each_head_and_their_average(tmp_path):
  """Two students of one program (soft distillation, tau 1 and 4, beside a small 'kd' term on the class head) with
  a random CNN teacher: the class head learns the labels, the distillation head the teacher; the evaluation's heads
  and average equal the student's own."""
  teacher = random_teacher(str(tmp_path / 'teacher'), 'cnn_small')
  cfg = digits_config('vit_test_distilled', {'ce': 0.5, 'deit': 0.5, 'kd': 0.05}, epochs=3, optimizer__lr=0.003)
  cfg.optimizer.name = 'adamw'
  cfg.teacher.update(model='cnn_small', checkpoint=teacher)
  cfg.distill.deit.kind = 'soft'
  cfg.sweep = 'distill.deit.tau=1,4'
  outcome = train.run(cfg, str(tmp_path / 'run'))
  records = [json.loads(l) for l in open(tmp_path / 'run' / 'metrics.jsonl') if '"epoch"' in l]
  assert len(records) == 6 and all(np.isfinite(r['loss_deit']) and np.isfinite(r['loss_kd']) for r in records)

  ds = load_data(cfg.data)
  images = jnp.asarray((ds.test.images / 255.0 - np.array(ds.mean)) / np.array(ds.std), jnp.float32)
  labels = np.asarray(ds.test.labels)
  t_model = models.create('cnn_small', num_classes=10)
  t_logits = np.asarray(t_model.apply(load_digits_model(teacher, 'cnn_small'), images).logits, np.float64)
  t_top1 = t_logits.argmax(1)
  student = models.create('vit_test_distilled', num_classes=10)
  for i, s in enumerate(outcome.summary['students']):
    variables = {'params': jax.tree.map(lambda a: a[i], outcome.state.params['student'])}
    cls, dist, avg = _heads(student, variables, images)
    np.testing.assert_allclose(avg, (cls + dist) / 2, rtol=1e-5, atol=1e-6)
    for key, logits in (('test_cls_head_accuracy', cls), ('test_dist_head_accuracy', dist),
                        ('test_accuracy', avg)):
      assert s[key] == pytest.approx(np.mean(logits.argmax(1) == labels), abs=1.5 / len(labels)), (i, key)
    assert s['test_agreement'] == pytest.approx(np.mean(avg.argmax(1) == t_top1), abs=1.5 / len(labels))
    # The class head learns the labels; the distillation head follows the (random) teacher. Measured (both
    # students): class head 0.71 accurate, distillation head agreeing with the teacher 0.83, the class head 0.09.
    assert s['test_cls_head_accuracy'] > 0.5, s
    assert np.mean(dist.argmax(1) == t_top1) > np.mean(cls.argmax(1) == t_top1) + 0.2, s
    # The agreement metrics of every KD run, recomputed: top-5 agreement and KL(p_teacher || p_student).
    top5 = np.mean([t in np.argsort(-row)[:5] for t, row in zip(t_top1, avg)])
    log_t, log_s = np_log_softmax(t_logits), np_log_softmax(avg.astype(np.float64))
    kl = np.mean(np.sum(np.exp(log_t) * (log_t - log_s), 1))
    assert s['test_top5_agreement'] == pytest.approx(top5, abs=1.5 / len(labels))
    assert s['test_teacher_kl'] == pytest.approx(kl, rel=1e-4) and kl > 0.01
    assert s['test_agreement'] < s['test_top5_agreement'] < 1.0


def test_teacher_agreement_sums_match_numpy_and_skip_padding():
  from kdjax import step
  rng = np.random.default_rng(3)
  s, t = rng.normal(size=(2, 12, 10)) * 2.0
  mask = np.array([1.0] * 9 + [0.0] * 3)
  got = step.teacher_agreement(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(mask))
  keep = mask > 0
  s, t = s[keep], t[keep]
  log_t, log_s = np_log_softmax(t), np_log_softmax(s)
  expected = {'agree': np.sum(s.argmax(1) == t.argmax(1)),
              'agree5': sum(a in np.argsort(-row)[:5] for a, row in zip(t.argmax(1), s)),
              'kl': np.sum(np.exp(log_t) * (log_t - log_s))}
  assert 0 < expected['agree'] < expected['agree5'] < 9
  for k, v in expected.items():
    np.testing.assert_allclose(float(got[k]), v, rtol=1e-5, err_msg=k)


def test_deit_recipes_make_one_program_with_a_scratch_vit():
  """`method=` takes DeiT's hard and soft recipes (they are not configs/cifar100.py methods), zipped with a
  `student.model=` axis that repeats a model: scratch, hard and soft students in one program."""
  from kdjax import sweep as sweep_lib
  from configs import cifar100
  cfg = digits_config('vit_test', {'ce': 1.0}, epochs=1)
  cfg.teacher.update(model='cnn_small', checkpoint='unused')
  cfg.sweep = 'method=ce,deit_hard,deit_soft; student.model=vit_test,vit_test_distilled,vit_test_distilled'
  cfg.sweep_mode = 'zip'
  cfg.seeds = 3
  sweep = sweep_lib.expand(cfg)
  assert sweep.size == 9
  assert sweep.axes['student.model'] == ['vit_test', 'vit_test_distilled']  # each once (the table's columns)
  got = [(g.name, g.sweep.base.student.model, dict(g.sweep.base.distill.losses), g.sweep.base.distill.deit.kind)
         for g in sweep.groups]
  assert got == [('method=ce model=vit_test', 'vit_test', {'ce': 1.0}, 'hard'),
                 ('method=deit_hard model=vit_test_distilled', 'vit_test_distilled', {'ce': 0.5, 'deit': 0.5}, 'hard'),
                 ('method=deit_soft model=vit_test_distilled', 'vit_test_distilled', {'ce': 0.5, 'deit': 0.5}, 'soft')]
  assert 'deit_hard' in distill.recipes() and 'deit_hard' not in distill.recipes(cifar100_only=True)
  assert 'deit_soft' not in cifar100.METHODS
  with pytest.raises(ValueError, match="^configs/cifar100.py: unknown method 'deit_soft'"):
    cifar100.get_config('deit_soft,resnet20,resnet8,digits')
  # A repeated point trains identical students, in either mode; a grid's repeated name is one.
  cfg.sweep = 'method=deit_hard,deit_hard; student.model=vit_test_distilled,vit_test_distilled'
  with pytest.raises(ConfigError, match=r'^config.sweep: the point method=deit_hard student.model=vit_test_distilled '
                     'is given twice'):
    sweep_lib.expand(cfg)
  cfg.sweep_mode = 'grid'
  cfg.sweep = 'method=deit_hard,deit_soft; student.model=vit_test_distilled,vit_test_distilled'
  with pytest.raises(ConfigError, match="^config.sweep.student.model: 'vit_test_distilled' is given twice"):
    sweep_lib.expand(cfg)
