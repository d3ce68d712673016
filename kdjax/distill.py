"""The distillation engine: loss terms by name, each a pure function of model outputs, plus optional extra modules.

A config lists the terms and their weights, e.g. `config.distill.losses = {'ce': 0.1, 'kd': 0.9}`; the total loss
is sum(weight * term). Weight convention: every term's weight multiplies exactly the quantity its loss function
returns (the references' -r/-a/-b or -c/-d/-b flags map to weights of 'ce', 'kd' and the method's term; see
`PRESETS`).

A method is a `Method` registry entry, declared in one file: a pure loss of a `Context`, whether it needs the
teacher, optionally a factory for an extra trainable Linen module (projectors, regressors, embedding heads), its
options (`Options`: the section `config.distill.<section>` with its defaults, ranges and choices, from which
`config_lib.base()` and kdjax/validate.py are built), the numbers a sweep may vary (`hparams`), the extra views or
inputs it reads, and the references' recipe (`Recipe`: loss weights, a pre-training stage, per-pair settings, read by
configs/cifar100.py). The extra modules are applied to the student's and teacher's outputs in the same jitted step;
their outputs land in `ctx.extras[name]`. A method registered from outside kdjax (`register` before
`config_lib.base()` is called) is a method like kdjax's own: its section is in the schema, its options validated and
sweepable, its recipe a `configs/cifar100.py:METHOD,TEACHER,STUDENT` config.
"""

from __future__ import annotations

import copy
import dataclasses
import numbers
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
  # The soft targets [B, classes] of a mixed batch (mixup, cutmix: kdjax/views.py), which 'ce' reads instead of
  # `labels`; `labels` stay each example's own class.
  targets: jax.Array | None = None


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
class Range:
  """The values a numeric option may take: from `low` to `high` (None: unbounded), each bound allowed unless `low_ok`
  / `high_ok` is False. An int `low` asks for an integer. On a tuple option (MLKD's temperatures) every element is
  checked."""
  low: float
  high: float | None = None
  low_ok: bool = True
  high_ok: bool = True

  def refusal(self, value) -> str | None:
    """Why `value` is out of this range ('must be >= 1, got 0'), or None when it is in it."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
      return f'must be a number, got {value!r}'
    if isinstance(self.low, int) and not isinstance(value, int):
      return f'must be an integer, got {value!r}'
    if value < self.low or (value == self.low and not self.low_ok):
      return f'must be {">=" if self.low_ok else ">"} {self.low}, got {value!r}'
    if self.high is not None and (value > self.high or (value == self.high and not self.high_ok)):
      return f'must be {"<=" if self.high_ok else "<"} {self.high}, got {value!r}'
    return None


@dataclasses.dataclass(frozen=True)
class Options:
  """A method's options: the section `config.distill.<section>` ('' = the method's own name) with its `defaults`,
  the `ranges` ({field: Range}) of its numeric fields and the `choices` ({field: allowed values}) of its others.
  Several terms may share one section (FT's 'ft' and 'ft_rec' pass the same Options)."""
  defaults: dict
  ranges: dict = dataclasses.field(default_factory=dict)
  choices: dict = dataclasses.field(default_factory=dict)
  section: str = ''


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How the reference code runs a method on CIFAR-100: what `configs/cifar100.py:METHOD,TEACHER,STUDENT` builds.

  Settings are dotted paths under `config.distill` ('dkd.beta', 'losses.cat_kd'). An option setting of `pairs` or
  `digits` applies to every config of that pair (options are inert for the other methods' terms, so one pair's
  configs differ in their losses only); a 'losses.<term>' setting to the configs whose losses have that term.
  """
  weights: dict                 # config.distill.losses: the references' -r/-a/-b (or -c/-d/-b) flags as weights
  init: dict | None = None      # config.distill.init: the pre-training stage (kdjax/stages.py), its epochs included
  init_lr: dict = dataclasses.field(default_factory=dict)  # student model -> the stage's lr (absent: the main lr)
  pairs: dict = dataclasses.field(default_factory=dict)    # (teacher, student) -> settings: the per-pair files
  digits: dict = dataclasses.field(default_factory=dict)   # settings of the CPU-sized stand-in (the item `digits`)
  # (teacher, student) -> settings of the config itself ('optimizer.lr', 'epochs'): the reference's own training
  # recipe per pair, opt-in by the config-string item '<method>_recipe', for any method.
  training: dict = dataclasses.field(default_factory=dict)
  # config-string item -> function(config) -> None that turns this method's config into a variant (e.g. 'ls',
  # logit standardization with its authors' settings).
  variants: dict = dataclasses.field(default_factory=dict)
  # Settings under `config.distill` of this recipe alone, whatever the pair ('deit.kind': 'soft'): what sets apart
  # two recipes of one loss term (`register_recipe`).
  settings: dict = dataclasses.field(default_factory=dict)
  # True when the recipe is one of configs/cifar100.py's methods (its CNN pairs, its digits stand-in); False for a
  # recipe of another student family (DeiT's needs a ViT with a distillation token), which a sweep's `method=` axis
  # reaches.
  cifar100: bool = True


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
  # Its options section (`Options`), shared or its own; None when it reads none.
  options: Options | None = None
  # The references' recipe (`Recipe`): a method with one is a `configs/cifar100.py:METHOD,...` config.
  recipe: Recipe | None = None
  # True when the loss trains the head of a student's distillation token (DeiT's `dist_logits`): a student with the
  # token needs such a term, or its second head (half of its eval-mode prediction) would stay untrained.
  trains_dist_head: bool = False


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
# Recipes under names of their own (a `method=` axis value), beside those of the methods (`Method.recipe`).
RECIPES: dict[str, Recipe] = {}
# The options sections of the registered methods, by section name: `config.distill.<section>`.
SECTIONS: dict[str, Options] = {}
# `config.distill`'s own fields (and the omitted-class report's), which no method section may take.
CORE_FIELDS = ('losses', 'temperature', 'logit_standardize', 'kd_scale', 'cache_teacher', 'teacher_store',
               'store_topk', 'label_smoothing', 'omitted', 'ensemble', 'teacher_for', 'init')


def register(name: str, method: Method):
  """Adds the loss term `name`; its options section (`method.options`) joins the schema of the configs built after
  this (`config_lib.base()`). Refuses a name or section taken by another."""
  if name in METHODS:
    raise ValueError(f'method {name!r} registered twice')
  options = method.options
  if options is not None:
    section = options.section or name
    options = dataclasses.replace(options, section=section)
    if section in CORE_FIELDS or (section in SECTIONS and SECTIONS[section] != options):
      raise ValueError(f'method {name!r}: the options section {section!r} is taken (config.distill.{section})')
    for field in set(options.ranges) | set(options.choices):
      if field not in options.defaults:
        raise ValueError(f'method {name!r}: a range or choices for {section}.{field}, which has no default')
    method = dataclasses.replace(method, options=options)
  for path in method.hparams:
    section, _, field = path.partition('.')
    known = {**SECTIONS, **({options.section: options} if options is not None else {})}
    if section not in known or field not in known[section].defaults:
      raise ValueError(f'method {name!r}: hparam {path!r} names no option (config.distill.{path})')
  if options is not None:
    SECTIONS[options.section] = options
  METHODS[name] = method


def sections() -> dict:
  """{section: a copy of its defaults} of every registered method: `config.distill`'s method sections."""
  load_methods()
  return {name: copy.deepcopy(options.defaults) for name, options in SECTIONS.items()}


def register_recipe(name: str, recipe: Recipe):
  """A recipe under its own name (e.g. 'deit_soft': the 'deit' term with `deit.kind` 'soft'), for a `method=`
  axis; its terms must be registered methods."""
  if name in METHODS or name in RECIPES:
    raise ValueError(f'recipe {name!r} registered twice (or the name of a method)')
  unknown = [t for t in recipe.weights if t not in METHODS]
  if unknown:
    raise ValueError(f'recipe {name!r}: unknown loss terms {unknown}')
  RECIPES[name] = recipe


def recipes(cifar100_only: bool = False) -> dict:
  """{name: Recipe}: the registered methods' recipes in registration order, then those registered under names of
  their own; `cifar100_only`: configs/cifar100.py's (`Recipe.cifar100`)."""
  load_methods()
  out = {name: m.recipe for name, m in METHODS.items() if m.recipe is not None}
  out.update(RECIPES)
  return {name: r for name, r in out.items() if r.cifar100 or not cifar100_only}


def reference_weights(method: str) -> dict:
  """`config.distill.losses` for `method` as the reference codebases run it on CIFAR-100."""
  known = recipes()
  if method not in known:
    raise ConfigError(f'no reference weights for {method!r}; known: {", ".join(known)}')
  return dict(known[method].weights)


def reference_init(method: str, student: str = '') -> dict | None:
  """`config.distill.init` for `method` (its pre-training stage, with the stage lr of `student`), or None."""
  recipe = recipes().get(method)
  if recipe is None or recipe.init is None:
    return None
  return {**recipe.init, 'lr': recipe.init_lr.get(student, recipe.init.get('lr', 0.0))}


def recipe_settings(table: str, losses, key=None) -> dict:
  """The settings under `config.distill` that every recipe's `table` ('pairs' by (teacher, student) `key`, or
  'digits') gives a config whose loss terms are `losses`: the options of every method, the weights of its terms."""
  out = {}
  for recipe in recipes().values():
    settings = getattr(recipe, table)
    for path, value in (settings.get(key, {}) if key is not None else settings).items():
      if not path.startswith('losses.') or path[len('losses.'):] in losses:
        out[path] = value
  return out


# The pre-training stage's length (AB, FT, FSP: RepDistiller's `init_epochs` 30), by dataset ('digits': the
# CPU-sized stand-in's); `config.epochs` counts it.
STAGE_EPOCHS = {'digits': 2}
DEFAULT_STAGE_EPOCHS = 30


def set_settings(node, settings: dict):
  """Sets dotted `settings` ('dkd.beta', 'losses.cat_kd', 'optimizer.lr') under the config section `node`."""
  for path, value in settings.items():
    *parents, leaf = path.split('.')
    target = node
    for p in parents:
      target = target[p]
    target[leaf] = value


def method_config(c, method: str):
  """Makes config `c` run `method` as its reference recipe does for `c`'s pair (`c.teacher.model` ->
  `c.student.model`): the recipe's loss weights, every recipe's options for that pair (or, on digits, the CPU-sized
  stand-in's), and its pre-training stage, counted in `c.epochs`. The teacher's own recipe keeps the main length, so
  that every method of a pair reads the same cached teacher. What `configs/cifar100.py:METHOD,...` and a sweep's
  `method=` axis build."""
  known = recipes()
  if method not in known:
    raise ConfigError(f'unknown method {method!r}; methods with a reference recipe: {", ".join(known)}')
  c.distill.losses = reference_weights(method)
  digits = c.data.name == 'digits'
  if digits:
    set_settings(c.distill, recipe_settings('digits', c.distill.losses))
  else:
    set_settings(c.distill, recipe_settings('pairs', c.distill.losses, (c.teacher.model, c.student.model)))
  set_settings(c.distill, known[method].settings)
  init = reference_init(method, c.student.model)
  if init is None:
    c.distill.init = dict(stages.DEFAULTS)
    return c
  c.distill.init = dict(init, epochs=STAGE_EPOCHS.get(c.data.name, DEFAULT_STAGE_EPOCHS))
  recipe = c.teacher.recipe
  recipe = dict(recipe.to_dict() if hasattr(recipe, 'to_dict') else recipe)
  recipe.setdefault('epochs', c.epochs)
  c.teacher.recipe = recipe
  c.epochs += c.distill.init.epochs
  return c


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
  if cfg.logit_standardize:
    s, t = standardize(s), standardize(t)
  return s, t


def _ce(ctx: Context, cfg):
  """Cross-entropy with the labels, or with the mixed soft targets of a mixup/cutmix batch."""
  if ctx.targets is not None:
    return losses.soft_cross_entropy(_student_logits(ctx), ctx.targets, cfg.label_smoothing)
  return losses.cross_entropy(_student_logits(ctx), ctx.labels, cfg.label_smoothing)


# Its recipe is the student trained alone: the baseline row of a table (`method=ce`).
register('ce', Method(_ce, needs_teacher=False, recipe=Recipe(weights={'ce': 1.0})))


def soft_scale(cfg, temperature):
  """The factor on a temperature-softened term, relative to `losses.kd_loss` (which multiplies by T^2 as Hinton et
  al. and the anchors do): `distill.kd_scale = 'T2'` keeps it, `'1'` divides it out, the form
  (1 - a) CE + a CE(softmax(z_t / T), softmax(z_s / T)) of studies that write the soft term without T^2."""
  scale = cfg.kd_scale
  if scale == 'T2':
    return 1.0
  if scale == '1':
    return 1.0 / (temperature * temperature)
  raise ConfigError(f"distill.kd_scale must be 'T2' or '1', got {scale!r}")


def _kd(ctx: Context, cfg):
  t = cfg.temperature
  s_logits, t_logits = logit_pair(ctx, cfg)
  return soft_scale(cfg, t) * losses.kd_loss(s_logits, t_logits, t)


# Logit standardization (Sun et al., CVPR 2024), the config-string item `ls` of kd, dkd and ctkd:
# sunshangquan/logit-standardization-KD tools/train.py with `--logit-stand --base-temp 2 --kd-weight 9` (its README's
# CIFAR-100 commands) sets, for KD, the KD weight 9 and T 2 (CE keeps mdistiller/engine/cfg.py's KD.LOSS.CE_WEIGHT
# 0.1); for DKD, alpha and beta x 9 and T 2; CTKD+LS is that repo's CTKD/scripts/run_cifar_distill.sh (-r 0.1 -a 9).
LS_KD_WEIGHT = 9.0
LS_BASE_TEMPERATURE = 2.0


def _kd_ls(c):
  c.distill.logit_standardize = True
  c.distill.losses = {'ce': 0.1, 'kd': LS_KD_WEIGHT}
  c.distill.temperature = LS_BASE_TEMPERATURE


# RepDistiller scripts/run_cifar_distill.sh: -r 0.1 -a 0.9 -b 0 (T = 4).
register('kd', Method(_kd, recipe=Recipe(weights={'ce': 0.1, 'kd': 0.9}, variants={'ls': _kd_ls})))


def repdistiller_weights(method: str, r: float, a: float, b: float) -> dict:
  """RepDistiller's `-r gamma -a alpha -b beta` (CE, KD, the method's term) as `config.distill.losses`."""
  weights = {'ce': r, 'kd': a}
  if method != 'kd':
    weights[method] = b
  return weights


def simkd_repo_weights(method: str, c: float, d: float, b: float) -> dict:
  """The SimKD repo's `-c -d -b` (CE, KD, the method's term) as `config.distill.losses`; the same convention."""
  return repdistiller_weights(method, c, d, b)


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
    self.teacher_for = {k: int(v) for k, v in dict(cfg.teacher_for or {}).items()}
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
    if student_shapes.dist_logits is not None and not any(m.trains_dist_head for _, m in self.terms.values()):
      trainers = sorted(n for n, m in METHODS.items() if m.trains_dist_head)
      raise ConfigError(f'student {info.name("student")} has a distillation token, but no term of '
                        f'config.distill.losses trains its head ({", ".join(trainers)} would): add one, or use the '
                        'model without the token')
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
