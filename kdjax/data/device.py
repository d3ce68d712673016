"""The on-device half of the data path: batches are gathered, augmented and normalised inside the jitted step.

The uint8 arrays are replicated on every device once; each step indexes them with a slice of the epoch's
permutation (drawn from `fold_in(rng, epoch)`), so the host never touches a batch and a resumed run sees the same
order as an uninterrupted one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.data import Dataset, Split


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


def train_batch(data: dict, perm, step_in_epoch, batch_size: int, rng, ds_info: Dataset, dtype):
  """The batch at `step_in_epoch` of the epoch whose permutation is `perm`: (images in `dtype`, int32 labels,
  the examples' indices in the training set)."""
  idx = jax.lax.dynamic_slice_in_dim(perm, step_in_epoch * batch_size, batch_size)
  images = data['images'][idx]
  if ds_info.augment == 'crop_flip':
    images = crop_flip(rng, images)
  return normalize(images, ds_info.mean, ds_info.std, dtype), data['labels'][idx], idx


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
