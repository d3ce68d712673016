"""timm's RandAugment as DeiT trains with it (`--aa rand-m9-mstd0.5-inc1`: timm/data/auto_augment.py
`rand_augment_transform`), on the device: per example, `num_ops` ops drawn with replacement from timm's 15
"increasing" ops, each applied with probability `prob` (timm's 0.5) at a magnitude drawn from N(magnitude,
magnitude_std) clipped to [0, 10] (`magnitude_std` > 100: uniform in [0, magnitude], timm's rule), signed ops negated
with even odds.

Every op is a pure function of (image [H, W, C] float holding whole pixel values in [0, 255], magnitude, sign, fill)
and follows Pillow's integer arithmetic (its look-up tables, truncating blends, the SMOOTH filter that keeps the
border), so that each equals timm's own op on the same PIL image (tests/test_randaugment.py). One deliberate
difference: the geometric ops (Rotate, ShearX/Y, TranslateX/YRel) sample nearest-neighbour, where timm draws bilinear
or bicubic per call; the area outside is filled with `fill` (timm's `img_mean`, the dataset's mean pixel).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax.data import device

LEVEL_DENOM = 10.0   # timm's _LEVEL_DENOM: magnitudes run over [0, 10]
TRANSLATE_PCT = 0.45  # timm's default translate_pct (TranslateXRel / TranslateYRel)


def _lut(img, table):
  """Pillow's Image.point: each whole pixel value v becomes table[v] (table [256] or [256, C])."""
  idx = jnp.clip(img, 0, 255).astype(jnp.int32)
  if table.ndim == 1:
    return table[idx]
  return jnp.take_along_axis(table.T, jnp.moveaxis(idx, -1, 0).reshape(idx.shape[-1], -1), axis=1).reshape(
      idx.shape[-1], *idx.shape[:-1]).transpose(*range(1, idx.ndim), 0)


def _blend(degenerate, img, factor):
  """Pillow's Image.blend(degenerate, img, factor) on 8-bit images: truncated toward zero, clipped to [0, 255]."""
  return jnp.floor(jnp.clip(degenerate + factor * (img - degenerate), 0.0, 255.0))


def _luma(img):
  """Pillow's convert('L') of an RGB image: (R 19595 + G 38470 + B 7471 + 2^15) >> 16; a one-channel image is its own."""
  if img.shape[-1] == 1:
    return img
  weights = jnp.asarray([19595.0, 38470.0, 7471.0], jnp.float32)
  return jnp.floor((jnp.sum(img * weights, axis=-1, keepdims=True) + 32768.0) / 65536.0)


def auto_contrast(img):
  """ImageOps.autocontrast (cutoff 0): each channel's [lo, hi] stretched to [0, 255], truncated; flat channels kept."""
  lo, hi = jnp.min(img, axis=(0, 1)), jnp.max(img, axis=(0, 1))
  scale = 255.0 / jnp.maximum(hi - lo, 1.0)
  return jnp.where(hi > lo, jnp.clip(jnp.floor(img * scale - lo * scale), 0.0, 255.0), img)


def equalize(img):
  """ImageOps.equalize: per channel, step = (pixels - the last used level's count) // 255, then
  lut[v] = (step // 2 + the count below v) // step; identity when step is 0 or one level is used."""
  idx = jnp.clip(img, 0, 255).astype(jnp.int32).reshape(-1, img.shape[-1])
  hist = jnp.sum(jax.nn.one_hot(idx, 256, dtype=jnp.int32, axis=0), axis=1)  # [256, C]
  levels = jnp.arange(256)[:, None]
  last = jnp.max(jnp.where(hist > 0, levels, -1), axis=0)
  last_count = jnp.take_along_axis(hist, last[None], axis=0)[0]
  step = (idx.shape[0] - last_count) // 255
  below = jnp.cumsum(hist, axis=0) - hist
  table = jnp.minimum((step // 2 + below) // jnp.maximum(step, 1), 255)
  table = jnp.where((step > 0) & (jnp.sum(hist > 0, axis=0) > 1), table, levels)
  return _lut(img, table.astype(img.dtype))


def posterize(img, bits):
  """ImageOps.posterize: keep the `bits` high bits (0 bits: black); 8 or more: unchanged."""
  step = 2.0 ** (8.0 - jnp.clip(bits, 0.0, 8.0))
  return jnp.floor(img / step) * step


def solarize(img, threshold):
  """ImageOps.solarize: values at or above `threshold` inverted."""
  return jnp.where(img >= threshold, 255.0 - img, img)


def solarize_add(img, add, threshold=128.0):
  """timm's solarize_add: values below `threshold` raised by `add`, at most 255."""
  return jnp.where(img < threshold, jnp.minimum(255.0, img + add), img)


def color(img, factor):
  """ImageEnhance.Color: a blend with the image's grey (Pillow's luma) version."""
  return _blend(jnp.broadcast_to(_luma(img), img.shape), img, factor)


def contrast(img, factor):
  """ImageEnhance.Contrast: a blend with the mean grey level, int(mean of the luma + 0.5)."""
  return _blend(jnp.full_like(img, jnp.floor(jnp.mean(_luma(img)) + 0.5)), img, factor)


def brightness(img, factor):
  """ImageEnhance.Brightness: a blend with black."""
  return _blend(jnp.zeros_like(img), img, factor)


def sharpness(img, factor):
  """ImageEnhance.Sharpness: a blend with ImageFilter.SMOOTH (3x3, centre 5, the rest 1, over 13; rounded), whose
  border pixels Pillow leaves as they are."""
  h, w, _ = img.shape
  padded = jnp.pad(img, ((1, 1), (1, 1), (0, 0)))
  total = sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) + 4.0 * img
  smooth = jnp.clip(jnp.floor(total / 13.0 + 0.5), 0.0, 255.0)
  ys, xs = jnp.arange(h)[:, None, None], jnp.arange(w)[None, :, None]
  border = (ys == 0) | (ys == h - 1) | (xs == 0) | (xs == w - 1)
  return _blend(jnp.where(border, img, smooth), img, factor)


def _signed(m, sign, scale):
  return sign * m / LEVEL_DENOM * scale


def _enhance_factor(m, sign):  # timm's _enhance_increasing_level_to_arg
  return jnp.maximum(0.1, 1.0 + _signed(m, sign, 0.9))


def _level(m, scale):  # int((m / 10) * scale) of a magnitude >= 0
  return jnp.floor(m / LEVEL_DENOM * scale)


# timm's _RAND_INCREASING_TRANSFORMS in its order: (name, op(img, magnitude, sign, fill)).
OPS = (
    ('AutoContrast', lambda img, m, s, fill: auto_contrast(img)),
    ('Equalize', lambda img, m, s, fill: equalize(img)),
    ('Invert', lambda img, m, s, fill: 255.0 - img),
    ('Rotate', lambda img, m, s, fill: device._rotate(img, _signed(m, s, 30.0), fill)),
    ('PosterizeIncreasing', lambda img, m, s, fill: posterize(img, 4.0 - _level(m, 4.0))),
    ('SolarizeIncreasing', lambda img, m, s, fill: solarize(img, 256.0 - jnp.minimum(256.0, _level(m, 256.0)))),
    ('SolarizeAdd', lambda img, m, s, fill: solarize_add(img, jnp.minimum(128.0, _level(m, 110.0)))),
    ('ColorIncreasing', lambda img, m, s, fill: color(img, _enhance_factor(m, s))),
    ('ContrastIncreasing', lambda img, m, s, fill: contrast(img, _enhance_factor(m, s))),
    ('BrightnessIncreasing', lambda img, m, s, fill: brightness(img, _enhance_factor(m, s))),
    ('SharpnessIncreasing', lambda img, m, s, fill: sharpness(img, _enhance_factor(m, s))),
    ('ShearX', lambda img, m, s, fill: device._affine(img, 1.0, _signed(m, s, 0.3), 0.0, 0.0, 1.0, 0.0, fill)),
    ('ShearY', lambda img, m, s, fill: device._affine(img, 1.0, 0.0, 0.0, _signed(m, s, 0.3), 1.0, 0.0, fill)),
    ('TranslateXRel', lambda img, m, s, fill: device._affine(
        img, 1.0, 0.0, _signed(m, s, TRANSLATE_PCT) * img.shape[1], 0.0, 1.0, 0.0, fill)),
    ('TranslateYRel', lambda img, m, s, fill: device._affine(
        img, 1.0, 0.0, 0.0, 0.0, 1.0, _signed(m, s, TRANSLATE_PCT) * img.shape[0], fill)),
)


def magnitudes(rng, shape, magnitude: float, magnitude_std: float):
  """timm's AugmentOp magnitude draw: fixed, N(magnitude, std) or (std > 100, timm's `mstd` rule) U(0, magnitude),
  clipped to [0, 10]."""
  if magnitude_std == 0:
    m = jnp.full(shape, magnitude, jnp.float32)
  elif magnitude_std > 100:
    m = jax.random.uniform(rng, shape, jnp.float32, 0.0, magnitude)
  else:
    m = magnitude + magnitude_std * jax.random.normal(rng, shape, jnp.float32)
  return jnp.clip(m, 0.0, LEVEL_DENOM)


def rand_augment(rng, pixels, num_ops: int, magnitude: float, magnitude_std: float, prob: float, fill):
  """RandAugment of a batch of pixel images [B, H, W, C] (whole values in [0, 255], float): per example `num_ops`
  ops with replacement, each applied with probability `prob`; `fill` [C] outside the geometric ops' image."""
  n = pixels.shape[0]
  k_op, k_apply, k_m, k_sign = jax.random.split(rng, 4)
  ops = jax.random.randint(k_op, (n, num_ops), 0, len(OPS))
  apply = jax.random.uniform(k_apply, (n, num_ops)) <= prob
  m = magnitudes(k_m, (n, num_ops), magnitude, magnitude_std)
  sign = jnp.where(jax.random.bernoulli(k_sign, 0.5, (n, num_ops)), -1.0, 1.0)
  fill = jnp.asarray(fill, jnp.float32)
  branches = [lambda img, m, s, f=f: f(img, m, s, fill) for _, f in OPS]

  def one(img, ops, apply, m, sign):
    for j in range(num_ops):
      img = jnp.where(apply[j], jax.lax.switch(ops[j], branches, img, m[j], sign[j]), img)
    return img

  return jax.vmap(one)(pixels.astype(jnp.float32), ops, apply, m, sign)
