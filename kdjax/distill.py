"""The distillation engine: loss terms by name, each a pure function of model outputs, plus optional extra modules.

A config lists the terms and their weights, e.g. `config.distill.losses = {'ce': 0.1, 'kd': 0.9}`; the total loss
is sum(weight * term). Weight convention: every term's weight multiplies exactly the quantity its loss function
returns (the references' -r/-a/-b or -c/-d/-b flags map to weights of 'ce', 'kd' and the method's term; see
`PRESETS`).

A method is a `Method` registry entry: a pure loss of a `Context`, whether it needs the teacher, and optionally a
factory for an extra trainable Linen module (projectors, regressors, embedding heads). The extra modules are
applied to the student's and teacher's outputs in the same jitted step; their outputs land in `ctx.extras[name]`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax import losses
from kdjax import stages
from kdjax.errors import ConfigError
from kdjax.models import ModelOutput


@flax.struct.dataclass
class Context:
  """Everything a loss may read. Teacher outputs are already under stop_gradient."""
  student: ModelOutput
  teacher: ModelOutput | None
  labels: jax.Array
  extras: dict
  epoch: jax.Array  # fractional epochs done, for warmups (DKD)
  # Every teacher's outputs when the config has several (`config.teachers`; `teacher` is then teacher 0, or their
  # logit ensemble with `distill.ensemble`); a term named in `distill.teacher_for` reads its own as `teacher`.
  teachers: tuple | None = None
  # The extra views of the batch the terms read (`Method.views`, e.g. MLKD's 'strong'): name -> (the student's,
  # the teacher's outputs on it).
  views: dict | None = None


@dataclasses.dataclass(frozen=True)
class DataInfo:
  num_train: int     # size of the training set (CRD's memory bank has a row per example)
  num_classes: int
  student: Any = None  # the Linen modules, for methods that depend on their structure
  teacher: Any = None
  student_name: str = ''  # config.student.model / config.teacher.model, for messages
  teacher_name: str = ''

  def name(self, who: str) -> str:
    """The configured model name of the 'student' or 'teacher' (its backbone class when none was given)."""
    given = self.student_name if who == 'student' else self.teacher_name
    model = self.student if who == 'student' else self.teacher
    return given or type(getattr(model, 'backbone', model)).__name__


@dataclasses.dataclass(frozen=True)
class Method:
  loss: Callable[[Context, Any], jax.Array]
  needs_teacher: bool = True
  # (distill config, student ModelOutput shapes, teacher ModelOutput shapes, DataInfo) -> nn.Module whose
  # __call__ takes (student, teacher, *, labels, indices, train, teacher_classify) and returns a dict of arrays.
  # Non-trained state (e.g. a memory bank) lives in variable collections other than 'params'; they are mutable
  # during training only.
  module: Callable[..., nn.Module] | None = None
  # True when this method's module output 'logits' are the student's predictions (SimKD's reused teacher head).
  predicts: bool = False
  # (the Trainer, one student's final TrainState, its output directory) -> dict merged into its summary: writes a
  # deployable artefact.
  export: Callable[..., dict] | None = None
  # The options under `config.distill` that `loss` reads as numbers (e.g. 'dkd.beta'): a sweep may vary them,
  # since they reach the loss as arrays. Options that size modules or pick code paths stay out.
  hparams: tuple = ()
  # (distill config, student ModelOutput shapes, teacher ModelOutput shapes, DataInfo) -> None: raises ConfigError
  # naming the method and the model when the method cannot apply to this pair (e.g. it needs maps a model does not
  # expose). Called for every enabled term before anything is traced.
  check: Callable[..., None] | None = None
  # True when the method reads teacher 0's own network (its variables or classifier head), not just its outputs:
  # `distill.teacher_for` cannot give it another teacher.
  teacher0_network: bool = False
  # The extra views of the batch the loss reads (names of `VIEWS`, e.g. MLKD's ('strong',)): the batch source makes
  # them on the device (a user's batch may carry them), and the step runs both networks on each (`ctx.views`).
  views: tuple = ()
  # True when the method reads the examples' rows in the training set (`indices`: CRD's memory banks): a batch given
  # through kdjax/api.py must carry them.
  needs_indices: bool = False


@dataclasses.dataclass(frozen=True)
class View:
  """An extra view of a batch: `make(rng, images, augment)` -> images, uint8 [B, H, W, C] from the batch's
  un-augmented images (`augment`: the dataset's augmentation, e.g. 'crop_flip'), drawn from the data seed's rng
  stream `stream` (>= 4: kdjax/step.py `seed_key`), folded with the step."""
  make: Callable[..., jax.Array]
  stream: int


VIEWS: dict[str, View] = {}


def register_view(name: str, view: View):
  if name in VIEWS and VIEWS[name] != view:
    raise ValueError(f'view {name!r} registered twice')
  VIEWS[name] = view


METHODS: dict[str, Method] = {}


def register(name: str, method: Method):
  if name in METHODS:
    raise ValueError(f'method {name!r} registered twice')
  METHODS[name] = method


def _student_logits(ctx: Context):
  for out in ctx.extras.values():
    if 'logits' in out:
      return out['logits']
  return ctx.student.logits


def standardize(logits, eps: float = 1e-7):
  """Logit standardization (Sun et al., CVPR 2024): each row's logits minus their mean, over eps + their unbiased
  standard deviation (logit-standardization-KD mdistiller/distillers/KD.py `normalize`: torch's `std`, eps 1e-7)."""
  logits = jnp.asarray(logits, jnp.float32)
  mean = jnp.mean(logits, axis=-1, keepdims=True)
  std = jnp.std(logits, axis=-1, keepdims=True, ddof=1)
  return (logits - mean) / (eps + std)


def logit_pair(ctx: Context, cfg):
  """(student logits, teacher logits) as every logit-based term reads them: standardized first when
  `distill.logit_standardize` is set."""
  s, t = _student_logits(ctx), ctx.teacher.logits
  if cfg.get('logit_standardize', False):
    s, t = standardize(s), standardize(t)
  return s, t


register('ce', Method(lambda ctx, cfg: losses.cross_entropy(_student_logits(ctx), ctx.labels,
                                                            cfg.get('label_smoothing', 0.0)),
                      needs_teacher=False))
def soft_scale(cfg, temperature):
  """The factor on a temperature-softened term, relative to `losses.kd_loss` (which multiplies by T^2 as Hinton et
  al. and the anchors do): `distill.kd_scale = 'T2'` keeps it, `'1'` divides it out, the form
  (1 - a) CE + a CE(softmax(z_t / T), softmax(z_s / T)) of studies that write the soft term without T^2."""
  scale = cfg.get('kd_scale', 'T2')
  if scale == 'T2':
    return 1.0
  if scale == '1':
    return 1.0 / (temperature * temperature)
  raise ConfigError(f"distill.kd_scale must be 'T2' or '1', got {scale!r}")


def _kd(ctx: Context, cfg):
  t = cfg.temperature
  s_logits, t_logits = logit_pair(ctx, cfg)
  return soft_scale(cfg, t) * losses.kd_loss(s_logits, t_logits, t)


register('kd', Method(_kd))

# The references' loss weights per method, as our weights: RepDistiller's -r (CE) -a (KD) -b (the method's term)
# in scripts/run_cifar_distill.sh; mdistiller's configs/cifar100/dkd/*.yaml (CE 1, DKD 1 with alpha/beta inside);
# the SimKD repo's -c 0 -d 0 -b 1.
REFERENCE_WEIGHTS = {
    'kd': {'ce': 0.1, 'kd': 0.9},
    'fitnet': {'ce': 1.0, 'fitnet': 100.0},
    'at': {'ce': 1.0, 'at': 1000.0},
    'sp': {'ce': 1.0, 'sp': 3000.0},
    'rkd': {'ce': 1.0, 'rkd': 1.0},
    'pkt': {'ce': 1.0, 'pkt': 30000.0},
    'vid': {'ce': 1.0, 'vid': 1.0},
    'crd': {'ce': 1.0, 'crd': 0.8},
    'dkd': {'ce': 1.0, 'dkd': 1.0},
    'simkd': {'simkd': 1.0},
    # mdistiller configs/cifar100/reviewkd.yaml (REVIEWKD_WEIGHT 5) and engine/cfg.py (OFD FEAT_WEIGHT 0.001);
    # GzyAftermath/CAT-KD configs/cifar100/CAT_KD/res32x4_res8x4.yaml (CAT_loss_weight 15).
    'reviewkd': {'ce': 1.0, 'reviewkd': 5.0},
    'ofd': {'ce': 1.0, 'ofd': 0.001},
    'cat_kd': {'ce': 1.0, 'cat_kd': 15.0},
}
# The logit frontier (kdjax/methods/logit.py): DIST, image_classification_sota configs/strategies/distill/
# dist_cifar.yaml (ori_loss_weight 1, kd_loss_weight 2); NKD, cls_KD's CIFAR-100 config (NKD added to the student's
# CE, weight 1); CTKD, zhengli97/CTKD scripts/run_cifar_distill.sh (-r 0.1 -a 0.9).
REFERENCE_WEIGHTS['dist'] = {'ce': 1.0, 'dist': 2.0}
REFERENCE_WEIGHTS['nkd'] = {'ce': 1.0, 'nkd': 1.0}
REFERENCE_WEIGHTS['ctkd'] = {'ce': 0.1, 'ctkd': 0.9}
# MLKD: Multi-Level-Logit-Distillation's mdistiller/engine/cfg.py KD.LOSS (CE_WEIGHT 0.1 on CE(weak) + CE(strong),
# KD_WEIGHT 0.9 on every distillation part); configs/cifar100/ours/*.yaml (lr 0.025 for resnet32x4 -> resnet8x4).
REFERENCE_WEIGHTS['mlkd'] = {'ce': 0.1, 'ce_strong': 0.1, 'mlkd': 0.9}
# RepDistiller scripts/run_cifar_distill.sh (-a 0 -b: NST 50, CC 0.02, AB 1, FT 200, FSP 50): helper/loops.py sets
# AB's and FSP's main-stage term to 0 (they act in the pre-training stage only), hence their weight 0 here. KDSVD:
# mdistiller engine/cfg.py KDSVD.LOSS (CE 1, FEAT 1).
REFERENCE_WEIGHTS.update({
    'nst': {'ce': 1.0, 'nst': 50.0},
    'cc': {'ce': 1.0, 'cc': 0.02},
    'ab': {'ce': 1.0, 'ab': 0.0},
    'ft': {'ce': 1.0, 'ft': 200.0},
    'fsp': {'ce': 1.0, 'fsp': 0.0},
    'kdsvd': {'ce': 1.0, 'kdsvd': 1.0},
})
# Their pre-training stages (`config.distill.init`, kdjax/stages.py): RepDistiller train_student.py's init_epochs 30
# and init_trainable_list (AB: connectors + the student's feature modules; FT: the paraphraser, on nn.MSELoss
# reconstruction; FSP: the student's feature modules), with the stage loss at weight 1 (helper/pretrain.py).
REFERENCE_INIT = {
    'ab': dict(epochs=30, losses={'ab': 1.0}, train=('student/backbone', 'extras/ab'), freeze_after=('extras/ab',)),
    'ft': dict(epochs=30, losses={'ft_rec': 1.0}, train=('extras/ft/paraphraser',),
               freeze_after=('extras/ft/paraphraser',)),
    'fsp': dict(epochs=30, losses={'fsp': 1.0}, train=('student/backbone',)),
}


def repdistiller_weights(method: str, r: float, a: float, b: float) -> dict:
  """RepDistiller's `-r gamma -a alpha -b beta` (CE, KD, the method's term) as `config.distill.losses`."""
  weights = {'ce': r, 'kd': a}
  if method != 'kd':
    weights[method] = b
  return weights


def simkd_repo_weights(method: str, c: float, d: float, b: float) -> dict:
  """The SimKD repo's `-c -d -b` (CE, KD, the method's term) as `config.distill.losses`; the same convention."""
  return repdistiller_weights(method, c, d, b)


def reference_weights(method: str) -> dict:
  """`config.distill.losses` for `method` as the reference codebases run it on CIFAR-100."""
  if method not in REFERENCE_WEIGHTS:
    raise ConfigError(f'no reference weights for {method!r}; known: {", ".join(REFERENCE_WEIGHTS)}')
  return dict(REFERENCE_WEIGHTS[method])


class Extras(nn.Module):
  """Holds every enabled method's extra module; returns {method name: outputs dict}."""
  modules: dict

  @nn.compact
  def __call__(self, student: ModelOutput, teacher: ModelOutput | None, *, labels, indices, train: bool,
               teacher_classify: Callable | None, teacher_variables=None, student_classify: Callable | None = None):
    # teacher_classify(embedding) applies the frozen teacher's head; it closes over the step's teacher variables,
    # which is why it is a call argument and not a module attribute.
    # A module whose class lists names in `extra_inputs` also receives those of: `teacher_variables` (the frozen
    # teacher's variables, e.g. OFD's margins from its BN parameters) and `student_classify` (the student's head,
    # differentiable, e.g. CAT-KD's class activation maps); the other modules' signatures stay as they are.
    optional = {'teacher_variables': teacher_variables, 'student_classify': student_classify}
    # Cloned under the method's own name, so parameters read params['extras'][method] (not 'modules_<method>').
    # `teacher` is one ModelOutput, or {method: its teacher's outputs} when terms read different teachers.
    pick = lambda name: teacher[name] if isinstance(teacher, dict) else teacher
    return {name: module.clone(name=name, parent=self)(
                student, pick(name), labels=labels, indices=indices, train=train, teacher_classify=teacher_classify,
                **{k: optional[k] for k in getattr(module, 'extra_inputs', ())})
            for name, module in self.modules.items()}


class Distiller:
  """Binds the configured terms to a student (and teacher) for the train and eval steps."""

  def __init__(self, cfg, student: nn.Module, teacher: nn.Module | None, num_teachers: int = 1):
    self.cfg = cfg
    load_methods()
    weights = dict(cfg.losses)
    for name in stages.stage_losses(cfg):  # terms of the pre-training stage only: weight 0 in the main stage
      weights.setdefault(name, 0.0)
    unknown = sorted(set(weights) - set(METHODS))
    if unknown:
      raise ConfigError(f'unknown loss term(s) {unknown} in config.distill.losses; known: {sorted(METHODS)}')
    self.terms = {name: (float(w), METHODS[name]) for name, w in weights.items()}
    self.needs_teacher = any(m.needs_teacher for _, m in self.terms.values())
    if self.needs_teacher and teacher is None:
      needing = [n for n, (_, m) in self.terms.items() if m.needs_teacher]
      raise ConfigError(f'loss term(s) {needing} need a teacher, but config.teacher.model is empty')
    self.student, self.teacher = student, teacher
    self.module_methods = {n: m for n, (_, m) in self.terms.items() if m.module is not None}
    self.extras = None
    self.exports = [m.export for _, m in self.terms.values() if m.export is not None]
    self.views = tuple(sorted({v for _, m in self.terms.values() for v in m.views}))
    self.teacher_for = {k: int(v) for k, v in dict(cfg.get('teacher_for', {}) or {}).items()}
    for name, index in self.teacher_for.items():
      if name not in self.terms:
        raise ConfigError(f'config.distill.teacher_for names {name!r}, which is not a term of config.distill.losses')
      if not 0 <= index < num_teachers:
        raise ConfigError(f'config.distill.teacher_for.{name}={index}: teacher index out of range (the config has '
                          f'{num_teachers} teacher(s): config.teacher is 0, config.teachers[i] is i + 1)')
      if index and self.terms[name][1].teacher0_network:
        raise ConfigError(f'config.distill.teacher_for.{name}={index}: {name} reads the network of config.teacher '
                          '(teacher 0) itself, not only its outputs; it cannot take another teacher')

  def term_teachers(self, default, teachers):
    """What each extra module reads as its teacher: `default`, or {method: its teacher} when some term has its own
    (`distill.teacher_for`)."""
    if teachers is None or not self.teacher_for:
      return default
    return {name: teachers[self.teacher_for[name]] if name in self.teacher_for else default for name in self.terms}

  def build_extras(self, student_shapes: ModelOutput, teacher_shapes: ModelOutput | None, info: DataInfo):
    """Instantiates the methods' extra modules once the output shapes are known (they size the projectors)."""
    pick = lambda name: teacher_shapes[name] if isinstance(teacher_shapes, dict) else teacher_shapes
    for name, (_, method) in self.terms.items():
      check_pair(name, method, self.cfg, student_shapes, pick(name), info)
    if self.module_methods:
      self.extras = Extras({n: m.module(self.cfg, student_shapes, pick(n), info)
                            for n, m in self.module_methods.items()})
    return self.extras

  def losses(self, ctx: Context, cfg=None, weights=None):
    """(total, {term: value}); `cfg` is the distill section as one student of a sweep reads it (weights and
    numeric options may be arrays there), `self.cfg` by default; `weights` ({term: weight}) replace
    `cfg.losses` (the pre-training stage's, kdjax/stages.py)."""
    cfg = self.cfg if cfg is None else cfg
    weights = cfg.losses if weights is None else weights
    values = {name: method.loss(self._term_context(ctx, name), cfg) for name, (_, method) in self.terms.items()}
    total = sum(weights.get(name, 0.0) * values[name] for name in self.terms)
    return total, values

  def _term_context(self, ctx: Context, name: str) -> Context:
    if name not in self.teacher_for or ctx.teachers is None:
      return ctx
    return ctx.replace(teacher=ctx.teachers[self.teacher_for[name]])

  @staticmethod
  def logits(ctx: Context):
    return _student_logits(ctx)


def check_pair(name: str, method: Method, cfg, student_shapes, teacher_shapes, info: DataInfo):
  """Runs `method.check`; its refusal is re-raised as one line that names the method and both models."""
  if method.check is None:
    return
  try:
    method.check(cfg, student_shapes, teacher_shapes, info)
  except ConfigError as e:
    message = ' '.join(str(e).split())
    if not message.startswith(name):
      message = f'{name}: {message}'
    pair = f'student {info.name("student")}, teacher {info.name("teacher")}'
    raise ConfigError(f'{message} ({pair})') from None


def load_methods():
  # The method modules register themselves on import; kept lazy so that importing the engine stays cheap.
  from kdjax import methods  # noqa: F401
