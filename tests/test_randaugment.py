"""timm's RandAugment on the device (kdjax/data/randaugment.py): every op against timm's own op on the same PIL image
(timm.data.auto_augment, Pillow underneath), the magnitude-to-argument rules against timm's LEVEL_TO_ARG, the batch
draw (ops, application probability, magnitudes), and its place among the consistent views (teacher and student read
the augmented pixels; refused with a cached teacher table)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import config_lib
from kdjax import errors
from kdjax import validate
from kdjax import views
from kdjax.data import randaugment

aa = pytest.importorskip('timm.data.auto_augment')
Image = pytest.importorskip('PIL.Image')

OPS = dict(randaugment.OPS)
FILL = (124, 116, 104)


def _images():
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, size=(12, 10, 3)).astype(np.uint8)
  low = rng.integers(40, 90, size=(12, 10, 3)).astype(np.uint8)  # a narrow range: autocontrast and equalize act
  gray = rng.integers(0, 256, size=(12, 10, 1)).astype(np.uint8)
  return {'rgb': rgb, 'low': low, 'gray': gray}


def _pil(img):
  return Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)


def _np(pil, channels):
  out = np.asarray(pil, np.float32)
  return out[..., None] if channels == 1 else out


def _ours(name, img, m, sign, fill):
  return np.asarray(OPS[name](jnp.asarray(img, jnp.float32), jnp.float32(m), jnp.float32(sign),
                              jnp.asarray(fill[:img.shape[-1]], jnp.float32)))


# (our op, timm's op, timm's argument from (magnitude, sign)): timm's LEVEL_TO_ARG with the random sign made explicit.
def _enhance(m, s):
  return max(0.1, 1.0 + s * m / 10 * 0.9)


PIXEL_OPS = [
    ('AutoContrast', lambda img, m, s: aa.auto_contrast(img)),
    ('Equalize', lambda img, m, s: aa.equalize(img)),
    ('Invert', lambda img, m, s: aa.invert(img)),
    ('PosterizeIncreasing', lambda img, m, s: aa.posterize(img, *aa._posterize_increasing_level_to_arg(m, {}))),
    ('SolarizeIncreasing', lambda img, m, s: aa.solarize(img, *aa._solarize_increasing_level_to_arg(m, {}))),
    ('SolarizeAdd', lambda img, m, s: aa.solarize_add(img, *aa._solarize_add_level_to_arg(m, {}))),
    ('ColorIncreasing', lambda img, m, s: aa.color(img, _enhance(m, s))),
    ('ContrastIncreasing', lambda img, m, s: aa.contrast(img, _enhance(m, s))),
    ('BrightnessIncreasing', lambda img, m, s: aa.brightness(img, _enhance(m, s))),
    ('SharpnessIncreasing', lambda img, m, s: aa.sharpness(img, _enhance(m, s))),
]


@pytest.mark.parametrize('name, theirs', PIXEL_OPS, ids=[p[0] for p in PIXEL_OPS])
def test_pixel_ops_equal_timms(name, theirs):
  for key, img in _images().items():
    for m in (0.0, 3.7, 9.0, 10.0):
      for sign in (1.0, -1.0):
        if name == 'PosterizeIncreasing' and m == 10.0:
          # 0 bits: black, as Pillow's posterize gave when DeiT was trained; today's Pillow refuses bits < 1, so
          # timm's op raises at magnitude 10 (which N(9, 0.5) clipped to 10 draws 2.3 % of the time).
          np.testing.assert_array_equal(_ours(name, img, m, sign, FILL), 0)
          continue
        expected = _np(theirs(_pil(img), m, sign), img.shape[-1])
        got = _ours(name, img, m, sign, FILL)
        diff = np.abs(got - expected)
        # Pillow computes autocontrast's scale in float64 and its blends (Color, Contrast, Brightness, Sharpness)
        # as float32 d + f (x - d) truncated, which XLA may contract into one fused multiply-add: a value that lands
        # on a whole number may truncate one level apart. The look-up-table ops are reproduced exactly.
        if name in ('AutoContrast', 'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing',
                    'SharpnessIncreasing'):
          assert diff.max() <= 1 and np.mean(diff > 0) < 0.05, (key, m, sign, diff.max(), np.mean(diff > 0))
        else:
          np.testing.assert_array_equal(got, expected, err_msg=f'{name} {key} m={m} sign={sign}')


GEOMETRIC_OPS = [
    ('Rotate', lambda img, m, s, **kw: aa.rotate(img, s * m / 10 * 30.0, **kw)),
    ('ShearX', lambda img, m, s, **kw: aa.shear_x(img, s * m / 10 * 0.3, **kw)),
    ('ShearY', lambda img, m, s, **kw: aa.shear_y(img, s * m / 10 * 0.3, **kw)),
    ('TranslateXRel', lambda img, m, s, **kw: aa.translate_x_rel(img, s * m / 10 * 0.45, **kw)),
    ('TranslateYRel', lambda img, m, s, **kw: aa.translate_y_rel(img, s * m / 10 * 0.45, **kw)),
]


@pytest.mark.parametrize('name, theirs', GEOMETRIC_OPS, ids=[p[0] for p in GEOMETRIC_OPS])
def test_geometric_ops_equal_timms_at_nearest_sampling(name, theirs):
  """timm draws bilinear or bicubic sampling per call; with Pillow's NEAREST (kdjax's sampling) the ops agree."""
  img = _images()['rgb']
  for m in (2.5, 9.0):
    for sign in (1.0, -1.0):
      expected = _np(theirs(_pil(img), m, sign, resample=Image.NEAREST, fillcolor=FILL), 3)
      got = _ours(name, img, m, sign, FILL)
      # Pixels whose source lands on a pixel edge may round the other way (float32 here, Pillow's own arithmetic).
      assert np.mean(np.any(got != expected, -1)) <= 0.05, (name, m, sign, np.mean(np.any(got != expected, -1)))
      assert np.any(got != img)


def test_the_op_list_and_the_level_rules_are_timms():
  assert [n for n, _ in randaugment.OPS] == aa._RAND_INCREASING_TRANSFORMS
  for m in (0.0, 1.3, 5.0, 9.0, 9.99, 10.0):
    assert 4 - int(m / 10 * 4) == aa._posterize_increasing_level_to_arg(m, {})[0]
    assert float(randaugment._level(jnp.float32(m), 256.0)) == min(256, int(m / 10 * 256))
    assert float(randaugment._level(jnp.float32(m), 110.0)) == int(m / 10 * 110)
    # timm negates these at random (with even odds, as `rand_augment` draws the sign): their sizes agree.
    for ours, theirs in ((30.0, aa._rotate_level_to_arg), (0.3, aa._shear_level_to_arg),
                         (0.45, aa._translate_rel_level_to_arg)):
      np.testing.assert_allclose(float(randaugment._signed(jnp.float32(m), 1.0, ours)), abs(theirs(m, {})[0]),
                                 rtol=1e-6)
    assert float(randaugment._enhance_factor(jnp.float32(m), 1.0)) == pytest.approx(
        max(0.1, 1.0 + m / 10 * 0.9), rel=1e-6)
    assert aa._enhance_increasing_level_to_arg(m, {})[0] in (
        pytest.approx(max(0.1, 1.0 + m / 10 * 0.9)), pytest.approx(max(0.1, 1.0 - m / 10 * 0.9)))


def test_the_batch_draw():
  """Magnitudes N(9, 0.5) clipped to [0, 10] (std > 100: uniform); each op applied with probability `prob`; a pure
  function of its key; prob 0 leaves the images as they are."""
  key = jax.random.key(0)
  m = np.asarray(randaugment.magnitudes(key, (20000,), 9.0, 0.5))
  assert m.max() <= 10.0 and abs(m.mean() - 9.0) < 0.02 and abs(m[m < 9.5].std() - 0.5) < 0.15
  assert np.mean(m == 10.0) == pytest.approx(0.0228, abs=0.005)  # P(N(9, 0.5) >= 10)
  u = np.asarray(randaugment.magnitudes(key, (20000,), 9.0, 101.0))
  assert u.min() >= 0 and u.max() <= 9.0 and abs(u.mean() - 4.5) < 0.1
  images = jnp.asarray(np.random.default_rng(1).integers(0, 256, size=(64, 8, 8, 3)), jnp.float32)
  a = randaugment.rand_augment(key, images, 2, 9.0, 0.5, 0.5, FILL)
  np.testing.assert_array_equal(a, randaugment.rand_augment(key, images, 2, 9.0, 0.5, 0.5, FILL))
  changed = np.mean(np.any(np.asarray(a) != np.asarray(images), axis=(1, 2, 3)))
  assert 0.6 < changed < 0.9  # 1 - (1 - 0.5)^2 = 0.75 of the examples take at least one op
  np.testing.assert_array_equal(randaugment.rand_augment(key, images, 2, 9.0, 0.5, 0.0, FILL), images)
  assert np.all(np.asarray(a) == np.round(np.asarray(a))) and a.min() >= 0 and a.max() <= 255


def test_views_apply_it_in_pixels_and_normalise_again():
  """Through `views.apply`, RandAugment reads the batch's pixels (undone normalisation) and returns it normalised:
  with prob 1 and magnitude 10 of Invert only, each image is 255 - pixels."""
  cfg = config_lib.base().data
  cfg.randaugment.update(num_ops=1, magnitude=10.0, magnitude_std=0.0, prob=1.0)
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  pixels = np.random.default_rng(2).integers(0, 256, size=(4, 6, 6, 3)).astype(np.float32)
  x = (pixels / 255.0 - np.array(mean)) / np.array(std)
  rng = jax.random.key(3)
  out, targets = views.apply(cfg, rng, jnp.asarray(x, jnp.float32), jnp.zeros(4, jnp.int32), 10, mean, std)
  assert targets is None
  back = np.asarray(out) * np.array(std) * 255.0 + np.array(mean) * 255.0
  # Which op each example drew, from the same key as `views.apply` draws it.
  expected = np.asarray(randaugment.rand_augment(jax.random.fold_in(rng, 1), jnp.asarray(pixels), 1, 10.0, 0.0, 1.0,
                                                 np.round(np.array(mean) * 255.0)))
  np.testing.assert_allclose(back, expected, atol=1e-3)
  assert np.any(np.abs(back - pixels) > 1)


@pytest.mark.parametrize('field, value, message', [
    ('num_ops', 1.5, 'config.data.randaugment.num_ops must be an integer, got 1.5'),
    ('num_ops', -1, 'config.data.randaugment.num_ops'),
    ('magnitude', 11.0, 'config.data.randaugment.magnitude'),
    ('prob', 1.5, 'config.data.randaugment.prob'),
    ('magnitude_std', -0.5, 'config.data.randaugment.magnitude_std must be >= 0.0, got -0.5'),
    ('magnitude_std', float('nan'), 'config.data.randaugment.magnitude_std must be a finite number, got nan'),
])
def test_bad_settings_are_refused_by_name(field, value, message):
  cfg = config_lib.base()
  cfg.student.model = 'cnn_small'
  cfg.data.name = 'digits'
  settings = dict(num_ops=2, magnitude=9.0, magnitude_std=0.5, prob=0.5)
  settings[field] = value
  cfg.data.randaugment = settings  # the section replaced whole, as a config file may (a field keeps its type)
  with pytest.raises(errors.ConfigError, match='^' + message.replace('(', r'\(').replace(')', r'\)')):
    validate.check(cfg)


def test_a_cached_teacher_table_is_refused_with_it():
  cfg = config_lib.base()
  cfg.update(dict(student=dict(model='cnn_small'), teacher=dict(model='cnn_small', checkpoint='/nowhere')))
  cfg.data.name = 'digits'
  cfg.data.randaugment.num_ops = 2
  cfg.distill.cache_teacher = 'on'
  with pytest.raises(errors.ConfigError, match=r"^config.distill.cache_teacher='on' with data.mixup/cutmix/erasing/"
                     'inception_crop/randaugment'):
    validate.check(cfg)
