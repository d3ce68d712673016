"""Consistent views: batch augmentations made once inside the train step, on the device, so that the teacher and
every student read the same pixels (function matching, Beyer et al. 2022: the teacher is queried on the very
mixed image the student sees, not on the clean one).

Each op is a pure function of (rng, images) on float images [B, H, W, C] (already normalised: the step applies them
after `step.normalize`), in the order the step runs them:
  `inception_crop`  RandomResizedCrop back to the batch's size: torchvision's box draw (area fraction in `scale`,
                    log-uniform aspect ratio in 3/4..4/3, 10 tries, else a central crop), bilinear with antialiasing
                    (PIL's filter; jax.image.scale_and_translate); with `flip`, then RandomHorizontalFlip (`flip_lr`)
  `rand_augment`    timm's RandAugment (DeiT's rand-m9-mstd0.5-inc1; kdjax/data/randaugment.py) on the batch's
                    whole pixel values, normalised again after
  `random_erasing`  torchvision's RandomErasing after Normalize (value 0: the dataset's mean pixel): with
                    probability p a box of area fraction in (0.02, 1/3), aspect ratio log-uniform in (0.3, 3.3),
                    10 tries
  `mixup`/`cutmix`  each example mixed with its partner in the reversed batch (timm's pairing), a lambda per
                    example (mode 'example', timm's 'elem') or one per batch (mode 'batch', big_vision's); cutmix's
                    lambda corrected to the pasted box's area. With both on, each example (or the batch) takes one
                    of them with equal odds (timm's switch_prob 0.5).
The labels become soft targets [B, classes] (`apply`), which the 'ce' term reads (cross-entropy with mixed targets).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kdjax.data import randaugment

# The rng stream of the data seed these ops draw from (kdjax/step.py `seed_key`; 4 and up are the extra views').
STREAM = 64
TRIES = 10
ERASE_SCALE, ERASE_RATIO = (0.02, 1.0 / 3.0), (0.3, 3.3)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def enabled(data_cfg) -> bool:
  """Whether `config.data` asks for any consistent-view op."""
  return bool(data_cfg.mixup.alpha > 0 or data_cfg.cutmix.alpha > 0 or data_cfg.erasing.prob > 0
              or data_cfg.inception_crop.enabled or data_cfg.randaugment.num_ops > 0)


def rand_augment(rng, data_cfg, x, mean, std):
  """timm's RandAugment (kdjax/data/randaugment.py) of the normalised batch `x`: back to whole pixel values (a PIL
  image's, which timm's ops read), augmented, normalised again; the fill is timm's `img_mean`, round(255 mean)."""
  ra = data_cfg.randaugment
  mean = jnp.asarray(mean, jnp.float32) * 255.0
  std = jnp.asarray(std, jnp.float32) * 255.0
  pixels = jnp.clip(jnp.round(x.astype(jnp.float32) * std + mean), 0.0, 255.0)
  out = randaugment.rand_augment(rng, pixels, ra.num_ops, ra.magnitude, ra.magnitude_std, ra.prob, jnp.round(mean))
  return ((out - mean) / std).astype(x.dtype)


def boxes(rng, n: int, height: int, width: int, scale, ratio, fallback: str):
  """Per example (top, left, h, w) int32 [n]: torchvision's draw (RandomResizedCrop.get_params,
  RandomErasing.get_params): up to TRIES area fractions ~ U(scale) and aspect ratios (w / h) log-uniform in `ratio`,
  sides rounded, the first that fits taken, its position uniform over the valid offsets. None fits: `fallback`
  'center' (RandomResizedCrop's central crop clamped to the ratio range) or 'none' (RandomErasing: an empty box)."""
  k_a, k_r, k_y, k_x = jax.random.split(rng, 4)
  area = height * width * jax.random.uniform(k_a, (n, TRIES), minval=scale[0], maxval=scale[1])
  aspect = jnp.exp(jax.random.uniform(k_r, (n, TRIES), minval=math.log(ratio[0]), maxval=math.log(ratio[1])))
  w = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  h = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  if fallback == 'none':  # RandomErasing asks for a box strictly inside the image
    fits = fits & (w < width) & (h < height)
  first = jnp.argmax(fits, axis=1)
  found = jnp.any(fits, axis=1)
  h, w = jnp.take_along_axis(h, first[:, None], 1)[:, 0], jnp.take_along_axis(w, first[:, None], 1)[:, 0]
  if fallback == 'center':
    in_ratio = width / height
    fh, fw = height, width
    if in_ratio < min(ratio):
      fh = int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
      fw = int(round(height * max(ratio)))
    h, w = jnp.where(found, h, fh), jnp.where(found, w, fw)
  else:
    h, w = jnp.where(found, h, 0), jnp.where(found, w, 0)
  top = jnp.floor(jax.random.uniform(k_y, (n,)) * (height - h + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(k_x, (n,)) * (width - w + 1)).astype(jnp.int32)
  if fallback == 'center':
    top, left = jnp.where(found, top, (height - h) // 2), jnp.where(found, left, (width - w) // 2)
  return top, left, h, w


def resized_crop(images, top, left, h, w):
  """Each image's box (top, left, h, w) resized to the batch's size: bilinear, antialiased when shrinking (PIL's
  `resize(box=...)` of the crop on float pixels)."""
  _, height, width, c = images.shape

  def one(img, t, l, bh, bw):
    s = jnp.stack([height / bh, width / bw]).astype(jnp.float32)
    shift = -jnp.stack([t, l]).astype(jnp.float32) * s
    return jax.image.scale_and_translate(img, (height, width, c), (0, 1), s, shift, method='linear', antialias=True)

  return jax.vmap(one)(images, top, left, h, w).astype(images.dtype)


def inception_crop(rng, images, scale=(0.08, 1.0)):
  """RandomResizedCrop(scale, ratio 3/4..4/3) of every image, back to the batch's size."""
  n, height, width, _ = images.shape
  return resized_crop(images, *boxes(rng, n, height, width, scale, CROP_RATIO, 'center'))


def flip_lr(rng, images):
  """Each image mirrored left-right with probability 1/2."""
  flips = jax.random.bernoulli(rng, 0.5, (images.shape[0],))
  return jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)


def box_mask(height: int, width: int, top, left, h, w):
  """[n, H, W, 1] True inside each example's box."""
  ys, xs = jnp.arange(height)[None, :, None], jnp.arange(width)[None, None, :]
  t, l = top[:, None, None], left[:, None, None]
  inside = (ys >= t) & (ys < t + h[:, None, None]) & (xs >= l) & (xs < l + w[:, None, None])
  return inside[..., None]


def random_erasing(rng, images, prob: float):
  """With probability `prob` per image, a box (area fraction 0.02..1/3, aspect ratio 0.3..3.3) set to 0."""
  n, height, width, _ = images.shape
  k_p, k_box = jax.random.split(rng)
  top, left, h, w = boxes(k_box, n, height, width, ERASE_SCALE, ERASE_RATIO, 'none')
  erase = jax.random.bernoulli(k_p, prob, (n,))
  mask = box_mask(height, width, top, left, h, w) & erase[:, None, None, None]
  return jnp.where(mask, jnp.zeros((), images.dtype), images)


def lambdas(rng, n: int, alpha: float, prob: float, mode: str):
  """Mixing weights [n] of the examples themselves: Beta(alpha, alpha) drawn per example ('example') or once
  ('batch'); an example (the batch) left unmixed, lambda 1, with probability 1 - prob."""
  k_l, k_p = jax.random.split(rng)
  m = n if mode == 'example' else 1
  lam = jax.random.beta(k_l, alpha, alpha, (m,))
  lam = jnp.where(jax.random.bernoulli(k_p, prob, (m,)), lam, 1.0)
  return jnp.broadcast_to(lam, (n,))


def partner(x):
  """Each example's mixing partner: the batch reversed (example i with example B - 1 - i)."""
  return x[::-1]


def mixup(images, targets, lam):
  """lambda * x + (1 - lambda) * partner(x), and the same of the soft targets."""
  l_img = lam.astype(images.dtype)[:, None, None, None]
  l_t = lam[:, None]
  return l_img * images + (1 - l_img) * partner(images), l_t * targets + (1 - l_t) * partner(targets)


def cutmix_boxes(rng, lam, height: int, width: int, mode: str = 'example'):
  """timm's `rand_bbox`: a box of sides int(H sqrt(1 - lambda)), int(W sqrt(1 - lambda)) centred at a uniform
  pixel (one per example, or one for the batch in mode 'batch'), clipped to the image; (top, left, h, w) int32
  [n]."""
  k_y, k_x = jax.random.split(rng)
  n = lam.shape[0]
  m = n if mode == 'example' else 1
  cut = jnp.sqrt(1.0 - lam)
  ch, cw = (height * cut).astype(jnp.int32), (width * cut).astype(jnp.int32)
  cy = jnp.broadcast_to(jax.random.randint(k_y, (m,), 0, height), (n,))
  cx = jnp.broadcast_to(jax.random.randint(k_x, (m,), 0, width), (n,))
  top, bottom = jnp.clip(cy - ch // 2, 0, height), jnp.clip(cy + ch // 2, 0, height)
  left, right = jnp.clip(cx - cw // 2, 0, width), jnp.clip(cx + cw // 2, 0, width)
  return top, left, bottom - top, right - left


def cutmix(images, targets, top, left, h, w):
  """The partner's pixels pasted into each example's box; the targets mixed by the kept area
  (lambda = 1 - box area / image area, timm's correct_lam)."""
  _, height, width, _ = images.shape
  mask = box_mask(height, width, top, left, h, w)
  lam = 1.0 - (h * w).astype(jnp.float32) / (height * width)
  return jnp.where(mask, partner(images), images), lam[:, None] * targets + (1 - lam[:, None]) * partner(targets)


def _mix(rng, data_cfg, x, targets):
  """Mixup and/or cutmix of (x, targets), as configured."""
  n, height, width, _ = x.shape
  mix, cut = data_cfg.mixup, data_cfg.cutmix
  k_mix, k_cut, k_box, k_switch = jax.random.split(rng, 4)
  outs = []
  if mix.alpha > 0:
    outs.append(mixup(x, targets, lambdas(k_mix, n, mix.alpha, mix.prob, mix.mode)))
  if cut.alpha > 0:
    lam = lambdas(k_cut, n, cut.alpha, cut.prob, cut.mode)
    outs.append(cutmix(x, targets, *cutmix_boxes(k_box, lam, height, width, cut.mode)))
  if len(outs) == 1:
    return outs[0]
  m = n if mix.mode == 'example' else 1
  use_cut = jnp.broadcast_to(jax.random.bernoulli(k_switch, 0.5, (m,)), (n,))
  return (jnp.where(use_cut[:, None, None, None], outs[1][0], outs[0][0]),
          jnp.where(use_cut[:, None], outs[1][1], outs[0][1]))


def apply(data_cfg, rng, x, labels, num_classes: int, mean=(0.0,), std=(1.0,)):
  """The configured ops on the normalised batch `x` [B, H, W, C] with integer `labels` [B] (`mean`, `std`: the
  normalisation, for RandAugment's pixels): (images, soft targets [B, num_classes] float32, None when no mixing op
  is on)."""
  k_crop, k_flip, k_erase, k_mix = jax.random.split(rng, 4)
  crop = data_cfg.inception_crop
  if crop.enabled:
    x = inception_crop(k_crop, x, (crop.min_scale, crop.max_scale))
    if crop.flip:
      x = flip_lr(k_flip, x)
  if data_cfg.randaugment.num_ops > 0:
    x = rand_augment(jax.random.fold_in(rng, 1), data_cfg, x, mean, std)
  if data_cfg.erasing.prob > 0:
    x = random_erasing(k_erase, x, data_cfg.erasing.prob)
  if not (data_cfg.mixup.alpha > 0 or data_cfg.cutmix.alpha > 0):
    return x, None
  return _mix(k_mix, data_cfg, x, jax.nn.one_hot(labels, num_classes, dtype=jnp.float32))
