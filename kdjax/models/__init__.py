"""Model registry: `create(name, num_classes=..., **kwargs)` returns a Flax Linen `Classifier`.

Every model is a backbone plus a `Head`. The backbone returns the per-stage feature maps that feature-based KD
methods tap, and the pooled embedding; the head maps the embedding to logits and is callable on its own
(`model.apply(variables, embedding, method='classify')`), because SimKD reuses the teacher's classifier.

Feature convention (RepDistiller's `is_feat=True` list without its last element): `features[0]` is the stem output,
`features[1:]` the stage outputs, in forward order; `preact` holds the same maps before the final ReLU of each stage
where the references tap it (equal to `features` elsewhere); `embedding` is RepDistiller's `feat[-1]`.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax import losses
from kdjax.errors import ConfigError
from kdjax.models.layers import Head


@flax.struct.dataclass
class ModelOutput:
  logits: jax.Array      # [B, num_classes], float32
  embedding: jax.Array   # [B, D], float32: the pooled penultimate vector, the head's input
  features: tuple = ()   # per-stage maps, NHWC (or [B, D] for MLPs), compute dtype
  preact: tuple = ()     # the same stages before their final activation
  subclass_logits: jax.Array | None = None  # [B, num_classes * subclasses] when the head has subclasses
  # A backbone with a distillation token (DeiT): the class head's and the distillation head's logits [B, classes].
  # `logits` is then the class head's in training and their average in eval mode (DeiT's inference rule).
  cls_logits: jax.Array | None = None
  dist_logits: jax.Array | None = None


def pooled_embedding(model: 'Classifier') -> bool:
  """Whether the head sits directly on the global average of the last feature map (SimKD relies on it)."""
  return getattr(model.backbone, 'pooled_embedding', True)


def distilled(model: 'Classifier') -> bool:
  """Whether the backbone has a distillation token (DeiT) and so the Classifier a second head, `head_dist`."""
  return bool(getattr(getattr(model, 'backbone', model), 'distilled', False))


def convolutional(model: 'Classifier') -> bool:
  """Whether the backbone has convolutions (the CPU's auto steps per dispatch, kdjax.step, depends on it)."""
  return getattr(model.backbone, 'convolutional', True)


class Classifier(nn.Module):
  """A backbone (x, train) -> (features, preact, embedding) followed by a `Head`.

  With `subclasses` S > 1 (subclass distillation) the head has num_classes * S outputs, class c owning columns
  c*S .. c*S+S-1; `logits` are then the class logits, logsumexp over each class's subclasses.

  A backbone with a distillation token (`distilled`) returns a fourth value, that token's embedding, which a second
  head `head_dist` (num_classes outputs) maps to `dist_logits`; `logits` are the class head's in training and the
  mean of both heads in eval mode (timm's VisionTransformerDistilled).
  """
  backbone: nn.Module
  num_classes: int
  head_dropout: float = 0.0
  head_init: str = 'torch'
  subclasses: int = 1
  dtype: Any = jnp.float32

  def setup(self):
    self.head = Head(self.num_classes * self.subclasses, dropout_rate=self.head_dropout, init=self.head_init,
                     dtype=self.dtype)
    if distilled(self):
      if self.subclasses > 1:
        raise ConfigError('a model with a distillation token cannot have subclasses (student/teacher.subclasses)')
      self.head_dist = Head(self.num_classes, dropout_rate=self.head_dropout, init=self.head_init, dtype=self.dtype)

  def __call__(self, x, train: bool = False) -> ModelOutput:
    features, preact, embedding, *token = self.backbone(x.astype(self.dtype), train)
    embedding = embedding.astype(jnp.float32)
    raw = self.head(embedding, train)
    out = ModelOutput(logits=self._class_logits(raw), embedding=embedding, features=tuple(features),
                      preact=tuple(preact), subclass_logits=raw if self.subclasses > 1 else None)
    if not token:
      return out
    dist = self.head_dist(token[0].astype(jnp.float32), train)
    return out.replace(logits=out.logits if train else (out.logits + dist) / 2, cls_logits=out.logits,
                       dist_logits=dist)

  def classify(self, embedding, train: bool = False):
    return self._class_logits(self.head(embedding, train))

  def _class_logits(self, raw):
    return raw if self.subclasses == 1 else losses.subclass_to_class_logits(raw, self.num_classes)


_REGISTRY: dict[str, tuple[Callable[..., nn.Module], dict]] = {}


def register(name: str, ctor: Callable[..., nn.Module], *, head_dropout: float = 0.0, head_init: str = 'torch',
             **defaults):
  """Registers `ctor(dtype=..., **kwargs) -> backbone` under `name` (the reference codebases' model name);
  `head_init` is the classifier's initialisation in the reference (see `layers.Head`)."""
  if name in _REGISTRY:
    raise ValueError(f'model {name!r} registered twice')
  _REGISTRY[name] = (ctor, dict(defaults, head_dropout=head_dropout, head_init=head_init))


def names() -> list[str]:
  _load_zoo()
  return sorted(_REGISTRY)


def create(name: str, num_classes: int, dtype: Any = jnp.float32, subclasses: int = 1, **kwargs) -> Classifier:
  """Builds model `name` with `num_classes` outputs (x `subclasses` in the head); kwargs override the registered
  defaults."""
  _load_zoo()
  if name not in _REGISTRY:
    raise ConfigError(f'unknown model {name!r}; registered models: {", ".join(sorted(_REGISTRY))}')
  ctor, defaults = _REGISTRY[name]
  kw = dict(defaults, **kwargs)
  head_dropout, head_init = kw.pop('head_dropout'), kw.pop('head_init')
  return Classifier(backbone=ctor(dtype=dtype, **kw), num_classes=num_classes, head_dropout=head_dropout,
                    head_init=head_init, subclasses=subclasses, dtype=dtype)


def compute_dtype(cfg):
  """The activations' dtype of a run config (`config.dtype`); parameters stay float32."""
  return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[cfg.dtype]


def build(section, num_classes: int, dtype: Any = jnp.float32) -> Classifier:
  """The network of a config's `student` or `teacher` section (model, kwargs, subclasses)."""
  kwargs = section.kwargs.to_dict() if hasattr(section.kwargs, 'to_dict') else dict(section.kwargs or {})
  return create(section.model, num_classes=num_classes, dtype=dtype, subclasses=section.subclasses, **kwargs)


def build_student(cfg, num_classes: int) -> Classifier:
  return build(cfg.student, num_classes, compute_dtype(cfg))


def build_teacher(cfg, num_classes: int) -> Classifier:
  return build(cfg.teacher, num_classes, compute_dtype(cfg))


def _load_zoo():
  # Importing the zoo modules runs their register() calls; done lazily so `kdjax.models` imports cheaply.
  from kdjax.models import zoo  # noqa: F401
