"""NST, CC, FSP, AB, FT and KDSVD as RepDistiller (Tian et al., CRD, ICLR 2020) and mdistiller benchmark them.

RepDistiller's `feat` list is our `features` plus the pooled `embedding` at the end (see kdjax/methods/feature.py),
so: NST and KDSVD read `feat[1:-1]` = `features[1:]`; CC `feat[-1]` = `embedding`; FSP `feat[:-1]` = `features`
(stem included); AB `feat[1:-1]` with `preact=True` = `preact[1:]`; FT `feat[-2]` = `features[-1]`.

AB, FSP and FT are two-stage methods there (helper/pretrain.py, `init_epochs` = 30): their pre-training stage is
`config.distill.init` (kdjax/stages.py). RepDistiller's main stage adds nothing for AB and FSP (helper/loops.py sets
`loss_kd = 0`): their reference weights are 0 outside the stage. FT's stage trains the paraphraser alone, on the
reconstruction term 'ft_rec'; the main stage trains the translator with 'ft' against the frozen paraphraser.

Every array function below cites the reference file it follows; maps are NHWC (the references' channel axis 1 is
our axis -1).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax import distill
from kdjax import losses
from kdjax import stages
from kdjax.errors import ConfigError
from kdjax.methods import feature
from kdjax.models import layers


def _f32(x):
  return jnp.asarray(x).astype(jnp.float32)


def _normalize(x, axis=-1, eps=1e-12):
  """torch.nn.functional.normalize: x / max(||x||, eps), with torch's zero gradient at an all-zero vector (a dead
  channel of a post-ReLU map) instead of NaN."""
  return losses._torch_normalize(x, axis=axis, eps=eps)


def _refuse(name: str, message: str):
  raise ConfigError(f'{name}: {message}')


def _conv_maps(name: str, shapes, who: str, which: str, indices):
  maps = getattr(shapes, which)
  for i in indices:
    if not -len(maps) <= i < len(maps) or maps[i].ndim != 4:
      _refuse(name, f'needs convolutional {which}[{i}], but the {who} model has '
              f'{[tuple(m.shape[1:]) for m in maps]}')
  return [maps[i] for i in indices]


def _stage_maps_check(name: str, which: str = 'features'):
  """A `Method.check` that refuses pairs whose stage lists (`which`[1:]) differ in length or are not NHWC."""
  def check(cfg, student_shapes, teacher_shapes, info):
    del cfg, info
    s, t = getattr(student_shapes, which), getattr(teacher_shapes, which)
    if len(s) != len(t):
      _refuse(name, f'pairs the stages {which}[1:] of student and teacher, but the student has {len(s) - 1} and '
              f'the teacher {len(t) - 1}')
    _conv_maps(name, student_shapes, 'student', which, range(1, len(s)))
    _conv_maps(name, teacher_shapes, 'teacher', which, range(1, len(t)))
  return check


# -------------------------------------------------------------------------------------------------------- NST
def nst_kernel_mean(a, b):
  """RepDistiller distiller_zoo/NST.py `poly_kernel(a, b).mean()`: a [B, Ca, HW], b [B, Cb, HW] -> the mean over
  (batch, Cb, Ca) of (a_i . b_j)^2."""
  return jnp.mean(jnp.square(jnp.einsum('bin,bjn->bji', a, b)))


def nst_loss(f_s, f_t):
  """Neuron Selectivity Transfer (Huang & Wang 2017), one stage, as RepDistiller distiller_zoo/NST.py (= mdistiller
  distillers/NST.py): the larger map pooled to the smaller, each channel's spatial response L2-normalised, then the
  squared MMD with the polynomial kernel k(x, y) = (x . y)^2 (the teacher-teacher term detached)."""
  f_s, f_t = losses.align_spatial(f_s, f_t)
  channels = lambda f: _normalize(jnp.swapaxes(f.reshape(f.shape[0], -1, f.shape[-1]), 1, 2), axis=-1)
  s, t = channels(f_s), channels(f_t)
  return (jax.lax.stop_gradient(nst_kernel_mean(t, t)) + nst_kernel_mean(s, s) - 2.0 * nst_kernel_mean(s, t))


def _nst(ctx: distill.Context, cfg):
  """Summed over the stage pairs `features[1:]` (RepDistiller feat[1:-1], mdistiller feats[1:])."""
  del cfg
  return sum(nst_loss(s, t) for s, t in zip(ctx.student.features[1:], ctx.teacher.features[1:]))


# The references' weights: RepDistiller scripts/run_cifar_distill.sh (-a 0 -b: NST 50, CC 0.02, AB 1, FT 200, FSP
# 50); helper/loops.py sets AB's and FSP's main-stage term to 0 (they act in the pre-training stage only), hence their
# weight 0 here. KDSVD: mdistiller engine/cfg.py KDSVD.LOSS (CE 1, FEAT 1). The pre-training stages of AB, FT and FSP
# (`config.distill.init`, kdjax/stages.py): RepDistiller train_student.py's init_epochs 30 and init_trainable_list
# (AB: connectors + the student's feature modules; FT: the paraphraser, on nn.MSELoss reconstruction; FSP: the
# student's feature modules), with the stage loss at weight 1 (helper/pretrain.py).
distill.register('nst', distill.Method(_nst, check=_stage_maps_check('nst'),
                                       recipe=distill.Recipe(weights={'ce': 1.0, 'nst': 50.0})))


# --------------------------------------------------------------------------------------------------------- CC
def cc_loss(e_s, e_t):
  """Correlation Congruence (Peng et al., ICCV 2019) as RepDistiller distiller_zoo/CC.py defines it: with
  d = |e_s - e_t| per example, the batch mean over consecutive example pairs of sum_k d[i, k] d[i+1, k]."""
  d = jnp.abs(_f32(e_s) - _f32(e_t))
  return jnp.mean(jnp.sum(d[:-1] * d[1:], axis=1))


class CCEmbed(nn.Module):
  """RepDistiller's two `LinearEmbed` heads (models/util.py, one Linear each, no normalisation) on the student's and
  the teacher's `embedding` (train_student.py 'correlation'); both are trained."""
  student_dim: int
  teacher_dim: int
  feat_dim: int = 128

  @nn.compact
  def __call__(self, student, teacher, *, labels, indices, train, teacher_classify):
    del labels, indices, train, teacher_classify
    flat = lambda x: x.reshape(x.shape[0], -1).astype(jnp.float32)
    return {'embed_s': layers.dense(self.feat_dim, fan_in=self.student_dim, name='embed_s')(flat(student.embedding)),
            'embed_t': layers.dense(self.feat_dim, fan_in=self.teacher_dim, name='embed_t')(flat(teacher.embedding))}


def _cc_module(cfg, student_shapes, teacher_shapes, info):
  del info
  size = lambda s: math.prod(s.embedding.shape[1:])
  return CCEmbed(size(student_shapes), size(teacher_shapes), int(cfg.cc.feat_dim))


def _cc(ctx: distill.Context, cfg):
  del cfg
  out = ctx.extras['cc']
  return cc_loss(out['embed_s'], out['embed_t'])


distill.register('cc', distill.Method(
    _cc, module=_cc_module,
    options=distill.Options(dict(feat_dim=128), ranges=dict(feat_dim=distill.Range(1))),  # LinearEmbed's width
    recipe=distill.Recipe(weights={'ce': 1.0, 'cc': 0.02})))


# -------------------------------------------------------------------------------------------------------- FSP
def fsp_matrix(bottom, top):
  """RepDistiller distiller_zoo/FSP.py `compute_fsp` for one pair of consecutive maps: the larger pooled to the
  smaller, then G[b, j, i] = mean over positions of top[b, :, :, j] * bottom[b, :, :, i] -> [B, C_top, C_bottom]."""
  bottom, top = losses.align_spatial(bottom, top)
  return jnp.einsum('bhwi,bhwj->bji', bottom, top) / (bottom.shape[1] * bottom.shape[2])


def fsp_loss(feats_s, feats_t):
  """FSP (Yim et al., CVPR 2017) as RepDistiller: the mean squared difference of the FSP matrices of every pair of
  consecutive maps, summed over the pairs (`sum(loss_group)` in helper/pretrain.py)."""
  total = 0.0
  for i in range(len(feats_s) - 1):
    g_s = fsp_matrix(feats_s[i], feats_s[i + 1])
    g_t = fsp_matrix(feats_t[i], feats_t[i + 1])
    total = total + jnp.mean(jnp.square(g_s - g_t))
  return total


def _fsp_check(cfg, student_shapes, teacher_shapes, info):
  del cfg, info
  s, t = student_shapes.features, teacher_shapes.features
  if len(s) != len(t):
    _refuse('fsp', f'pairs every map features[0:] of student and teacher, but the student has {len(s)} and the '
            f'teacher {len(t)}')
  _conv_maps('fsp', student_shapes, 'student', 'features', range(len(s)))
  _conv_maps('fsp', teacher_shapes, 'teacher', 'features', range(len(t)))
  s_c, t_c = [f.shape[-1] for f in s], [f.shape[-1] for f in t]
  if s_c != t_c:  # RepDistiller FSP.__init__: 'num of channels not equal (error in FSP)'
    _refuse('fsp', f'needs equal channels in every map (RepDistiller FSP), but the student has {s_c} and the '
            f'teacher {t_c}')


def _fsp(ctx: distill.Context, cfg):
  """RepDistiller feat[:-1] = features (the stem and every stage)."""
  del cfg
  return fsp_loss(ctx.student.features, ctx.teacher.features)


distill.register('fsp', distill.Method(
    _fsp, check=_fsp_check,
    recipe=distill.Recipe(weights={'ce': 1.0, 'fsp': 0.0},
                          init=dict(epochs=30, losses={'fsp': 1.0}, train=('student/backbone',)))))


# --------------------------------------------------------------------------------------------------------- AB
def ab_stage_loss(source, target, margin=1.0):
  """RepDistiller distiller_zoo/AB.py `criterion_alternative_l2`: the summed squared hinge that pushes the
  connector's output past -margin where the teacher's pre-activation is <= 0 and past +margin where it is > 0."""
  source, target = _f32(source), _f32(target)
  off = ((source > -margin) & (target <= 0)).astype(jnp.float32)
  on = ((source <= margin) & (target > 0)).astype(jnp.float32)
  return jnp.sum(jnp.square(source + margin) * off + jnp.square(source - margin) * on)


def ab_loss(sources, targets, margin=1.0):
  """Activation Boundaries (Heo et al., AAAI 2019) as RepDistiller ABLoss: stage i of n weighted 2^(i - n + 1) (the
  last stage 1, each earlier one half the next), divided by the batch size and by 1000 / 3, summed over stages."""
  n, bsz = len(sources), sources[0].shape[0]
  return sum(2.0 ** (i - n + 1) * ab_stage_loss(s, t, margin) / bsz / 1000.0 * 3.0
             for i, (s, t) in enumerate(zip(sources, targets)))


class ABConnector(nn.Module):
  """RepDistiller's `Connector` (models/util.py): per stage, the identity when the channels and heights match, else
  `ConvReg(use_relu=False)` (conv -> BN) to the teacher's map shape."""
  teacher_shapes: tuple  # ((H, W, C), ...) of the teacher's preact[1:]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, student, teacher, *, labels, indices, train, teacher_classify):
    del teacher, labels, indices, teacher_classify
    out = []
    for i, (f, (th, tw, tc)) in enumerate(zip(student.preact[1:], self.teacher_shapes)):
      if f.shape[-1] == tc and f.shape[1] == th:
        out.append(f)
      else:
        out.append(feature.ConvReg((th, tw), tc, use_relu=False, dtype=self.dtype, name=f'connector{i}')(f, train))
    return {'sources': tuple(out)}


def _ab_check(cfg, student_shapes, teacher_shapes, info):
  _stage_maps_check('ab', 'preact')(cfg, student_shapes, teacher_shapes, info)
  for i, (s, t) in enumerate(zip(student_shapes.preact[1:], teacher_shapes.preact[1:])):
    (sh, sw), (th, tw) = s.shape[1:3], t.shape[1:3]
    if s.shape[-1] == t.shape[-1] and sh == th:
      continue
    if not (sh == 2 * th or 2 * sh == th or sh >= th):
      _refuse('ab', f'no connector from the student preact[{i + 1}] ({sh}x{sw}) to the teacher\'s ({th}x{tw}): '
              'RepDistiller ConvReg handles twice, half, or a larger student map')


def _ab_module(cfg, student_shapes, teacher_shapes, info):
  del cfg, info
  return ABConnector(tuple(tuple(t.shape[1:]) for t in teacher_shapes.preact[1:]),
                     dtype=student_shapes.preact[-1].dtype)


def _ab(ctx: distill.Context, cfg):
  """Connector(student preact[1:]) against the teacher's preact[1:] (RepDistiller feat[1:-1], preact=True)."""
  return ab_loss(ctx.extras['ab']['sources'], ctx.teacher.preact[1:], cfg.ab.margin)


distill.register('ab', distill.Method(
    _ab, module=_ab_module, check=_ab_check, hparams=('ab.margin',),
    options=distill.Options(dict(margin=1.0), ranges=dict(margin=distill.Range(0.0))),
    recipe=distill.Recipe(weights={'ce': 1.0, 'ab': 0.0},
                          init=dict(epochs=30, losses={'ab': 1.0}, train=('student/backbone', 'extras/ab'),
                                    freeze_after=('extras/ab',)))))


# --------------------------------------------------------------------------------------------------------- FT
def ft_factor(f, p1=2):
  """RepDistiller distiller_zoo/FT.py `factor`: the channel mean of f^p1, flattened and L2-normalised -> [B, HW]."""
  f = _f32(f)
  return _normalize(jnp.mean(f ** p1, axis=-1).reshape(f.shape[0], -1), axis=-1)


def ft_loss(factor_s, factor_t):
  """Factor Transfer (Kim et al., NeurIPS 2018) as RepDistiller FactorTransfer (p1 = 2, p2 = 1): the larger factor
  map pooled to the smaller, then the mean absolute difference of the normalised factors."""
  factor_s, factor_t = losses.align_spatial(factor_s, factor_t)
  return jnp.mean(jnp.abs(ft_factor(factor_s) - ft_factor(factor_t)))


def _torch_conv(features: int, in_channels: int, name: str, dtype):
  """Conv2d(in, out, 3, 1, 1) with PyTorch's default (biased) initialisation."""
  return layers.conv(features, 3, padding=1, use_bias=True, fan_in=in_channels * 9, dtype=dtype, name=name)


def _torch_conv_transpose(features: int, name: str, dtype):
  """ConvTranspose2d(in, out, 3, 1, 1): stride 1, so a 'SAME' transposed conv; torch's init fan-in for it is
  out_channels * k * k (its weight is [in, out, k, k])."""
  bound = 1.0 / (features * 9) ** 0.5
  return nn.ConvTranspose(features, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), transpose_kernel=True,
                          kernel_init=feature._uniform(bound), bias_init=feature._uniform(bound), dtype=dtype,
                          name=name)


class Paraphraser(nn.Module):
  """RepDistiller models/util.py `Paraphraser(t_shape, k=0.5, use_bn=False)`: encoder conv3x3 C->C, C->kC, kC->kC
  and decoder convT3x3 kC->kC, kC->C, C->C, each followed by LeakyReLU(0.1) (no BatchNorm)."""
  channels: int
  factor_channels: int
  dtype: Any = jnp.float32

  def setup(self):
    c, k = self.channels, self.factor_channels
    self.encoder = [_torch_conv(c, c, 'enc0', self.dtype), _torch_conv(k, c, 'enc1', self.dtype),
                    _torch_conv(k, k, 'enc2', self.dtype)]
    self.decoder = [_torch_conv_transpose(k, 'dec0', self.dtype), _torch_conv_transpose(c, 'dec1', self.dtype),
                    _torch_conv_transpose(c, 'dec2', self.dtype)]

  def encode(self, x):
    for conv in self.encoder:
      x = nn.leaky_relu(conv(x), 0.1)
    return x

  def __call__(self, x):
    factor = self.encode(x)
    rec = factor
    for conv in self.decoder:
      rec = nn.leaky_relu(conv(rec), 0.1)
    return factor, rec


class Translator(nn.Module):
  """RepDistiller models/util.py `Translator(s_shape, t_shape, k=0.5, use_bn=True)`: conv3x3 C_s->C_s, C_s->kC_t,
  kC_t->kC_t, each followed by BatchNorm and LeakyReLU(0.1)."""
  factor_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    c_in = x.shape[-1]
    for i, (c, fan) in enumerate(((c_in, c_in), (self.factor_channels, c_in),
                                  (self.factor_channels, self.factor_channels))):
      x = _torch_conv(c, fan, f'conv{i}', self.dtype)(x)
      x = nn.leaky_relu(layers.batch_norm(train, self.dtype, name=f'bn{i}')(x), 0.1)
    return x


class FT(nn.Module):
  """The paraphraser on the teacher's last stage map and the translator on the student's (RepDistiller feat[-2])."""
  teacher_channels: int
  factor: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, student, teacher, *, labels, indices, train, teacher_classify):
    del labels, indices, teacher_classify
    k = int(self.teacher_channels * self.factor)
    factor_t, rec = Paraphraser(self.teacher_channels, k, dtype=self.dtype, name='paraphraser')(teacher.features[-1])
    factor_s = Translator(k, dtype=self.dtype, name='translator')(student.features[-1], train)
    return {'factor_s': factor_s, 'factor_t': factor_t, 'reconstruction': rec}


def _ft_check(cfg, student_shapes, teacher_shapes, info):
  del info
  _conv_maps('ft', student_shapes, 'student', 'features', [-1])
  _conv_maps('ft', teacher_shapes, 'teacher', 'features', [-1])
  if int(teacher_shapes.features[-1].shape[-1] * cfg.ft.factor) < 1:
    _refuse('ft', f'distill.ft.factor={cfg.ft.factor} leaves no factor channel for the teacher\'s '
            f'{teacher_shapes.features[-1].shape[-1]} channels')


def _ft_module(cfg, student_shapes, teacher_shapes, info):
  del info
  return FT(int(teacher_shapes.features[-1].shape[-1]), float(cfg.ft.factor),
            dtype=student_shapes.features[-1].dtype)


def _ft(ctx: distill.Context, cfg):
  """FT's main term: translator(student) against the paraphraser's factor of the teacher map, which this term does
  not train (RepDistiller's main optimizer does not hold the paraphraser; `init.freeze_after` keeps it fixed)."""
  del cfg
  out = ctx.extras['ft']
  return ft_loss(out['factor_s'], jax.lax.stop_gradient(out['factor_t']))


def _ft_rec(ctx: distill.Context, cfg):
  """FT's pre-training term: nn.MSELoss between the paraphraser's reconstruction and the teacher map
  (train_student.py 'factor': criterion_init = nn.MSELoss(); helper/pretrain.py)."""
  del cfg
  out = ctx.extras['ft']
  return jnp.mean(jnp.square(_f32(out['reconstruction']) - _f32(ctx.teacher.features[-1])))


def _ft_rec_check(cfg, student_shapes, teacher_shapes, info):
  if 'ft' not in cfg.losses and 'ft' not in stages.field(cfg, 'losses'):
    _refuse('ft_rec', "reconstructs through FT's paraphraser: add 'ft' to distill.losses (weight 0 if unused)")
  _ft_check(cfg, student_shapes, teacher_shapes, info)


# One section for both terms: the paraphraser's factor channels, factor x the teacher's channels (RepDistiller's
# rate 0.5). helper/pretrain.py: FT's stage runs at lr 0.01 for the students below, at the main lr for the others.
FT_OPTIONS = distill.Options(dict(factor=0.5), ranges=dict(factor=distill.Range(0.0, low_ok=False)), section='ft')
FT_INIT_LR = dict.fromkeys(('resnet8', 'resnet14', 'resnet20', 'resnet32', 'resnet44', 'resnet56', 'resnet110',
                            'resnet8x4', 'resnet32x4', 'wrn_16_1', 'wrn_16_2', 'wrn_40_1', 'wrn_40_2'), 0.01)

distill.register('ft', distill.Method(
    _ft, module=_ft_module, check=_ft_check, options=FT_OPTIONS,
    recipe=distill.Recipe(weights={'ce': 1.0, 'ft': 200.0}, init_lr=FT_INIT_LR,
                          init=dict(epochs=30, losses={'ft_rec': 1.0}, train=('extras/ft/paraphraser',),
                                    freeze_after=('extras/ft/paraphraser',)))))
distill.register('ft_rec', distill.Method(_ft_rec, check=_ft_rec_check, options=FT_OPTIONS))


# ------------------------------------------------------------------------------------------------------ KDSVD
def _remove_nan(x):
  return jnp.where(jnp.isfinite(x), x, 0.0)


def kdsvd_matrix(f, layout: str = 'mdistiller'):
  """The matrix whose right singular vectors KDSVD reads, from an NHWC map. 'mdistiller' (distillers/KDSVD.py
  `svd`): the NCHW map viewed as [B, C*H, W]; 'repdistiller' (distiller_zoo/KDSVD.py, and the original TF code):
  [B, H*W, C]."""
  f = _f32(f)
  b, h, w, c = f.shape
  if layout == 'mdistiller':
    return jnp.transpose(f, (0, 3, 1, 2)).reshape(b, c * h, w)
  if layout == 'repdistiller':
    return f.reshape(b, h * w, c)
  raise ConfigError(f"distill.kdsvd.layout must be 'mdistiller' or 'repdistiller', got {layout!r}")


def kdsvd_svd(x, n: int):
  """mdistiller `svd(feat, n)`: the reduced SVD, NaNs zeroed, the first n singular values L2-normalised and the
  first n right singular vectors (columns of V) L2-normalised -> (s [B, n], v [B, N, n])."""
  _, s, vh = jnp.linalg.svd(x, full_matrices=False)
  v = jnp.swapaxes(vh, -1, -2)
  s, v = _remove_nan(s), _remove_nan(v)
  return _normalize(s[:, :n], axis=1), _normalize(v[:, :, :n], axis=1)


def kdsvd_fix_sign(v):
  """Each column's sign chosen so that its largest-magnitude entry is positive (the SVD leaves it arbitrary)."""
  idx = jnp.argmax(jnp.abs(v), axis=1, keepdims=True)
  return v * jnp.where(jnp.take_along_axis(v, idx, axis=1) < 0, -1.0, 1.0)


def kdsvd_align(a, b):
  """mdistiller `align_rsv`: for each column of b, the column of a with the largest |cosine| to it, times that
  cosine's sign -> [B, N, k]."""
  cosine = jnp.einsum('bni,bnj->bij', a, b)
  mask = jnp.where(jnp.abs(cosine) == jnp.max(jnp.abs(cosine), axis=1, keepdims=True), jnp.sign(cosine), 0.0)
  return jnp.einsum('bni,bij->bnj', a, jax.lax.stop_gradient(mask))


def kdsvd_loss(feats_s, feats_t, k: int = 1, layout: str = 'mdistiller'):
  """KD-SVD (Lee, Kim & Song, ECCV 2018) as mdistiller distillers/KDSVD.py: per stage the teacher's first k right
  singular vectors (scaled by its normalised singular values) and the student's best-aligned of its first k + 3;
  between consecutive stages the RBF relation exp(-(v_i - v_{i-1})^2 / 8) of every pair of rows; the summed squared
  difference of the student's and the (detached) teacher's relations, non-finite entries zeroed, over the batch
  size, summed over the stage pairs. The teacher's singular vectors get a fixed sign (`kdsvd_fix_sign`)."""
  total, prev = 0.0, None
  for f_s, f_t in zip(feats_s, feats_t):
    s_t, v_t = kdsvd_svd(kdsvd_matrix(f_t, layout), k)
    _, v_s = kdsvd_svd(kdsvd_matrix(f_s, layout), k + 3)
    v_t = kdsvd_fix_sign(v_t)
    v_s = kdsvd_align(v_s, v_t)
    v_t, v_s = v_t * s_t[:, None, :], v_s * s_t[:, None, :]
    if prev is not None:
      rbf = lambda v, vb: jnp.exp(-jnp.square(v[:, :, None, :] - vb[:, None, :, :]) / 8.0)
      d = jnp.square(rbf(v_s, prev[0]) - jax.lax.stop_gradient(rbf(v_t, prev[1])))
      total = total + jnp.sum(jnp.where(jnp.isfinite(d), d, 0.0)) / feats_s[0].shape[0]
    prev = (v_s, v_t)
  return total


def _kdsvd_check(cfg, student_shapes, teacher_shapes, info):
  _stage_maps_check('kdsvd')(cfg, student_shapes, teacher_shapes, info)
  layout = cfg.kdsvd.layout
  kdsvd_matrix(jnp.zeros((1, 1, 1, 1)), layout)  # refuses an unknown layout
  axis, what = (2, 'width') if layout == 'mdistiller' else (3, 'channels')
  s = [f.shape[axis] for f in student_shapes.features[1:]]
  t = [f.shape[axis] for f in teacher_shapes.features[1:]]
  if s != t:
    _refuse('kdsvd', f'the {layout} layout aligns singular vectors over the maps\' {what}, which differ: student '
            f'{s}, teacher {t}')


def _kdsvd(ctx: distill.Context, cfg):
  """Over the stage maps `features[1:]` (mdistiller feats[1:])."""
  c = cfg.kdsvd
  return kdsvd_loss(ctx.student.features[1:], ctx.teacher.features[1:], int(c.k), c.layout)


# layout: mdistiller ([C*H, W] matrices) | repdistiller ([H*W, C]); k: the singular vectors kept (mdistiller's 1).
distill.register('kdsvd', distill.Method(
    _kdsvd, check=_kdsvd_check,
    options=distill.Options(dict(k=1, layout='mdistiller'), ranges=dict(k=distill.Range(1)),
                            choices=dict(layout=('mdistiller', 'repdistiller'))),
    recipe=distill.Recipe(weights={'ce': 1.0, 'kdsvd': 1.0})))
