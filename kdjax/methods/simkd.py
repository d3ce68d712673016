"""SimKD (Chen et al., CVPR 2022, "Knowledge Distillation with the Reused Teacher Classifier") and its variants.

The student's last feature map is spatially aligned with the teacher's (average-pooling the larger), projected to
the teacher's width by a bottleneck projector (1x1 conv-BN-ReLU, 3x3 conv-BN-ReLU, 1x1 conv-BN-ReLU; bottleneck =
teacher channels / factor), and matched to the teacher's map with MSE. The student's predictions, in training and
at test time, are the frozen teacher classifier applied to the pooled projected feature.

Variants (config.distill.simkd): `loss` 'l2' (the paper) or 'kl' (KL between the reused-classifier logits and the
teacher's logits at config.distill.temperature); `use_labels` adds CE on the reused-classifier logits (the same
as adding a 'ce' term); `projectors` 'last' (the paper), 'multi' (biased: the second-last stage is projected and
matched too) or 'all' (unbiased: every stage after the stem is projected and matched). Stages are paired from the
end, so students and teachers with different depths pair their last stages.
"""

from __future__ import annotations

from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax import checkpoint as ckpt_lib
from kdjax import distill
from kdjax import losses
from kdjax import models
from kdjax.errors import ConfigError
from kdjax.models import layers


class Projector(nn.Module):
  out_channels: int
  factor: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    mid = self.out_channels // self.factor
    for i, (width, k) in enumerate(((mid, 1), (mid, 3), (self.out_channels, 1))):
      x = layers.conv(width, k, dtype=self.dtype, name=f'conv{i}')(x)
      x = nn.relu(layers.batch_norm(train, self.dtype, name=f'bn{i}')(x))
    return x


def _stage_pairs(projectors: str, n_student: int, n_teacher: int) -> tuple[int, ...]:
  """Negative indices into `features`, last stage first; features[0] (the stem) is never projected."""
  depth = min(n_student, n_teacher) - 1
  count = {'last': 1, 'multi': 2, 'all': depth}.get(projectors)
  if count is None:
    raise ConfigError(f"distill.simkd.projectors must be 'last', 'multi' or 'all', got {projectors!r}")
  if count > depth:
    raise ConfigError(f'distill.simkd.projectors={projectors!r} needs {count} stages; the networks have {depth}')
  return tuple(-k for k in range(1, count + 1))


class SimKD(nn.Module):
  stages: tuple            # negative feature indices, the first is the one whose projection predicts
  teacher_channels: tuple
  factor: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, student, teacher, *, labels, indices, train, teacher_classify):
    del labels, indices
    projected, targets = [], []
    for n, (i, channels) in enumerate(zip(self.stages, self.teacher_channels)):
      source, target = losses.align_spatial(student.features[i], teacher.features[i])
      name = 'projector' if n == 0 else f'projector{i}'
      projected.append(Projector(channels, self.factor, self.dtype, name=name)(source, train))
      targets.append(target)
    embedding = layers.avg_pool_all(projected[0]).astype(jnp.float32)
    return {'logits': teacher_classify(embedding), 'projected': tuple(projected), 'targets': tuple(targets)}


def _module(cfg, student_shapes, teacher_shapes, info):
  for who, shapes in (('student', student_shapes), ('teacher', teacher_shapes)):
    if not shapes.features or shapes.features[-1].ndim != 4:
      raise ConfigError(f'simkd needs convolutional feature maps, but the {who} has none')
  if info.teacher is not None and not models.pooled_embedding(info.teacher):
    raise ConfigError('simkd reuses the teacher classifier on the pooled last feature map, but this teacher has '
                      'layers between that map and its classifier; use a teacher whose head sits on the pooled '
                      'last stage (resnet*, wrn_*, vgg*, ResNet*, MobileNetV2, ShuffleV*)')
  c = cfg.simkd
  stages = _stage_pairs(c.projectors, len(student_shapes.features), len(teacher_shapes.features))
  channels = tuple(teacher_shapes.features[i].shape[-1] for i in stages)
  return SimKD(stages, channels, c.factor, student_shapes.features[-1].dtype)


def _loss(ctx: distill.Context, cfg):
  c, out = cfg.simkd, ctx.extras['simkd']
  if c.loss == 'l2':
    loss = losses.simkd_loss(out['projected'][0], out['targets'][0])
  elif c.loss == 'kl':
    loss = losses.kd_loss(out['logits'], ctx.teacher.logits, cfg.temperature)
  else:
    raise ConfigError(f"distill.simkd.loss must be 'l2' or 'kl', got {c.loss!r}")
  for p, t in zip(out['projected'][1:], out['targets'][1:]):  # the extra projectors of 'multi' / 'all'
    loss = loss + losses.simkd_loss(p, t)
  if c.use_labels:
    loss = loss + losses.cross_entropy(out['logits'], ctx.labels)
  return loss


class Deployable(nn.Module):
  """The SimKD student as deployed: student backbone -> projector -> pooled -> the teacher's classifier."""
  backbone: nn.Module
  projector: nn.Module
  head: nn.Module
  teacher_spatial: tuple  # the teacher's last map size, to which a larger student map is pooled

  def __call__(self, x, train: bool = False):
    features, _, _ = self.backbone(x, train)
    f = features[-1]
    th, tw = self.teacher_spatial
    if f.shape[1] > th or f.shape[2] > tw:
      f = losses.adaptive_avg_pool(f, (th, tw))
    return self.head(layers.avg_pool_all(self.projector(f, train)).astype(jnp.float32))


def deployable_module(meta: dict) -> Deployable:
  student = models.create(meta['student'], num_classes=meta['num_classes'], **meta.get('student_kwargs', {}))
  return Deployable(backbone=student.backbone,
                    projector=Projector(meta['teacher_channels'], meta['factor']),
                    head=layers.Head(meta['num_classes']),
                    teacher_spatial=tuple(meta['teacher_spatial']))


def load_deployable(path: str):
  """(module, variables) of an exported SimKD student; `module.apply(variables, x)` gives its logits."""
  meta = ckpt_lib.read_meta(path)
  module = deployable_module(meta)
  x = jnp.zeros((1,) + tuple(meta['image_shape']), jnp.float32)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x))
  variables, _ = ckpt_lib.load_model(path, shapes)
  return module, variables


def export(trainer, ts, path: str) -> dict:
  """Writes `path` (the run's `deploy/`): one inference checkpoint of backbone + projector + teacher head, from one
  student's train state."""
  cfg = trainer.cfg
  s_params, s_state = ts.params['student'], ts.state['student']
  e_params = ts.params['extras']['simkd']
  params = {'backbone': s_params['backbone'], 'projector': e_params['projector'],
            'head': trainer.teacher_vars['params']['head']}
  variables = {'params': params}
  for col in s_state:
    variables[col] = {'backbone': s_state[col]['backbone'],
                      'projector': ts.state['extras'][col]['simkd']['projector']}
  x = jnp.zeros((1,) + tuple(trainer.ds.image_shape), trainer.parts.dtype)
  t_last = jax.eval_shape(lambda: trainer.teacher.apply(trainer.teacher_vars, x)).features[-1]
  meta = {'model': 'simkd_deployable', 'student': cfg.student.model,
          'student_kwargs': dict(cfg.student.kwargs), 'teacher': cfg.teacher.model,
          'num_classes': trainer.ds.num_classes, 'dataset': trainer.ds.name, 'image_shape': list(trainer.ds.image_shape),
          'teacher_channels': int(t_last.shape[-1]), 'teacher_spatial': [int(t_last.shape[1]), int(t_last.shape[2])],
          'factor': int(cfg.distill.simkd.factor)}
  n = sum(int(v.size) for v in jax.tree.leaves(params))
  n_backbone = sum(int(v.size) for v in jax.tree.leaves(params['backbone']))
  n_projector = sum(int(v.size) for v in jax.tree.leaves(params['projector']))
  meta['num_params'] = n
  ckpt_lib.save_model(path, jax.device_get(variables), meta, step=int(ts.step))
  logging.info('SimKD deployable student written to %s: %s parameters (backbone %s + projector %s + teacher '
               'classifier %s)', path, f'{n:,}', f'{n_backbone:,}', f'{n_projector:,}',
               f'{n - n_backbone - n_projector:,}')
  return {'deploy_path': path, 'deploy_params': n}


# projectors: 'last' (the paper) | 'multi' | 'all'; loss: 'l2' (the paper) | 'kl'. The SimKD repo's README:
# -c 0 -d 0 -b 1, factor 2.
distill.register('simkd', distill.Method(
    _loss, module=_module, predicts=True, export=export, teacher0_network=True,
    options=distill.Options(dict(factor=2, loss='l2', use_labels=False, projectors='last'),
                            ranges=dict(factor=distill.Range(1)),
                            choices=dict(loss=('l2', 'kl'), projectors=('last', 'multi', 'all'))),
    recipe=distill.Recipe(weights={'simkd': 1.0})))
