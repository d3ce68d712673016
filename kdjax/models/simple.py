"""The seed projects' small models: MLPs and small CNNs for digits/MNIST/CIFAR-10 experiments."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from kdjax.models import layers, register


class MLP(nn.Module):
  """Flatten -> [Dense -> ReLU -> Dropout] per hidden size. Hinton et al.'s MNIST teacher is 2x1200 with dropout."""
  pooled_embedding = False
  convolutional = False
  hidden: Sequence[int] = (800, 800)
  dropout: float = 0.0
  input_dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = layers.flatten(x)
    if self.input_dropout:
      x = nn.Dropout(self.input_dropout, deterministic=not train)(x)
    features, preact = [], []
    for width in self.hidden:
      h = layers.dense(width, fan_in=x.shape[-1], dtype=self.dtype)(x)
      preact.append(h)
      x = nn.relu(h)
      features.append(x)
      if self.dropout:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return features, preact, x


class SmallCNN(nn.Module):
  """Two blocks of conv3x3 -> BN -> ReLU -> max-pool 2, then dense layers (the last one is the `Head`)."""
  pooled_embedding = False  # dense layers sit between the last conv map and the head
  channels: Sequence[int] = (32, 64)
  hidden: Sequence[int] = (128, 64)
  batch_norm: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    features, preact = [], []
    for c in self.channels:
      h = layers.conv(c, 3, use_bias=not self.batch_norm, fan_in=x.shape[-1] * 9, dtype=self.dtype)(x)
      if self.batch_norm:
        h = layers.batch_norm(train, self.dtype)(h)
      preact.append(h)
      x = nn.relu(h)
      features.append(x)
      x = layers.max_pool(x, 2)
    x = layers.flatten(x)
    for width in self.hidden:
      x = nn.relu(layers.dense(width, fan_in=x.shape[-1], dtype=self.dtype)(x))
    return features, preact, x


register('mlp', MLP)
register('mlp_teacher', MLP, hidden=(1200, 1200), dropout=0.5, input_dropout=0.2)
register('mlp_student', MLP, hidden=(800, 800))
register('cnn_small', SmallCNN)
# The 2-conv-layer CNN student of the CIFAR-10 Hinton-KD seed: no BatchNorm, one hidden dense layer.
register('cnn2', SmallCNN, channels=(32, 64), hidden=(128,), batch_norm=False)
