"""CAT-KD: class attention transfer (Guo et al., "Class Attention Transfer Based Knowledge Distillation", CVPR 2023),
as GzyAftermath/CAT-KD `mdistiller/distillers/CAT_KD.py` trains it on CIFAR-100.

The reference converts both networks (`if_test: True`, tools/train.py): the classifier becomes a bias-free 1x1 conv
applied to the last feature map before the global pooling, so `feats[-1]` is the class activation map (CAM)
[N, classes, H, W]; the teacher's conv takes its trained Linear weight (its bias dropped), the student's conv is its
own (and only) classifier. Here both CAMs are read through the models' own heads: the CAM at a position is
head(map[position]) - head(0), i.e. the Linear without its bias, and since that is linear the CAM pooled to
CAM_RESOLUTION x CAM_RESOLUTION (adaptive average) equals the head applied to the pooled map, which is what is
computed. The student's head gets the CAT gradient through `student_classify` (`extra_inputs`). Loss: MSE of the
pooled CAMs, each first L2-normalised over its spatial positions when IF_NORMALIZE. configs/cifar100/CAT_KD/
res32x4_res8x4.yaml: CAT_loss_weight 15 (the 'cat_kd' weight), CE 1, CAM_RESOLUTION 2, IF_NORMALIZE False.

"Last feature map" is the map the head pools: `features[-1]` for resnet*, ResNet*, vgg*, ShuffleV1, relu(`preact[-1]`)
(the final BN + ReLU) for wrn_*; models with layers between their last exposed map and the pool are refused.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax import distill
from kdjax import losses
from kdjax.errors import ConfigError

_HEAD_MAP = {'CifarResNet': 'features', 'ResNet': 'features', 'VGG': 'features', 'ShuffleNetV1': 'features',
             'WideResNet': 'relu_preact'}


def _head_map_kind(model):
  return _HEAD_MAP.get(type(getattr(model, 'backbone', None)).__name__)


def head_map(out, kind: str):
  return out.features[-1] if kind == 'features' else nn.relu(out.preact[-1])


def cat_loss(cam_s, cam_t, normalize: bool):
  """CAT-KD `CAT_loss` on NHWC CAMs already pooled to the CAM resolution: optional `F.normalize(dim=(2, 3))` (each
  class map over its positions, eps 1e-12), then the mean squared error."""
  cam_s, cam_t = cam_s.astype(jnp.float32), cam_t.astype(jnp.float32)
  if normalize:
    unit = lambda x: x / jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=(1, 2), keepdims=True)), 1e-12)
    cam_s, cam_t = unit(cam_s), unit(cam_t)
  return jnp.mean((cam_s - cam_t) ** 2)


def pooled_cam(feature_map, classify, resolution: int):
  """The bias-free CAM of `classify` on `feature_map` [N, H, W, C], adaptive-average-pooled to resolution^2."""
  pooled = losses.adaptive_avg_pool(feature_map, (resolution, resolution))
  return classify(pooled) - classify(jnp.zeros((pooled.shape[-1],), pooled.dtype))


class CATKD(nn.Module):
  student_kind: str
  teacher_kind: str
  resolution: int = 2
  dtype: Any = jnp.float32
  extra_inputs: ClassVar[tuple] = ('student_classify',)

  @nn.compact
  def __call__(self, student, teacher, *, labels, indices, train, teacher_classify, student_classify):
    del labels, indices, train
    cam_s = pooled_cam(head_map(student, self.student_kind), student_classify, self.resolution)
    cam_t = pooled_cam(head_map(teacher, self.teacher_kind), teacher_classify, self.resolution)
    return {'cam_s': cam_s, 'cam_t': jax.lax.stop_gradient(cam_t)}


def _check(cfg, student_shapes, teacher_shapes, info):
  del cfg, student_shapes, teacher_shapes
  for who, model in (('student', info.student), ('teacher', info.teacher)):
    if _head_map_kind(model) is None:
      raise ConfigError(f'cat_kd needs the map the {who}\'s classifier pools, but {info.name(who)} does not '
                        'expose it (supported: '
                        'resnet*, ResNet*, vgg*, wrn_*, ShuffleV1)')
    if getattr(model, 'subclasses', 1) != 1:
      raise ConfigError(f'cat_kd reads class activation maps through a linear head, but the {who} has subclasses')


def _module(cfg, student_shapes, teacher_shapes, info):
  _check(cfg, student_shapes, teacher_shapes, info)
  return CATKD(_head_map_kind(info.student), _head_map_kind(info.teacher), int(cfg.cat_kd.cam_resolution),
               dtype=student_shapes.features[-1].dtype)


def cat_kd_loss(ctx: distill.Context, cfg):
  out = ctx.extras['cat_kd']
  return cat_loss(out['cam_s'], out['cam_t'], bool(cfg.cat_kd.normalize))


def _pair(weight, resolution, normalize):
  return {'losses.cat_kd': weight, 'cat_kd.cam_resolution': resolution, 'cat_kd.normalize': normalize}


# GzyAftermath/CAT-KD configs/cifar100/CAT_KD/*.yaml: CE 1 and (CAT_loss_weight, CAM_RESOLUTION, IF_NORMALIZE) per
# pair; res32x4_res8x4.yaml's (15, 2, False) for the others.
RECIPE = distill.Recipe(weights={'ce': 1.0, 'cat_kd': 15.0}, pairs={
    ('resnet32x4', 'resnet8x4'): _pair(15.0, 2, False),
    ('wrn_40_2', 'wrn_16_2'): _pair(12.0, 2, False),
    ('wrn_40_2', 'wrn_40_1'): _pair(1.5, 2, False),
    ('vgg13', 'vgg8'): _pair(4.5, 2, False),
    ('resnet110', 'resnet32'): _pair(1.8, 2, False),
    ('resnet56', 'resnet20'): _pair(0.7, 2, False),
    ('resnet32x4', 'ShuffleV1'): _pair(600.0, 4, True),
    ('resnet32x4', 'ShuffleV2'): _pair(600.0, 4, True),
    ('wrn_40_2', 'ShuffleV1'): _pair(80.0, 4, True),
    ('vgg13', 'MobileNetV2'): _pair(15.0, 2, True),
    ('ResNet50', 'MobileNetV2'): _pair(40.0, 2, True),
})

distill.register('cat_kd', distill.Method(
    cat_kd_loss, module=_module, check=_check, teacher0_network=True,
    options=distill.Options(dict(cam_resolution=2, normalize=False), ranges=dict(cam_resolution=distill.Range(1))),
    recipe=RECIPE))
