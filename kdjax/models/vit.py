"""Vision Transformers: ViT / DeiT (Dosovitskiy et al. 2021; Touvron et al. 2021), timm's `VisionTransformer` and
`VisionTransformerDistilled` (timm/models/vision_transformer.py, deit.py) in Flax Linen.

Pre-norm blocks (LayerNorm eps 1e-6 -> multi-head self-attention -> residual; LayerNorm -> MLP with exact GELU ->
residual), a strided-convolution patch embedding, a class token, optionally a distillation token, learned position
embeddings over [tokens; patches], a final LayerNorm. The class token's output is the embedding the `Head` reads;
with `distilled=True` the distillation token's output is the second embedding, read by the Classifier's `head_dist`
(kdjax/models/__init__.py: in eval mode the logits are the average of both heads, DeiT's inference rule; in train
mode the class head's). Attention is `jax.nn.dot_product_attention` (XLA's fused kernel where the platform has one).

The position embeddings are sized by the input: any image whose height and width the patch size divides (224 px with
patch 16: 196 patches; 32 px with patch 4: 64); another size is refused in one line.

State-dict mapping to timm (kdjax/tools/import_torch.py derives it from these module names):
  patch_embed/proj/{kernel,bias}     <- patch_embed.proj.{weight,bias}     (OIHW -> HWIO)
  cls_token, dist_token, pos_embed   <- the same names, same shapes
  blocks_{i}/norm1, attn/qkv, attn/proj, norm2, mlp/fc1, mlp/fc2  <- blocks.{i}.<same>  (Linear weights transposed)
  norm                               <- norm
  head, head_dist                    <- head, head_dist

Features: f0 is the patch grid (position embeddings added), f1.. the patch tokens after evenly spaced blocks (the
last is the final block's), each as an NHWC map [B, H/p, W/p, D]; `preact` is the same.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.errors import ConfigError
from kdjax.models import layers, register

# timm's init_weights_vit_timm: Linear weights truncated normal (std 0.02), biases zero; position embeddings and the
# distillation token N(0, 0.02) truncated; the class token N(0, 1e-6); LayerNorms 1 and 0; the patch convolution
# keeps PyTorch's default.
_dense_init = nn.initializers.truncated_normal(0.02)
_LN_EPS = 1e-6


def _dense(features: int, name: str, dtype) -> nn.Dense:
  return nn.Dense(features, kernel_init=_dense_init, bias_init=nn.initializers.zeros, dtype=dtype,
                  param_dtype=jnp.float32, name=name)


def _norm(name: str, dtype) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=_LN_EPS, dtype=dtype, param_dtype=jnp.float32, name=name)


def attention(qkv):
  """softmax(q k^T / sqrt(head_dim)) v of qkv [B, T, 3, heads, head_dim] -> [B, T, heads, head_dim]."""
  return jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])


class Attention(nn.Module):
  """Multi-head self-attention with one qkv projection, as timm's `Attention` (qkv [B, T, 3, heads, head_dim])."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    qkv = _dense(3 * d, 'qkv', self.dtype)(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)
    return _dense(d, 'proj', self.dtype)(attention(qkv).reshape(b, t, d))


def gelu(x):
  """Exact GELU, x * (1 + erf(x / sqrt(2))) / 2, written as PyTorch's `nn.GELU()` computes it (timm's MLP).
  `jax.nn.gelu(approximate=False)` is the same function through `erfc`, whose XLA:CPU expansion (both of its
  branches, recomputed in each fusion that reads it) made a block's MLP about 15 ms slower forward + backward at the
  ViT pair's shapes (benchmarks/README.md); the two differ by float32 round-off."""
  return x * (0.5 * (1.0 + jax.lax.erf(x * jnp.asarray(0.5 ** 0.5, x.dtype))))


class Mlp(nn.Module):
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = gelu(_dense(self.hidden, 'fc1', self.dtype)(x))
    return _dense(x.shape[-1], 'fc2', self.dtype)(h)


def drop_path(x, rate: float, train: bool, module: nn.Module):
  """Stochastic depth: each example's residual branch dropped with probability `rate` (scaled by 1 / (1 - rate))
  in training; the identity in eval."""
  if not train or rate == 0.0:
    return x
  keep = jax.random.bernoulli(module.make_rng('dropout'), 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class Block(nn.Module):
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    d = x.shape[-1]
    h = Attention(self.num_heads, self.dtype, name='attn')(_norm('norm1', self.dtype)(x))
    x = x + drop_path(h, self.drop_path_rate, train, self)
    h = Mlp(int(d * self.mlp_ratio), self.dtype, name='mlp')(_norm('norm2', self.dtype)(x))
    return x + drop_path(h, self.drop_path_rate, train, self)


class PatchEmbed(nn.Module):
  embed_dim: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    p, fan_in = self.patch_size, self.patch_size * self.patch_size * x.shape[-1]
    return nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                   param_dtype=jnp.float32, kernel_init=layers.torch_uniform_fan_in(),
                   bias_init=layers.torch_bias_init(fan_in), name='proj')(x)


def feature_taps(depth: int, stages: int = 4) -> tuple[int, ...]:
  """The blocks (1-based) after which the patch tokens are a feature map: evenly spaced, the last one included."""
  return tuple(sorted({max(1, round(depth * (i + 1) / stages)) for i in range(stages)}))


class ViT(nn.Module):
  """ViT / DeiT backbone: (features, preact, embedding) or, with `distilled`, (..., distillation embedding)."""
  patch_size: int = 16
  embed_dim: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_ratio: float = 4.0
  distilled: bool = False
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  pooled_embedding = False  # the head reads the class token, not a pooled map (SimKD's reuse checks this)
  convolutional = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    b, height, width, _ = x.shape
    p, d = self.patch_size, self.embed_dim
    if height % p or width % p:
      raise ConfigError(f'ViT: image size {height}x{width} is not divisible by the patch size {p} '
                        '(student/teacher.kwargs.patch_size, or data.image_size)')
    if d % self.num_heads:
      raise ConfigError(f'ViT: embed_dim {d} is not divisible by num_heads {self.num_heads}')
    grid = PatchEmbed(d, p, self.dtype, name='patch_embed')(x)
    gh, gw = grid.shape[1], grid.shape[2]
    tokens = [self.param('cls_token', nn.initializers.normal(1e-6), (1, 1, d), jnp.float32)]
    if self.distilled:
      tokens.append(self.param('dist_token', _dense_init, (1, 1, d), jnp.float32))
    n = len(tokens)
    pos = self.param('pos_embed', _dense_init, (1, n + gh * gw, d), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(t, (b, 1, d)).astype(self.dtype) for t in tokens] +
                        [grid.reshape(b, gh * gw, d)], axis=1) + pos.astype(self.dtype)
    as_map = lambda h: h[:, n:].reshape(b, gh, gw, d)
    features, taps = [as_map(x)], feature_taps(self.depth)
    rates = [self.drop_path_rate * i / max(self.depth - 1, 1) for i in range(self.depth)]  # timm's linear rule
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_ratio, rates[i], self.dtype, name=f'blocks_{i}')(x, train)
      if i + 1 in taps:
        features.append(as_map(x))
    x = _norm('norm', self.dtype)(x)
    out = (features, list(features), x[:, 0])
    return out + (x[:, 1],) if self.distilled else out


# timm's deit_{tiny,small,base}_patch16_224 (and the *_distilled_* ones): the model's default image size is the
# dataset's; patch 16 divides 224.
_SIZES = {'tiny': (192, 3), 'small': (384, 6), 'base': (768, 12)}
for _size, (_dim, _heads) in _SIZES.items():
  register(f'deit_{_size}', ViT, embed_dim=_dim, num_heads=_heads, depth=12, patch_size=16,
           head_init='trunc_normal')
  register(f'deit_{_size}_distilled', ViT, embed_dim=_dim, num_heads=_heads, depth=12, patch_size=16,
           distilled=True, head_init='trunc_normal')
# A ViT for tests and the CPU-sized digits stand-in (8x8 images: 4 patches of 4x4).
register('vit_test', ViT, embed_dim=32, num_heads=2, depth=2, mlp_ratio=2.0, patch_size=4, head_init='trunc_normal')
register('vit_test_distilled', ViT, embed_dim=32, num_heads=2, depth=2, mlp_ratio=2.0, patch_size=4, distilled=True,
         head_init='trunc_normal')
