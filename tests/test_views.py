"""Consistent views (kdjax/views.py): each op against NumPy (or PIL) given the same draws; the teacher and the student
read the same mixed pixels; a KD step on a mixed batch (the teacher at its own resolution) equals NumPy's loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from kdjax import api
from kdjax import data as data_lib
from kdjax import models
from kdjax import step as step_lib
from kdjax import validate
from kdjax import views
from kdjax.errors import ConfigError
from tests.util import digits_config

B, H, W, C = 8, 12, 10, 2


def _images(seed=0):
  return np.random.default_rng(seed).normal(size=(B, H, W, C)).astype(np.float32)


def _targets(labels, classes=5):
  return np.eye(classes, dtype=np.float32)[labels]


def test_mixup_matches_numpy():
  x, y = _images(), np.arange(B) % 5
  lam = views.lambdas(jax.random.key(1), B, 0.4, 1.0, 'example')
  got_x, got_t = views.mixup(jnp.asarray(x), jnp.asarray(_targets(y)), lam)
  lam = np.asarray(lam)
  assert np.all((lam > 0) & (lam < 1)) and len(set(lam.tolist())) == B  # drawn per example
  want_x = lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * x[::-1]
  want_t = lam[:, None] * _targets(y) + (1 - lam[:, None]) * _targets(y)[::-1]
  np.testing.assert_allclose(got_x, want_x, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got_t, want_t, rtol=1e-6, atol=1e-7)
  batch = np.asarray(views.lambdas(jax.random.key(1), B, 0.4, 1.0, 'batch'))
  assert np.all(batch == batch[0]) and 0 < batch[0] < 1  # big_vision's one lambda per batch
  assert np.all(np.asarray(views.lambdas(jax.random.key(1), B, 0.4, 0.0, 'example')) == 1.0)  # prob 0: unmixed


def test_cutmix_matches_numpy():
  x, y = _images(1), np.arange(B) % 5
  lam = views.lambdas(jax.random.key(2), B, 1.0, 1.0, 'example')
  top, left, h, w = views.cutmix_boxes(jax.random.key(3), lam, H, W)
  got_x, got_t = views.cutmix(jnp.asarray(x), jnp.asarray(_targets(y)), top, left, h, w)
  want_x = x.copy()
  for i, (t, l, bh, bw) in enumerate(zip(*map(np.asarray, (top, left, h, w)))):
    assert 0 <= t and t + bh <= H and 0 <= l and l + bw <= W
    # timm's rand_bbox: sides int(H sqrt(1 - lam)) before clipping (a side loses one pixel to the // 2 halves)
    assert bh <= int(H * np.sqrt(1 - float(lam[i]))) and bw <= int(W * np.sqrt(1 - float(lam[i])))
    want_x[i, t:t + bh, l:l + bw] = x[B - 1 - i, t:t + bh, l:l + bw]
  kept = 1 - np.asarray(h) * np.asarray(w) / (H * W)  # timm's correct_lam
  want_t = kept[:, None] * _targets(y) + (1 - kept[:, None]) * _targets(y)[::-1]
  np.testing.assert_array_equal(got_x, want_x)
  np.testing.assert_allclose(got_t, want_t, rtol=1e-6, atol=1e-7)
  assert np.any(np.asarray(h) * np.asarray(w) > 0)


def test_inception_crop_matches_pil():
  x = np.random.default_rng(2).uniform(0, 255, (B, H, W, C)).astype(np.float32)
  top, left, h, w = map(np.asarray, views.boxes(jax.random.key(4), B, H, W, (0.08, 1.0), views.CROP_RATIO, 'center'))
  assert np.all((top >= 0) & (left >= 0) & (top + h <= H) & (left + w <= W) & (h > 0) & (w > 0))
  got = np.asarray(views.resized_crop(jnp.asarray(x), *map(jnp.asarray, (top, left, h, w))))
  for i in range(B):
    for c in range(C):  # PIL's bilinear resize of the box, on float pixels (mode 'F')
      want = np.asarray(Image.fromarray(x[i, :, :, c], mode='F').resize(
          (W, H), Image.BILINEAR, box=(int(left[i]), int(top[i]), int(left[i] + w[i]), int(top[i] + h[i]))))
      np.testing.assert_allclose(got[i, :, :, c], want, atol=2e-3)
  # No try fits (an area larger than the image): torchvision's central crop clamped to the ratio range.
  t, l, bh, bw = map(np.asarray, views.boxes(jax.random.key(5), 2, 12, 30, (2.0, 2.0), views.CROP_RATIO, 'center'))
  np.testing.assert_array_equal(np.stack([t, l, bh, bw], 1), [[0, 7, 12, 16]] * 2)  # w = round(12 * 4 / 3)


def test_flip_lr_mirrors_some_images():
  x = _images(4)
  got = np.asarray(views.flip_lr(jax.random.key(8), jnp.asarray(x)))
  mirrored = [np.array_equal(g, i[:, ::-1]) for g, i in zip(got, x)]
  kept = [np.array_equal(g, i) for g, i in zip(got, x)]
  assert all(m != k for m, k in zip(mirrored, kept)) and any(mirrored) and any(kept)


def test_random_erasing_matches_numpy():
  x, rng = _images(3), jax.random.key(6)
  got = np.asarray(views.random_erasing(rng, jnp.asarray(x), 0.75))
  k_p, k_box = jax.random.split(rng)  # the op's own draws, read back for the NumPy computation
  top, left, h, w = map(np.asarray, views.boxes(k_box, B, H, W, views.ERASE_SCALE, views.ERASE_RATIO, 'none'))
  erase = np.asarray(jax.random.bernoulli(k_p, 0.75, (B,)))
  want = x.copy()
  for i in range(B):
    if erase[i]:
      want[i, top[i]:top[i] + h[i], left[i]:left[i] + w[i]] = 0.0
      assert 0 < h[i] < H and 0 < w[i] < W
  np.testing.assert_array_equal(got, want)
  assert erase.any() and not erase.all()


# ------------------------------------------------------------------------------------------------- in the step
def _program(teacher_vars=None, teacher_size=0, **overrides):
  cfg = digits_config('mlp', {'ce': 0.5, 'kd': 0.5}, epochs=1, teacher__model='mlp',
                      teacher__kwargs={'hidden': (32,)}, teacher__image_size=teacher_size,
                      data__mixup={'alpha': 1.0, 'prob': 1.0, 'mode': 'example'},
                      data__cutmix={'alpha': 1.0, 'prob': 1.0, 'mode': 'example'},
                      data__erasing={'prob': 0.5}, **overrides)
  cfg.distill.temperature = 2.0
  ds = data_lib.load(cfg.data)
  return cfg, ds, api.init(cfg, ds, teacher_vars=teacher_vars)


def _batch(ds):
  return {'images': ds.train.images[:64], 'labels': ds.train.labels[:64], 'indices': np.arange(64)}


def _np_mlp(variables, x):
  """NumPy forward of the MLP (flatten, Dense-ReLU per hidden layer, the head)."""
  p = jax.tree.map(np.asarray, variables['params'])
  h = x.reshape(len(x), -1).astype(np.float64)
  dense = sorted(k for k in p['backbone'] if k.startswith('Dense')) if 'backbone' in p else []
  for k in dense:
    h = np.maximum(h @ p['backbone'][k]['kernel'] + p['backbone'][k]['bias'], 0.0)
  head = p['head']
  head = head.get('Dense_0', head)
  return h @ head['kernel'] + head['bias']


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_teacher_and_student_read_the_same_mixed_pixels():
  """The teacher is the student itself (its initial variables, no dropout, no BatchNorm): on the same pixels their
  logits agree and the kd term is 0, while the views changed the pixels (on the clean batch the teacher would
  disagree)."""
  cfg = digits_config('mlp', {'kd': 1.0}, epochs=1, teacher__model='mlp', teacher__kwargs={'hidden': (32,)},
                      data__mixup={'alpha': 1.0, 'prob': 1.0, 'mode': 'example'}, data__erasing={'prob': 0.5},
                      data__inception_crop={'enabled': True, 'min_scale': 0.3, 'max_scale': 1.0, 'flip': True})
  ds = data_lib.load(cfg.data)
  spec = step_lib.DataSpec.of(ds)
  teacher = models.create('mlp', num_classes=10, hidden=(32,))
  first = api.init(cfg, ds, teacher_vars=teacher.init(jax.random.key(9), jnp.zeros((1,) + spec.image_shape)))
  own = jax.device_get(first.variables(first.state))
  program = api.init(cfg, ds, teacher_vars=own)  # the same seed: the same initial student, now also the teacher
  state = program.state
  jax.tree.map(np.testing.assert_array_equal, own, jax.device_get(program.variables(state)))
  batch = _batch(ds)
  _, metrics = program.train_step(state, program.teacher_vars, batch)
  assert float(metrics['loss_kd'][0]) < 1e-6
  # The control: the mixed pixels differ from the clean ones, and the student's logits on them from the clean
  # logits, so a teacher fed the clean batch would give a kd term far from 0.
  clean = np.asarray(step_lib.normalize(jnp.asarray(batch['images']), spec, jnp.float32))
  mixed, _ = views.apply(cfg.data, step_lib.views_rng(program.parts, 0), jnp.asarray(clean),
                         jnp.asarray(batch['labels']), 10)
  assert np.abs(np.asarray(mixed) - clean).max() > 0.5
  s, t = _np_mlp(own, np.asarray(mixed)), _np_mlp(own, clean)
  p_t = np.exp(_log_softmax(t / 2.0))
  assert np.mean(np.sum(p_t * (_log_softmax(t / 2.0) - _log_softmax(s / 2.0)), -1)) > 1e-3


def test_kd_step_on_a_mixed_batch_matches_numpy():
  """ce (mixed targets) + kd on a mixup/cutmix/erasing batch, the teacher an MLP of 4x4 inputs reading the batch
  resized on the device (teacher.image_size = 4): the step's terms equal NumPy's on the same mixed batch, the
  teacher's input resized by PIL."""
  teacher = models.create('mlp', num_classes=10, hidden=(32,))
  t_vars = teacher.init(jax.random.key(7), jnp.zeros((1, 4, 4, 1)))
  cfg, ds, program = _program(teacher_vars=t_vars, teacher_size=4)
  batch = _batch(ds)
  _, metrics = program.train_step(program.state, program.teacher_vars, batch)
  spec = program.parts.data
  clean = step_lib.normalize(jnp.asarray(batch['images']), spec, jnp.float32)
  mixed, targets = map(np.asarray, views.apply(cfg.data, step_lib.views_rng(program.parts, 0), clean,
                                               jnp.asarray(batch['labels']), 10))
  small = np.stack([np.asarray(Image.fromarray(m[..., 0], mode='F').resize((4, 4), Image.BILINEAR))
                    for m in mixed])[..., None]
  s = _np_mlp(program.variables(program.state), mixed)
  t = _np_mlp(t_vars, small)
  ce = -np.mean(np.sum(targets * _log_softmax(s), -1))
  p_t = np.exp(_log_softmax(t / 2.0))
  kd = 4.0 * np.mean(np.sum(p_t * (_log_softmax(t / 2.0) - _log_softmax(s / 2.0)), -1))
  np.testing.assert_allclose(float(metrics['loss_ce'][0]), ce, rtol=1e-4)
  np.testing.assert_allclose(float(metrics['loss_kd'][0]), kd, rtol=1e-4)
  np.testing.assert_allclose(float(metrics['loss'][0]), 0.5 * ce + 0.5 * kd, rtol=1e-4)
  assert not np.allclose(targets.max(-1), 1.0)  # the targets are mixed
  # Evaluation (no views): the teacher reads the clean batch resized too; its agreement with the student as NumPy's.
  test = {'images': ds.test.images[:100], 'labels': ds.test.labels[:100]}
  sums = jax.device_get(program.eval_step(program.state, program.teacher_vars, test))
  x = np.asarray(step_lib.normalize(jnp.asarray(test['images']), spec, jnp.float32))
  small = np.stack([np.asarray(Image.fromarray(m[..., 0], mode='F').resize((4, 4), Image.BILINEAR))
                    for m in x])[..., None]
  agree = np.sum(_np_mlp(program.variables(program.state), x).argmax(-1) == _np_mlp(t_vars, small).argmax(-1))
  assert abs(float(sums['agree'][0]) - agree) <= 1  # an argmax tie broken by round-off at most


@pytest.mark.parametrize('overrides, field', [
    ({'data__mixup': {'alpha': -1.0, 'prob': 1.0, 'mode': 'example'}}, 'data.mixup.alpha'),
    ({'data__cutmix': {'alpha': 1.0, 'prob': 1.5, 'mode': 'example'}}, 'data.cutmix.prob'),
    ({'data__mixup': {'alpha': 1.0, 'prob': 1.0, 'mode': 'elem'}}, 'data.mixup.mode'),
    ({'data__erasing': {'prob': 2.0}}, 'data.erasing.prob'),
    ({'data__inception_crop': {'enabled': True, 'min_scale': 0.9, 'max_scale': 0.5, 'flip': False}},
     'data.inception_crop.min_scale'),
    ({'data__mixup': {'alpha': 1.0, 'prob': 1.0, 'mode': 'batch'}, 'data__cutmix': {'alpha': 1.0, 'prob': 1.0,
      'mode': 'example'}}, 'data.cutmix.mode'),
    ({'data__mixup': {'alpha': 1.0, 'prob': 1.0, 'mode': 'example'}, 'student__subclasses': 2}, 'data.mixup'),
    ({'data__erasing': {'prob': 0.5}, 'distill__cache_teacher': 'on', 'teacher__model': 'mlp'},
     'distill.cache_teacher'),
    ({'teacher__image_size': -1}, 'teacher.image_size'),
    ({'teacher__model': 'mlp', 'teachers': [{'model': 'mlp', 'image_size': 4}]}, r'teachers\[0\].image_size'),
    ({'optimizer__clip_norm': -1.0}, 'optimizer.clip_norm'),
])
def test_bad_view_settings_are_refused_by_name(overrides, field):
  with pytest.raises(ConfigError, match=f'config.{field}') as e:
    validate.check(digits_config('mlp', **overrides))
  assert '\n' not in str(e.value)


def test_mixup_on_a_dataset_of_one_class_is_refused_before_anything_is_written(tmp_path):
  """Mixed targets of one class are the labels themselves: a one-class ImageFolder with mixup and cutmix on stops
  with one line naming the dataset and its class count, before the workdir is written."""
  from kdjax import train
  root = tmp_path / 'data' / 'only'
  root.mkdir(parents=True)
  for i in range(6):
    Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / f'{i}.png')
  cfg = digits_config('mlp', epochs=1, data__mixup={'alpha': 0.8, 'prob': 1.0, 'mode': 'batch'},
                      data__cutmix={'alpha': 1.0, 'prob': 1.0, 'mode': 'batch'})
  cfg.data.update(name='folder', dir=str(tmp_path / 'data'), cache_dir=str(tmp_path / 'cache'))
  validate.check(cfg)  # the config alone is valid: the class count is the data's
  with pytest.raises(ConfigError) as e:
    train.run(cfg, str(tmp_path / 'run'))
  message = str(e.value)
  assert '\n' not in message and 'has 1 class' in message and str(tmp_path / 'data') in message, message
  assert not (tmp_path / 'run').exists() or not any((tmp_path / 'run').iterdir())
