"""The on-device half of the data path: batches are gathered, augmented and normalised inside the jitted step.

The uint8 arrays are replicated on every device once; each step indexes them with a slice of the epoch's
permutation (drawn from `fold_in(rng, epoch)`), so the host never touches a batch and a resumed run sees the same
order as an uninterrupted one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.data import Split


def put_replicated(split: Split, sharding) -> dict:
  return {'images': jax.device_put(split.images, sharding), 'labels': jax.device_put(split.labels, sharding)}


def epoch_permutation(rng, epoch, num_examples: int):
  return jax.random.permutation(jax.random.fold_in(rng, epoch), num_examples)


def normalize(images_u8, mean, std, dtype):
  x = images_u8.astype(jnp.float32) / 255.0
  x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return x.astype(dtype)


def crop_flip(rng, images, pad: int = 4):
  """Random crop with `pad` zero padding and a random horizontal flip, per example (torchvision's
  RandomCrop(size, padding=4) + RandomHorizontalFlip, which the CIFAR references use)."""
  n, h, w, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  k_y, k_x, k_f = jax.random.split(rng, 3)
  ys = jax.random.randint(k_y, (n,), 0, 2 * pad + 1)
  xs = jax.random.randint(k_x, (n,), 0, 2 * pad + 1)
  flips = jax.random.bernoulli(k_f, 0.5, (n,))

  def one(img, y, x, flip):
    img = jax.lax.dynamic_slice(img, (y, x, 0), (h, w, img.shape[-1]))
    return jnp.where(flip, img[:, ::-1], img)

  return jax.vmap(one)(padded, ys, xs, flips)


def gather(data: dict, perm, step_in_epoch, batch_size: int, rng, augment: str):
  """The batch at `step_in_epoch` of the epoch whose permutation is `perm`: (uint8 images, augmented when `augment`
  is 'crop_flip', int32 labels, the examples' indices in the training set)."""
  idx = jax.lax.dynamic_slice_in_dim(perm, step_in_epoch * batch_size, batch_size)
  images = data['images'][idx]
  if augment == 'crop_flip':
    images = crop_flip(rng, images)
  return images, data['labels'][idx], idx


def padded_eval_arrays(split: Split, batch_size: int) -> dict:
  """Host arrays [num_batches, batch, ...] with a mask, so every example is counted exactly once."""
  n = len(split)
  num_batches = -(-n // batch_size)
  pad = num_batches * batch_size - n
  images = np.concatenate([split.images, np.zeros((pad,) + split.images.shape[1:], np.uint8)])
  labels = np.concatenate([split.labels, np.zeros((pad,), np.int32)])
  mask = np.concatenate([np.ones((n,), bool), np.zeros((pad,), bool)])
  shape = (num_batches, batch_size)
  return {'images': images.reshape(shape + split.images.shape[1:]), 'labels': labels.reshape(shape),
          'mask': mask.reshape(shape)}


# ------------------------------------------------------------------------------------------- strong augmentation
# The strong view of MLKD (Jin et al., CVPR 2023), on the device: the references' (Multi-Level-Logit-Distillation,
# and logit-standardization-KD's mdistiller/dataset/cifar100.py `get_cifar100_train_transform_strong`) strong
# transform is RandomCrop + flip, then RandAugment(2 ops drawn with replacement from a list of 14, each at a
# magnitude uniform in its range), then Cutout of a square of side U(0, 0.5) * width, filled with (125, 123, 114).
# Here: 12 of the 14 ops (Equalize and Sharpness left out), on float pixels in [0, 255], geometric ops by
# nearest-neighbour sampling with zero fill; each op a pure function (image [H, W, C], magnitude).

def _blend(degenerate, img, v):  # PIL ImageEnhance: degenerate * (1 - v) + img * v
  return jnp.clip(degenerate + v * (img - degenerate), 0.0, 255.0)


def _gray(img):
  if img.shape[-1] == 1:
    return img
  return jnp.sum(img * jnp.asarray([0.299, 0.587, 0.114], img.dtype), axis=-1, keepdims=True)


def _affine(img, a, b, c, d, e, f, fill=0.0):
  """PIL's Image.transform(AFFINE, (a, b, c, d, e, f)): output (x, y) samples input (a x + b y + c, d x + e y + f),
  nearest neighbour, `fill` (a value or one per channel) outside."""
  h, w = img.shape[:2]
  ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing='ij')
  sx = jnp.floor(a * (xs + 0.5) + b * (ys + 0.5) + c).astype(jnp.int32)
  sy = jnp.floor(d * (xs + 0.5) + e * (ys + 0.5) + f).astype(jnp.int32)
  inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
  out = img[jnp.clip(sy, 0, h - 1), jnp.clip(sx, 0, w - 1)]
  return jnp.where(inside[..., None], out, jnp.asarray(fill, img.dtype))


def _rotate(img, deg, fill=0.0):  # PIL Image.rotate(deg): counter-clockwise about the centre
  h, w = img.shape[:2]
  t = jnp.deg2rad(deg)
  cos, sin = jnp.cos(t), jnp.sin(t)
  cx, cy = w / 2.0, h / 2.0
  # Inverse map of a counter-clockwise rotation (y down): x' = cos (x - cx) - sin (y - cy) + cx, ...
  return _affine(img, cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy, fill)


def _autocontrast(img, _):
  lo, hi = jnp.min(img, axis=(0, 1)), jnp.max(img, axis=(0, 1))
  scale = jnp.where(hi > lo, 255.0 / jnp.maximum(hi - lo, 1e-6), 1.0)
  return jnp.where(hi > lo, (img - lo) * scale, img)


def _posterize(img, v):
  shift = 8 - jnp.maximum(jnp.floor(v), 1.0)
  step = 2.0 ** shift
  return jnp.floor(img / step) * step


STRONG_OPS = (  # (name, function, lowest, highest magnitude), the reference's list minus Equalize and Sharpness
    ('AutoContrast', _autocontrast, 0.0, 1.0),
    ('Brightness', lambda img, v: _blend(jnp.zeros_like(img), img, v), 0.05, 0.95),
    ('Color', lambda img, v: _blend(jnp.broadcast_to(_gray(img), img.shape), img, v), 0.05, 0.95),
    ('Contrast', lambda img, v: _blend(jnp.full_like(img, jnp.mean(_gray(img))), img, v), 0.05, 0.95),
    ('Identity', lambda img, v: img, 0.0, 1.0),
    ('Posterize', _posterize, 4.0, 8.0),
    ('Rotate', _rotate, -30.0, 30.0),
    ('ShearX', lambda img, v: _affine(img, 1.0, v, 0.0, 0.0, 1.0, 0.0), -0.3, 0.3),
    ('ShearY', lambda img, v: _affine(img, 1.0, 0.0, 0.0, v, 1.0, 0.0), -0.3, 0.3),
    ('Solarize', lambda img, v: jnp.where(img >= v, 255.0 - img, img), 0.0, 256.0),
    ('TranslateX', lambda img, v: _affine(img, 1.0, 0.0, v * img.shape[1], 0.0, 1.0, 0.0), -0.3, 0.3),
    ('TranslateY', lambda img, v: _affine(img, 1.0, 0.0, 0.0, 0.0, 1.0, v * img.shape[0]), -0.3, 0.3),
)
CUTOUT_FILL = (125.0, 123.0, 114.0)


def cutout(img, size, x0, y0):
  """The reference's Cutout: a square of side `size` pixels at the uniform point (x0, y0), moved back by size / 2
  and clipped to the image (PIL's rectangle includes its far corner), filled with CUTOUT_FILL."""
  h, w, c = img.shape
  left = jnp.floor(jnp.maximum(0.0, x0 - size / 2.0))
  top = jnp.floor(jnp.maximum(0.0, y0 - size / 2.0))
  ys, xs = jnp.arange(h, dtype=jnp.float32)[:, None], jnp.arange(w, dtype=jnp.float32)[None, :]
  box = (xs >= left) & (xs <= jnp.minimum(w, left + size)) & (ys >= top) & (ys <= jnp.minimum(h, top + size))
  fill = jnp.asarray(CUTOUT_FILL[:c] if c <= 3 else CUTOUT_FILL[:1] * c, img.dtype)
  return jnp.where((box & (size > 0))[..., None], fill, img)


def rand_augment(rng, images, num_ops: int = 2):
  """RandAugment as the MLKD reference runs it (n = 2, magnitude uniform per op) followed by its Cutout, per
  example; uint8 images in, uint8 images out."""
  n, h, w, _ = images.shape
  k_op, k_v, k_cut = jax.random.split(rng, 3)
  ops = jax.random.randint(k_op, (n, num_ops), 0, len(STRONG_OPS))
  u = jax.random.uniform(k_v, (n, num_ops))
  cut = jax.random.uniform(k_cut, (n, 3))
  low = jnp.asarray([o[2] for o in STRONG_OPS], jnp.float32)
  high = jnp.asarray([o[3] for o in STRONG_OPS], jnp.float32)
  branches = [o[1] for o in STRONG_OPS]

  def one(img, ops, u, cut):
    img = img.astype(jnp.float32)
    for j in range(num_ops):
      v = low[ops[j]] + (high[ops[j]] - low[ops[j]]) * u[j]
      img = jax.lax.switch(ops[j], branches, img, v)
    img = cutout(img, cut[0] * 0.5 * w, cut[1] * w, cut[2] * h)
    return jnp.clip(jnp.round(img), 0, 255).astype(jnp.uint8)

  return jax.vmap(one)(images, ops, u, cut)


def strong_view(rng, images, augment: str):
  """MLKD's strong view of the un-augmented uint8 `images`: its own crop and flip (when the dataset is augmented),
  then `rand_augment` (uint8 out)."""
  k_crop, k_ra = jax.random.split(rng)
  if augment == 'crop_flip':
    images = crop_flip(k_crop, images)
  return rand_augment(k_ra, images)
