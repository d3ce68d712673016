"""Checks a run config before anything is written, read or compiled: every field's type and range and every choice
field's value, each refused with one line naming the field (`ConfigError`).

The checks read the config only (no dataset, no JAX): what depends on the data (class counts, a batch larger than
the training set) is checked where the data is read.
"""

from __future__ import annotations

import numbers

from kdjax import distill
from kdjax import stages
from kdjax import sweep
from kdjax.distill import Range
from kdjax.errors import ConfigError

# The choices and ranges of the fields outside the methods' sections; each method's (`config.distill.<section>`) come
# from its `distill.Options` (`choices()`, `ranges()`).
CHOICES = {
    'data.augment': ('auto', 'crop_flip', 'none'),
    'teacher.which': ('latest', 'best'),
    'distill.kd_scale': ('T2', '1'),
    'distill.cache_teacher': ('auto', 'on', 'off'),
    'optimizer.name': ('sgd', 'adam', 'adamw', 'dot'),
    'schedule.name': ('step', 'cosine', 'constant'),
    'dtype': ('float32', 'bfloat16'),
    'sweep_mode': ('grid', 'zip'),
    'students_loop': ('auto', 'vmap', 'unroll'),
    'steps_loop': ('auto', 'scan', 'unroll'),
    'data.pipeline': ('auto', 'device', 'stream'),
    'data.on_corrupt': ('stop', 'skip'),
    'distill.store_stream': ('auto', 'on', 'off'),
    'data.mixup.mode': ('example', 'batch'),
    'data.cutmix.mode': ('example', 'batch'),
    'data.inception_crop.enabled': (False, True),
    'data.inception_crop.flip': (False, True),
}

R = Range
# An int lower bound asks for an integer; on a tuple field every element is checked. Upper bounds that are excluded:
# a fraction of 1 leaves nothing to train on (or test on), momentum 1 never forgets.
RANGES = {
    'epochs': R(1),
    'batch_size': R(1),
    'eval_batch_size': R(1),
    'steps_per_dispatch': R(0),
    'eval_every_epochs': R(1),
    'checkpoint_every_epochs': R(1),
    'keep_checkpoints': R(1),
    'num_devices': R(0),
    'mesh_students': R(0),
    'memory_budget_gb': R(0.0),        # 0 = the device's own
    'seeds': R(1),
    'seed': R(0),
    'data.seed': R(-1),                # -1 = config.seed
    'data.val_fraction': R(0.0, 1.0, high_ok=False),
    'data.val_seed': R(0),
    'data.train_examples': R(0),       # 0 = all
    'data.test_examples': R(0),
    'data.omit_class': R(-1),
    'data.folder.image_size': R(0),    # 0 = the images' own size
    'data.folder.test_fraction': R(0.0, 1.0, low_ok=False, high_ok=False),
    'data.folder.seed': R(0),
    'student.subclasses': R(1),
    'teacher.subclasses': R(1),
    'teacher.index': R(0),
    'teacher.seed': R(0),
    'distill.temperature': R(0.0, low_ok=False),
    'distill.label_smoothing': R(0.0, 1.0, high_ok=False),
    'distill.store_topk': R(0),        # 0 = every class
    'distill.omitted.bias': R(0.0),    # 0 = the plain accuracy only
    'distill.init.epochs': R(0),
    'distill.init.lr': R(0.0),
    'optimizer.lr': R(0.0, low_ok=False),
    'optimizer.momentum': R(0.0, 1.0, high_ok=False),
    'optimizer.weight_decay': R(0.0),
    'optimizer.dot_delta': R(0.0),
    'schedule.decay_epochs': R(0.0, low_ok=False),
    'schedule.decay_factor': R(0.0, low_ok=False),
    'schedule.warmup_epochs': R(0.0),
    'schedule.final_fraction': R(0.0, 1.0),
    'schedule.length_epochs': R(0.0),  # 0 = the run's end
    'data.device_budget_gb': R(0.0),
    'data.workers': R(0),
    'data.prefetch': R(1),
    'data.image_size': R(1),
    'data.resize': R(1),
    'data.mixup.alpha': R(0.0),        # 0 = off
    'data.mixup.prob': R(0.0, 1.0),
    'data.cutmix.alpha': R(0.0),
    'data.cutmix.prob': R(0.0, 1.0),
    'data.erasing.prob': R(0.0, 1.0),
    'data.inception_crop.min_scale': R(0.0, 1.0, low_ok=False),
    'data.inception_crop.max_scale': R(0.0, 1.0, low_ok=False),
    'data.randaugment.num_ops': R(0),  # 0 = off
    'data.randaugment.magnitude': R(0.0, 10.0),
    'data.randaugment.prob': R(0.0, 1.0),
    'data.randaugment.magnitude_std': R(0.0),  # > 100: uniform magnitudes
    'teacher.image_size': R(0),        # 0 = the data's own size
    'optimizer.clip_norm': R(0.0),     # 0 = off
}


def _sections(table: str) -> dict:
  distill.load_methods()
  return {f'distill.{name}.{field}': value for name, options in distill.SECTIONS.items()
          for field, value in getattr(options, table).items()}


def choices() -> dict:
  """{config path: allowed values} of every field that has choices: CHOICES and the registered methods'."""
  return {**CHOICES, **_sections('choices')}


def ranges() -> dict:
  """{config path: Range} of every numeric field: RANGES and the registered methods'."""
  return {**RANGES, **_sections('ranges')}


_MISSING = object()


def _is_number(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check(cfg):
  """Raises ConfigError naming the first bad field of `cfg` (a run config, one student's). Read from plain
  containers where it can: it runs for every student of a sweep."""
  plain = cfg.to_dict() if hasattr(cfg, 'to_dict') else cfg
  sweep.check_numbers(plain)  # every number, wherever it is: no NaN or inf, integers in int64, seeds in 32 bits
  flat = sweep.flatten(plain)
  for path, allowed in choices().items():
    value = flat.get(path, _MISSING)
    if value is not _MISSING and value not in allowed:
      raise ConfigError(f'config.{path} must be one of {", ".join(map(repr, allowed))}, got {value!r}')
  every = ranges()
  for path, limits in every.items():
    _check_range(path, flat.get(path, _MISSING), limits)
  for i, entry in enumerate(plain.get('teachers') or []):  # each a dict of teacher-section fields
    for field, value in dict(entry).items():
      if f'teacher.{field}' in every:
        _check_range(f'teachers[{i}].{field}', value, every[f'teacher.{field}'])
  _check_models(cfg)
  _check_losses(cfg)
  _check_schedule(cfg)
  _check_init(cfg)
  _check_views(cfg)
  from kdjax.data import stream
  stream.check_config(cfg)


def _check_range(path: str, value, limits: Range):
  if value is _MISSING:  # a field of the distill.init section that a config file left out (kdjax/stages.py)
    return
  items = list(enumerate(value)) if isinstance(value, (tuple, list)) else [(None, value)]
  for i, item in items:
    refusal = limits.refusal(item)
    if refusal:
      raise ConfigError(f'config.{path}{"" if i is None else f"[{i}]"} {refusal}')


def _check_models(cfg):
  from kdjax import models
  known = models.names()
  for role in ('student', 'teacher'):
    name = cfg[role].model
    if name and name not in known:
      raise ConfigError(f'config.{role}.model: unknown model {name!r}; registered models: {", ".join(known)}')
  if not cfg.student.model:
    raise ConfigError('config.student.model is empty: name the network to train')
  teachers = list(cfg.teachers or [])
  for i, entry in enumerate(teachers):
    name = dict(entry).get('model', '')
    if name not in known:
      raise ConfigError(f'config.teachers[{i}].model: unknown model {name!r}; registered models: {", ".join(known)}')
  if teachers and not cfg.teacher.model:
    raise ConfigError('config.teachers is set but config.teacher.model is empty: config.teacher is teacher 0')
  for term, index in dict(cfg.distill.teacher_for or {}).items():
    if not isinstance(index, int) or not 0 <= index <= len(teachers):
      raise ConfigError(f'config.distill.teacher_for.{term}={index!r}: teacher index out of range (0 = '
                        f'config.teacher, 1..{len(teachers)} = config.teachers)')
  o = cfg.optimizer
  if o.name == 'dot' and not 0 <= o.momentum - o.dot_delta <= o.momentum + o.dot_delta < 1:
    raise ConfigError(f'config.optimizer.dot_delta={o.dot_delta}: DOT needs 0 <= momentum - dot_delta and '
                      f'momentum + dot_delta < 1 (momentum {o.momentum})')


def _check_losses(cfg):
  distill.load_methods()
  losses = dict(cfg.distill.losses)
  if not losses:
    raise ConfigError('config.distill.losses is empty: give at least one loss term, e.g. {"ce": 1.0}')
  for name, weight in losses.items():
    if name not in distill.METHODS:
      known = ', '.join(sorted(distill.METHODS))
      raise ConfigError(f'config.distill.losses: unknown loss term {name!r}; known: {known}')
    if not _is_number(weight):
      raise ConfigError(f'config.distill.losses.{name} must be a number, got {weight!r}')
    if weight < 0:
      hint = ' (alpha above 1 makes the CE weight 1 - alpha negative)' if 'alpha' in cfg and name == 'ce' else ''
      raise ConfigError(f'config.distill.losses.{name} must be >= 0, got {weight:g}{hint}')
  if all(w == 0 for w in losses.values()):
    raise ConfigError('config.distill.losses: every weight is 0, nothing would be trained')
  needing = [n for n in losses if distill.METHODS[n].needs_teacher]
  if needing and not cfg.teacher.model:
    raise ConfigError(f'config.distill.losses: {", ".join(needing)} need(s) a teacher, but config.teacher.model is '
                      'empty')


def _check_schedule(cfg):
  s = cfg.schedule
  if s.name == 'step':
    epochs = list(s.decay_epochs)
    if any(not _is_number(e) or e <= 0 for e in epochs) or epochs != sorted(epochs):
      raise ConfigError(f'config.schedule.decay_epochs must be increasing positive epochs, got {tuple(epochs)}')
  if s.length_epochs and s.name != 'cosine':
    raise ConfigError(f"config.schedule.length_epochs={s.length_epochs} is read by schedule.name='cosine' only, "
                      f'not {s.name!r}')
  main = cfg.epochs - stages.epochs(cfg)
  if s.length_epochs and not s.warmup_epochs < s.length_epochs <= main:
    raise ConfigError(f'config.schedule.length_epochs={s.length_epochs} must be after the warmup '
                      f'({s.warmup_epochs} epochs) and at most the main training\'s {main} epochs (config.epochs)')
  if s.warmup_epochs >= cfg.epochs:
    raise ConfigError(f'config.schedule.warmup_epochs={s.warmup_epochs} leaves no epoch after the warmup '
                      f'(config.epochs={cfg.epochs})')


def _check_init(cfg):
  """The pre-training stage (kdjax/stages.py): shorter than the run, known terms with weights >= 0, something to
  train. Whether `train`/`freeze_after` name real parameters is checked when the step is traced."""
  epochs = stages.epochs(cfg)
  if not epochs:
    return
  if epochs >= cfg.epochs:
    raise ConfigError(f'config.distill.init.epochs={epochs} leaves no main training (config.epochs='
                      f'{cfg.epochs} counts the stage)')
  losses = dict(stages.field(cfg.distill, 'losses'))
  for name, weight in losses.items():
    if name not in distill.METHODS:
      raise ConfigError(f'config.distill.init.losses: unknown loss term {name!r}; known: '
                        f'{", ".join(sorted(distill.METHODS))}')
    if not _is_number(weight) or weight < 0:
      raise ConfigError(f'config.distill.init.losses.{name} must be a number >= 0, got {weight!r}')
  if not any(losses.values()):
    raise ConfigError('config.distill.init.losses: no term with a positive weight, the stage would train nothing')
  for field in ('train', 'freeze_after'):
    paths = stages.field(cfg.distill, field)
    if isinstance(paths, str) or any(not isinstance(p, str) or not p.strip('/') for p in paths):
      raise ConfigError(f'config.distill.init.{field} must be a tuple of parameter paths like '
                        f"'student/backbone', got {paths!r}")
  if not tuple(stages.field(cfg.distill, 'train')):
    raise ConfigError("config.distill.init.train is empty: name what the stage trains, e.g. ('student/backbone',)")


def _check_views(cfg):
  """The consistent views (kdjax/views.py): a crop range, one mode for mixup and cutmix together, soft targets of
  one column per class, a teacher that runs every step."""
  d = cfg.data
  crop = d.inception_crop
  if crop.enabled and crop.min_scale > crop.max_scale:
    raise ConfigError(f'config.data.inception_crop.min_scale={crop.min_scale} is above max_scale={crop.max_scale}')
  mixing = d.mixup.alpha > 0 or d.cutmix.alpha > 0
  if d.mixup.alpha > 0 and d.cutmix.alpha > 0 and d.mixup.mode != d.cutmix.mode:
    raise ConfigError(f'config.data.cutmix.mode={d.cutmix.mode!r} differs from data.mixup.mode={d.mixup.mode!r}: '
                      'with both on, each example (or the batch) takes one of them, so they share one mode')
  if mixing and cfg.student.subclasses > 1:
    raise ConfigError(f'config.data.mixup/cutmix: the mixed targets have one column per class, but '
                      f'config.student.subclasses={cfg.student.subclasses}')
  for i, entry in enumerate(cfg.teachers or []):  # the group reads one batch: one resolution for every teacher
    size = dict(entry).get('image_size', cfg.teacher.image_size)
    if size != cfg.teacher.image_size:
      raise ConfigError(f'config.teachers[{i}].image_size={size}: every teacher reads the batch at '
                        f'config.teacher.image_size={cfg.teacher.image_size}')
  ra = d.randaugment
  views_on = mixing or d.erasing.prob > 0 or crop.enabled or ra.num_ops > 0
  if views_on and cfg.distill.cache_teacher == 'on' and cfg.teacher.model:
    raise ConfigError("config.distill.cache_teacher='on' with data.mixup/cutmix/erasing/inception_crop/randaugment: the teacher "
                      'must read every step\'s new view; set it to auto or off')
