"""The anchor methods (FitNet, AT, SP, RKD, PKT, VID, CRD, DKD): each trains on digits against a frozen teacher, CRD's
memory bank behaves as RepDistiller's, DKD warms up as mdistiller's, and every CIFAR-100 benchmark config lowers."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import checkpoint as ckpt_lib
from kdjax import teacher as teacher_lib
from kdjax import trainer as trainer_lib
from kdjax import data as data_lib
from kdjax import distill
from kdjax import losses
from kdjax import methods  # noqa: F401  (registers the methods)
from kdjax import models
from kdjax import sharding
from kdjax import step as step_lib
from kdjax import train
from kdjax.data import device as device_data
from kdjax.errors import ConfigError
from kdjax.methods import dkd
from kdjax.methods.feature import ConvReg
from tests.util import config_module, digits_config

ANCHOR_METHODS = ('fitnet', 'at', 'sp', 'rkd', 'pkt', 'vid', 'crd', 'dkd')
# cnn_small -> a narrower cnn_small: different channels everywhere, so every projector/regressor is exercised.
STUDENT_KWARGS = {'channels': (16, 32), 'hidden': (32,)}


CIFAR100 = config_module('cifar100.py')


def _numpy(tree):
  return jax.tree.map(lambda a: np.array(a), jax.device_get(tree))


def _teacher_shapes():
  m = models.create('cnn_small', num_classes=10)
  return m, jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1))))


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
  """A cnn_small teacher trained for 3 epochs (~98% test accuracy, seconds). Against a randomly initialised one, CE
  pulls the student away from the teacher's logits and the DKD term grows from epoch to epoch."""
  workdir = str(tmp_path_factory.mktemp('anchor_teacher'))
  train.run(digits_config('cnn_small', epochs=3), workdir)
  return workdir


def _digits_cfg(method, teacher_dir, epochs=2, **overrides):
  cfg = digits_config('cnn_small', distill.reference_weights(method), epochs=epochs, **overrides)
  cfg.student.kwargs = STUDENT_KWARGS
  cfg.teacher.model = 'cnn_small'
  cfg.teacher.checkpoint = teacher_dir
  cfg.distill.fitnet.hint_layer = 1  # cnn_small has two maps; RepDistiller's default 2 is a CIFAR network's stage 2
  cfg.distill.dkd.warmup_epochs = 1  # the full DKD weight from the start, so its term is comparable across epochs
  return cfg


# ----------------------------------------------------------------------------------------------- training runs
@pytest.mark.slow
@pytest.mark.parametrize('method', ANCHOR_METHODS)
def test_method_trains_on_digits_with_a_frozen_teacher(method, teacher_dir, tmp_path):
  _, target = _teacher_shapes()
  before = _numpy(ckpt_lib.load_model(teacher_dir, target)[0])
  # CRD's first epoch scores against memory rows that still hold their random initialisation (each row is written
  # once per epoch), so its loss is compared between the second and third epochs, once the banks hold embeddings.
  # PKT's term starts near its floor (about 1e-4 against a well-trained teacher) and moves by less than the noise of
  # the first epoch; its trend is read between the second and third epochs too.
  epochs = 3 if method in ('crd', 'pkt') else 2
  summary = train.run(_digits_cfg(method, teacher_dir, epochs=epochs), str(tmp_path))
  records = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  records = [r for r in records if 'epoch' in r]
  assert len(records) == epochs
  key = f'loss_{method}'
  first, second = records[-2][key], records[-1][key]
  assert np.isfinite(first) and np.isfinite(second)
  assert second < first, f'{key} went from {first} to {second}'
  assert records[-1]['train_loss'] < records[-2]['train_loss']
  # The teacher is never updated: parameters and BatchNorm statistics bit-identical.
  after = _numpy(summary.trainer.teacher_vars)
  assert 'batch_stats' in before
  jax.tree.map(np.testing.assert_array_equal, before, after)


# ----------------------------------------------------------------------------------------------------- FitNet
@pytest.mark.parametrize('student_hw,teacher_hw', [(8, 16), (16, 8), (8, 8), (10, 8)])
def test_convreg_matches_torch(student_hw, teacher_hw):
  torch = pytest.importorskip('torch')
  x = np.random.RandomState(0).randn(2, student_hw, student_hw, 6).astype(np.float32)
  module = ConvReg((teacher_hw, teacher_hw), 5)
  variables = module.init(jax.random.key(0), jnp.asarray(x), False)
  kernel = np.asarray(variables['params']['conv']['kernel'])
  bias = np.asarray(variables['params']['conv']['bias'])
  if student_hw * 2 == teacher_hw:
    conv = torch.nn.ConvTranspose2d(6, 5, 4, stride=2, padding=1)
    # PyTorch's transposed-conv init bound is 1/sqrt(out_channels * k * k); ours must be the same.
    assert np.abs(kernel).max() <= 1 / np.sqrt(5 * 16) and np.abs(kernel).max() > 0.8 / np.sqrt(5 * 16)
  elif student_hw == 2 * teacher_hw:
    conv = torch.nn.Conv2d(6, 5, 3, stride=2, padding=1)
  else:
    conv = torch.nn.Conv2d(6, 5, 1 + student_hw - teacher_hw)
  conv.weight.data = torch.tensor(kernel.transpose(3, 2, 0, 1))  # HWIO (HW,out,in for the transposed) -> torch
  conv.bias.data = torch.tensor(bias)
  ref = conv(torch.tensor(x.transpose(0, 3, 1, 2))).detach().numpy().transpose(0, 2, 3, 1)
  ref = np.maximum(ref / np.sqrt(1 + 1e-5), 0)  # BN with its initial running statistics, then ReLU
  out = module.apply(variables, jnp.asarray(x), False)
  assert out.shape == (2, teacher_hw, teacher_hw, 5)
  np.testing.assert_allclose(out, ref, atol=1e-5)


# -------------------------------------------------------------------------------------------------------- CRD
def _crd_experiment(teacher_dir, num_devices):
  # On 4 devices the two steps are one dispatch (lax.scan over K = 2 steps, the accelerators' path); on 1 device
  # they are two single-step dispatches (the CPU default).
  cfg = _digits_cfg('crd', teacher_dir, num_devices=num_devices, steps_per_dispatch=2 if num_devices > 1 else 1)
  ds = data_lib.load(cfg.data)
  mesh = sharding.make_mesh(num_devices)
  teacher, teacher_vars = teacher_lib.prepare(cfg, ds, mesh, train.train_and_evaluate)
  return trainer_lib.build(cfg, ds, mesh, teacher, teacher_vars)


@pytest.fixture(scope='module')
def crd_steps(teacher_dir):
  """Two train steps of CRD on 1 and on 4 devices: {n: (experiment, states as numpy after each dispatch, state)}."""
  runs = {}
  for n in (1, 4):
    exp = _crd_experiment(teacher_dir, n)
    ts = exp.init_state()
    states = [step_lib.student(_numpy(ts), 0)]
    for step in range(0, 2, exp.k):
      ts, _ = exp.train_chunk(ts, 0, step)
      states.append(step_lib.student(_numpy(ts), 0))
    runs[n] = (exp, states, ts)
  return runs


def _bank(state):
  return state.state['extras']['memory']['crd']


@pytest.mark.slow
def test_crd_memory_update_matches_reference(crd_steps):
  exp, (s0, s1, s2), _ = crd_steps[1]
  n = len(exp.ds.train)
  bank0, bank1 = _bank(s0), _bank(s1)
  assert bank0['memory_s'].shape == (n, 128) and bank0['memory_t'].shape == (n, 128)
  stdv = 1 / np.sqrt(128 / 3)
  assert np.abs(bank0['memory_s']).max() <= stdv and np.abs(bank0['memory_s']).max() > 0.9 * stdv
  assert bank0['z_s'] == -1 and bank0['z_t'] == -1
  assert exp.distiller.extras.modules['crd'].nce_k == n - 1  # 16384 clamped to the 1437 digits

  # The step's batch and the embeddings the step computed (the params before the step, the same train-mode BN).
  perm = device_data.epoch_permutation(exp.source.data_rng, 0, n)
  idx = np.asarray(perm[:exp.cfg.batch_size])
  images, y, batch_idx = device_data.gather(exp.source.arrays(), perm, 0, exp.cfg.batch_size, jax.random.key(0),
                                            exp.ds.augment)
  x = step_lib.normalize(images, exp.parts.data, exp.parts.dtype)
  np.testing.assert_array_equal(np.asarray(batch_idx), idx)
  ctx, _ = step_lib.forward(exp.parts, s0.params, s0.state, exp.teacher_vars, x, y, jnp.asarray(idx),
                            jax.random.key(0), True, 0.0)
  for side in ('s', 't'):
    emb = np.asarray(ctx.extras['crd'][f'embed_{side}'], np.float64)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    old = bank0[f'memory_{side}'].astype(np.float64)
    rows = 0.5 * old[idx] + 0.5 * emb
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    new = bank1[f'memory_{side}']
    np.testing.assert_allclose(new[idx], rows, rtol=1e-5, atol=1e-6)
    others = np.setdiff1d(np.arange(n), idx)
    np.testing.assert_array_equal(new[others], bank0[f'memory_{side}'][others])
    # Z is estimated on the first training batch, then fixed.
    assert bank1[f'z_{side}'] > 0
    assert _bank(s2)[f'z_{side}'] == bank1[f'z_{side}']


@pytest.mark.slow
def test_crd_memory_survives_checkpoint_round_trip(crd_steps, tmp_path):
  _, (_, _, s2), ts = crd_steps[1]
  ckpt = ckpt_lib.Checkpointer(str(tmp_path))
  try:
    ckpt.save(2, ts, {'step': 2})
    ckpt.wait()
    restored = ckpt.restore(2, ckpt_lib.abstract(ts))
  finally:
    ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, _bank(s2), _bank(step_lib.student(_numpy(restored), 0)))
  jax.tree.map(np.testing.assert_array_equal, s2.params, step_lib.student(_numpy(restored), 0).params)


@pytest.mark.slow
def test_crd_four_devices_match_one(crd_steps):
  assert jax.device_count() >= 4
  one, four = crd_steps[1][1][-1], crd_steps[4][1][-1]
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  jax.tree.map(close, one.params, four.params)
  jax.tree.map(close, one.state, four.state)  # the memory banks and Z included
  assert crd_steps[4][2].state['extras']['memory']['crd']['memory_s'].sharding.is_fully_replicated


@pytest.mark.slow
def test_crd_eval_does_not_touch_memory(crd_steps):
  exp, _, ts = crd_steps[1]
  bank = _numpy(_bank(ts))
  exp.evaluate(ts)
  jax.tree.map(np.testing.assert_array_equal, bank, _numpy(_bank(ts)))


# -------------------------------------------------------------------------------------------------------- DKD
def test_dkd_warmup_factor():
  # mdistiller: min(epoch / 20, 1) with epoch = 1 during the first epoch.
  for epoch, factor in ((0.0, 1 / 20), (0.7, 1 / 20), (1.0, 2 / 20), (18.99, 19 / 20), (19.0, 1.0), (19.5, 1.0),
                        (239.9, 1.0)):
    assert float(dkd.warmup_factor(epoch, 20)) == pytest.approx(factor), epoch
  assert float(dkd.warmup_factor(0.0, 0)) == 1.0

  cfg = CIFAR100.get_config('dkd,resnet56,resnet20').distill
  assert cfg.dkd.beta == 2.0 and cfg.dkd.alpha == 1.0 and cfg.dkd.temperature == 4.0 and cfg.dkd.warmup_epochs == 20
  rng = np.random.RandomState(0)
  s, t = (jnp.asarray(rng.randn(8, 100), jnp.float32) for _ in range(2))
  labels = jnp.asarray(rng.randint(0, 100, 8))
  out = lambda z: models.ModelOutput(logits=z, embedding=z)
  full = losses.dkd_loss(s, t, labels, 1.0, 2.0, 4.0)
  for epoch, factor in ((0.3, 1 / 20), (25.0, 1.0)):
    ctx = distill.Context(student=out(s), teacher=out(t), labels=labels, extras={}, epoch=jnp.float32(epoch))
    np.testing.assert_allclose(dkd.dkd_loss(ctx, cfg), factor * full, rtol=1e-6)


# ------------------------------------------------------------------------------------------ benchmark configs
def test_config_weights_are_the_references():
  c = CIFAR100.get_config('kd,resnet32x4,resnet8x4')
  assert dict(c.distill.losses) == {'ce': 0.1, 'kd': 0.9} and c.distill.temperature == 4.0
  assert (c.epochs, c.batch_size, c.optimizer.lr, c.optimizer.weight_decay) == (240, 64, 0.05, 5e-4)
  assert tuple(c.schedule.decay_epochs) == (150, 180, 210) and c.teacher.checkpoint == ''
  assert CIFAR100.get_config('crd,resnet32x4,resnet8x4').distill.losses.to_dict() == {'ce': 1.0, 'crd': 0.8}
  assert CIFAR100.get_config('fitnet,wrn_40_2,wrn_16_2').distill.losses.to_dict() == {'ce': 1.0, 'fitnet': 100.0}
  mobile = CIFAR100.get_config('vid,vgg13,MobileNetV2')
  assert mobile.optimizer.lr == 0.01 and mobile.teacher.recipe.optimizer.lr == 0.05
  assert mobile.distill.dkd.beta == 6.0
  assert CIFAR100.get_config('dkd,ResNet50,MobileNetV2').distill.dkd.beta == 8.0
  with pytest.raises(ValueError, match='unknown method'):
    CIFAR100.get_config('nope,resnet32x4,resnet8x4')


@functools.lru_cache(maxsize=None)
def _synthetic_cifar(num_train: int) -> data_lib.Dataset:
  rng = np.random.RandomState(0)
  split = lambda n: data_lib.Split(rng.randint(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                                   rng.randint(0, 100, (n,)).astype(np.int32))
  mean, std = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
  return data_lib.Dataset('synthetic_cifar100', 100, split(num_train), split(100), None, mean, std, 'crop_flip')


@functools.lru_cache(maxsize=None)
def _abstract_teacher(name: str, dtype: str = 'float32'):
  teacher = models.create(name, num_classes=100, dtype=jnp.dtype(dtype))
  return teacher, jax.eval_shape(teacher.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32))


def _trace(cfg, teacher_name):
  # CRD's memory bank needs more rows than nce_k negatives, or nce_k is clamped: trace it at the configured size.
  num_train = cfg.distill.crd.nce_k + cfg.batch_size if 'crd' in cfg.distill.losses else 2 * cfg.batch_size
  teacher, teacher_vars = _abstract_teacher(teacher_name, cfg.dtype)
  exp = trainer_lib.build(cfg, _synthetic_cifar(num_train), sharding.make_mesh(1), teacher, teacher_vars)
  ts, metrics = exp.trace_train_step()
  if 'crd' in cfg.distill.losses:
    assert ts.state['extras']['memory']['crd']['memory_s'].shape == (1, num_train, cfg.distill.crd.feat_dim)
    assert exp.distiller.extras.modules['crd'].nce_k == cfg.distill.crd.nce_k
  return metrics


def _refusals(cfg, teacher_name, student_name, methods) -> dict:
  """{method: its check's one-line refusal} for the methods whose `Method.check` refuses this pair."""
  teacher, teacher_vars = _abstract_teacher(teacher_name, cfg.dtype)
  student = models.build_student(cfg, 100)
  x = jnp.zeros((cfg.batch_size, 32, 32, 3), jnp.float32)
  s_shapes = jax.eval_shape(lambda: student.apply(student.init(jax.random.key(0), x), x))
  t_shapes = jax.eval_shape(lambda v: teacher.apply(v, x), teacher_vars)
  info = distill.DataInfo(2 * cfg.batch_size, 100, student, teacher, student_name, teacher_name)
  refused = {}
  for m in methods:
    try:
      distill.check_pair(m, distill.METHODS[m], cfg.distill, s_shapes, t_shapes, info)
    except ConfigError as e:
      refused[m] = str(e)
  return refused


@pytest.mark.slow
@pytest.mark.parametrize('teacher_name,student_name', CIFAR100.PAIRS)
def test_every_method_lowers_on_every_benchmark_pair(teacher_name, student_name):
  """One trace per pair with every method's terms enabled at once: each method's loss and extra modules are traced
  on the pair's real feature shapes, while the two networks (what tracing time goes into) are traced once, not once
  per method."""
  configs = {m: CIFAR100.get_config(f'{m},{teacher_name},{student_name}') for m in CIFAR100.METHODS}
  registered = [m for m in CIFAR100.METHODS if m in distill.METHODS]
  cfg = configs['kd']
  for m, c in configs.items():  # the method configs differ in their loss terms (and pre-training stage) only
    c.distill.losses = cfg.distill.losses
    c.distill.init, c.epochs, c.teacher.recipe = cfg.distill.init, cfg.epochs, cfg.teacher.recipe
    if m == 'cat_kd':
      c.distill.cat_kd = cfg.distill.cat_kd
    assert c.to_dict() == cfg.to_dict(), m
  # Methods that cannot apply to this pair (their `check` refuses it) must say so in one line naming the method and
  # a model of the pair; the others are traced together.
  refused = _refusals(cfg, teacher_name, student_name, registered)
  for m, message in refused.items():
    assert message.startswith(m) and f'student {student_name}, teacher {teacher_name}' in message, message
    assert '\n' not in message, message
  union = {}
  for m in registered:
    if m not in refused:
      union.update(distill.reference_weights(m))
  cfg.distill.losses = union
  metrics = _trace(cfg, teacher_name)
  for m in registered:
    if m not in refused:
      for term in set(distill.reference_weights(m)) - {'ce'}:
        assert metrics[f'loss_{term}'].shape == (1,), (m, term)  # one student


@pytest.mark.slow
@pytest.mark.parametrize('method', CIFAR100.METHODS)
def test_each_method_config_lowers_alone(method):
  """Each config as written (the union above shares one set of student logits), in bfloat16 compute."""
  if method not in distill.METHODS:
    pytest.skip(f'method {method!r} is not registered in kdjax.distill.METHODS (not implemented in this checkout)')
  cfg = CIFAR100.get_config(f'{method},resnet32x4,resnet8x4')
  cfg.dtype = 'bfloat16'
  metrics = _trace(cfg, 'resnet32x4')
  assert set(distill.reference_weights(method)) <= {k[len('loss_'):] for k in metrics if k.startswith('loss_')}
