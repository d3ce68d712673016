"""The distillation engine on digits: SimKD and its variants, subclass distillation, omitted class, fine-tuning."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import config_lib
from kdjax import distill
from kdjax import errors
from kdjax import losses
from kdjax import models
from kdjax import step as step_lib
from kdjax import train
from kdjax.methods import simkd
from tests.util import digits_config, load_digits_model, random_teacher


def _epochs(workdir):
  return [json.loads(l) for l in open(f'{workdir}/metrics.jsonl') if '"epoch"' in l]


@pytest.fixture(scope='module')
def resnet_teacher(tmp_path_factory):
  return random_teacher(str(tmp_path_factory.mktemp('resnet14')), 'resnet14')


METHOD_RUNS = {
    'kd': dict(losses={'ce': 0.1, 'kd': 0.9}),
    'simkd': dict(losses={'simkd': 1.0}),
    'simkd_kl_labels_multi': dict(losses={'simkd': 1.0}, simkd=dict(loss='kl', use_labels=True, projectors='multi')),
    'simkd_all': dict(losses={'simkd': 1.0}, simkd=dict(projectors='all')),
}


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(METHOD_RUNS))
def test_method_step_learns_and_keeps_teacher_frozen(name, resnet_teacher, tmp_path):
  spec = METHOD_RUNS[name]
  cfg = digits_config('resnet8', spec['losses'], epochs=2)
  cfg.distill.simkd.update(spec.get('simkd', {}))
  cfg.teacher.update(model='resnet14', checkpoint=resnet_teacher)
  before = load_digits_model(resnet_teacher, 'resnet14')
  summary = train.run(cfg, str(tmp_path))
  after = jax.tree.map(np.asarray, summary.trainer.teacher_vars)
  jax.tree.map(np.testing.assert_array_equal, before, after)
  first, second = _epochs(tmp_path)
  for term in spec['losses']:
    assert np.isfinite(first[f'loss_{term}'])
  assert second['train_loss'] < first['train_loss']


@pytest.mark.slow
def test_simkd_predicts_through_the_teacher_head(resnet_teacher, tmp_path):
  cfg = digits_config('resnet8', {'simkd': 1.0}, epochs=1)
  cfg.teacher.update(model='resnet14', checkpoint=resnet_teacher)
  summary = train.run(cfg, str(tmp_path))
  exp, ts = summary.trainer, step_lib.student(summary.state, 0)
  x = jnp.asarray(exp.ds.test.images[:16], jnp.float32) / 255.0
  y = jnp.asarray(exp.ds.test.labels[:16])

  def predict(teacher_vars):
    ctx, _ = step_lib.forward(exp.parts, ts.params, ts.state, teacher_vars, x, y, y, jax.random.key(0), False, 0.0)
    return np.asarray(exp.distiller.logits(ctx)), ctx

  logits, ctx = predict(exp.teacher_vars)
  np.testing.assert_array_equal(logits, np.asarray(ctx.extras['simkd']['logits']))
  assert not np.allclose(logits, np.asarray(ctx.student.logits))  # not the student's own head
  head = exp.teacher_vars['params']['head']
  changed = dict(exp.teacher_vars, params=dict(exp.teacher_vars['params'],
                                               head={'kernel': head['kernel'] * 2.0, 'bias': head['bias'] + 1.0}))
  changed_logits, _ = predict(changed)
  assert not np.allclose(changed_logits, logits)
  # By hand: the teacher's head on the pooled projection.
  emb = np.asarray(ctx.extras['simkd']['projected'][0]).mean(axis=(1, 2))
  np.testing.assert_allclose(emb @ np.asarray(head['kernel']) + np.asarray(head['bias']), logits, rtol=1e-4,
                             atol=1e-4)
  # The exported deployable student gives the same predictions from one checkpoint.
  module, variables = simkd.load_deployable(summary['deploy_path'])
  np.testing.assert_allclose(np.asarray(module.apply(variables, x)), logits, rtol=1e-5, atol=1e-5)
  n_student_backbone = sum(v.size for v in jax.tree.leaves(ts.params['student']['backbone']))
  n_projector = sum(v.size for v in jax.tree.leaves(ts.params['extras']['simkd']['projector']))
  assert summary['deploy_params'] == n_student_backbone + n_projector + 64 * 10 + 10


def _shapes(model, x):
  m = models.create(model, num_classes=100)
  return jax.eval_shape(lambda: m.apply(m.init(jax.random.key(0), x), x))


@pytest.mark.parametrize('student,teacher', [('vgg8', 'resnet32x4'), ('ShuffleV2', 'wrn_40_2')])
def test_simkd_projector_shapes_for_mismatched_pairs(student, teacher):
  cfg = digits_config().distill
  x = jnp.zeros((2, 32, 32, 3))
  s, t = _shapes(student, x), _shapes(teacher, x)
  t_last, s_last = t.features[-1], s.features[-1]
  assert s_last.shape[-1] != t_last.shape[-1]  # different widths
  assert s_last.shape[1] != t_last.shape[1]  # and different spatial sizes
  info = type('Info', (), {'teacher': models.create(teacher, 100)})()
  module = simkd._module(cfg, s, t, info)
  head = lambda e: e @ jnp.zeros((t_last.shape[-1], 100))
  init = lambda module, s, t: module.init_with_output(jax.random.key(0), s, t, labels=None, indices=None,
                                                      train=False, teacher_classify=head)
  out, variables = jax.eval_shape(lambda s, t: init(module, s, t), s, t)
  side = min(s_last.shape[1], t_last.shape[1])
  assert out['projected'][0].shape == out['targets'][0].shape == (2, side, side, t_last.shape[-1])
  p = variables['params']['projector']
  mid = t_last.shape[-1] // 2
  assert p['conv0']['kernel'].shape == (1, 1, s_last.shape[-1], mid)
  assert p['conv1']['kernel'].shape == (3, 3, mid, mid)
  assert p['conv2']['kernel'].shape == (1, 1, mid, t_last.shape[-1])
  assert out['logits'].shape == (2, 100)
  cfg.simkd.projectors = 'all'
  module = simkd._module(cfg, s, t, info)
  _, variables = jax.eval_shape(lambda s, t: init(module, s, t), s, t)
  assert len(variables['params']) == min(len(s.features), len(t.features)) - 1


@pytest.mark.slow
def test_simkd_rejects_teachers_whose_head_is_not_on_the_pooled_map(digits_teacher, tmp_path):
  cfg = digits_config('resnet8', {'simkd': 1.0}, epochs=1)
  cfg.teacher.update(model='cnn_small', checkpoint=digits_teacher[0])
  with pytest.raises(errors.ConfigError, match='reuses the teacher classifier on the pooled last feature map'):
    train.run(cfg, str(tmp_path))


@pytest.mark.slow
def test_omitted_class_is_learned_from_soft_targets_alone(digits_teacher, tmp_path):
  cfg = digits_config('mlp', {'ce': 0.1, 'kd': 0.9}, epochs=20, data__omit_class=3)
  cfg.student.kwargs = {'hidden': (64,)}
  cfg.distill.temperature = 8.0
  cfg.teacher.update(model='cnn_small', checkpoint=digits_teacher[0])
  summary = train.run(cfg, str(tmp_path))
  exp = summary.trainer
  assert 3 not in set(np.asarray(exp.ds.train.labels)) and len(exp.ds.train) < 1437
  assert summary['test_omitted_accuracy'] >= 0.2  # never saw a 3, yet classifies many of the 37 test 3s
  assert summary['test_omitted_accuracy_adjusted'] >= summary['test_omitted_accuracy']
  assert summary['test_class_accuracy'][3] == pytest.approx(summary['test_omitted_accuracy'])


@pytest.mark.slow
def test_subclass_teacher_matches_a_plain_teacher_and_student_distills_subclasses(digits_teacher, tmp_path):
  cfg = digits_config('cnn_small', epochs=15)
  cfg.student.subclasses = 2
  cfg.distill.losses = {'ce': 1.0, 'subclass_aux': 1.0}
  teacher = train.run(cfg, str(tmp_path / 'teacher'))
  assert teacher['test_accuracy'] == pytest.approx(digits_teacher[1]['test_accuracy'], abs=0.03)
  sub = jax.eval_shape(lambda: teacher.trainer.student.apply(
      {'params': step_lib.student(teacher.state, 0).params['student'],
       **step_lib.student(teacher.state, 0).state['student']},
      jnp.zeros((4, 8, 8, 1)))).subclass_logits
  assert sub.shape == (4, 20)

  student = digits_config('mlp', {'ce': 0.1, 'subclass_kd': 0.9}, epochs=3)
  student.student.subclasses = 2
  student.teacher.update(model='cnn_small', subclasses=2, checkpoint=str(tmp_path / 'teacher'))
  s = train.run(student, str(tmp_path / 'student'))
  first, *_, last = _epochs(tmp_path / 'student')
  assert last['loss_subclass_kd'] < first['loss_subclass_kd'] and s['test_accuracy'] > 0.8

  student.teacher.subclasses = 1
  with pytest.raises(errors.CheckpointMismatchError, match='has 2 subclasses per class'):
    train.run(student, str(tmp_path / 'bad'))


@pytest.mark.slow
def test_finetune_from_checkpoint_with_frozen_backbone(digits_teacher, tmp_path):
  cfg = digits_config('cnn_small', epochs=1)
  cfg.student.update(init_checkpoint=digits_teacher[0], freeze_backbone=True)
  summary = train.run(cfg, str(tmp_path))
  start = load_digits_model(digits_teacher[0], 'cnn_small')
  end = jax.device_get(step_lib.student(summary.state, 0).params['student'])
  jax.tree.map(np.testing.assert_array_equal, start['params']['backbone'], end['backbone'])
  assert not np.array_equal(start['params']['head']['kernel'], end['head']['kernel'])
  assert summary['test_accuracy'] >= 0.9  # it started from a trained network


@pytest.mark.slow
def test_finetune_rejects_another_architecture(digits_teacher, tmp_path):
  cfg = digits_config('mlp', epochs=1)
  cfg.student.init_checkpoint = digits_teacher[0]
  with pytest.raises(errors.CheckpointMismatchError,
                     match="student checkpoint .* holds a 'cnn_small' network, but config.student.model is 'mlp'"):
    train.run(cfg, str(tmp_path))


def test_logit_standardize_matches_numpy_and_reaches_kd():
  rng = np.random.RandomState(3)
  z = rng.randn(5, 7).astype(np.float32) * 3 + 1
  want = (z - z.mean(-1, keepdims=True)) / (1e-7 + z.std(-1, ddof=1, keepdims=True))
  np.testing.assert_allclose(distill.standardize(z), want, rtol=1e-5, atol=1e-6)
  from kdjax.models import ModelOutput
  s, t = rng.randn(5, 7).astype(np.float32), rng.randn(5, 7).astype(np.float32) * 5
  out = lambda l: ModelOutput(logits=jnp.asarray(l), embedding=jnp.zeros((5, 1)))
  ctx = distill.Context(student=out(s), teacher=out(t), labels=jnp.zeros(5, jnp.int32), extras={},
                        epoch=jnp.float32(0))
  cfg = config_lib.base().distill
  cfg.update(temperature=2.0, logit_standardize=True)
  np.testing.assert_allclose(distill.METHODS['kd'].loss(ctx, cfg),
                             losses.kd_loss(distill.standardize(s), distill.standardize(t), 2.0), rtol=1e-6)
  cfg.logit_standardize = False
  np.testing.assert_allclose(distill.METHODS['kd'].loss(ctx, cfg), losses.kd_loss(s, t, 2.0), rtol=1e-6)
