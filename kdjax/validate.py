"""Checks a run config before anything is written, read or compiled: every field's type and range and every choice
field's value, each refused with one line naming the field (`ConfigError`).

The checks read the config only (no dataset, no JAX): what depends on the data (class counts, a batch larger than
the training set) is checked where the data is read.
"""

from __future__ import annotations

import numbers

from kdjax import sweep
from kdjax.errors import ConfigError

CHOICES = {
    'data.augment': ('auto', 'crop_flip', 'none'),
    'teacher.which': ('latest', 'best'),
    'distill.kd_scale': ('T2', '1'),
    'distill.cache_teacher': ('auto', 'on', 'off'),
    'distill.simkd.loss': ('l2', 'kl'),
    'distill.simkd.projectors': ('last', 'multi', 'all'),
    'distill.subclass.normalize_over': ('example', 'batch'),
    'distill.kdsvd.layout': ('mdistiller', 'repdistiller'),
    'optimizer.name': ('sgd', 'adam', 'adamw', 'dot'),
    'schedule.name': ('step', 'cosine', 'constant'),
    'dtype': ('float32', 'bfloat16'),
    'sweep_mode': ('grid', 'zip'),
    'students_loop': ('auto', 'vmap', 'unroll'),
    'steps_loop': ('auto', 'scan', 'unroll'),
    'data.pipeline': ('auto', 'device', 'stream'),
    'data.on_corrupt': ('stop', 'skip'),
}

# field -> (lowest, highest, whether the lowest is allowed); None = unbounded.
RANGES = {
    'epochs': (1, None, True),
    'batch_size': (1, None, True),
    'eval_batch_size': (1, None, True),
    'steps_per_dispatch': (0, None, True),
    'eval_every_epochs': (1, None, True),
    'checkpoint_every_epochs': (1, None, True),
    'keep_checkpoints': (1, None, True),
    'num_devices': (0, None, True),
    'mesh_students': (0, None, True),
    'seeds': (1, None, True),
    'seed': (0, None, True),
    'data.val_fraction': (0.0, 1.0, True),
    'data.omit_class': (-1, None, True),
    'student.subclasses': (1, None, True),
    'teacher.subclasses': (1, None, True),
    'distill.temperature': (0.0, None, False),
    'distill.label_smoothing': (0.0, 1.0, True),
    'distill.simkd.factor': (1, None, True),
    'distill.dkd.alpha': (0.0, None, True),
    'distill.dkd.beta': (0.0, None, True),
    'distill.dkd.temperature': (0.0, None, False),
    'distill.dkd.warmup_epochs': (0.0, None, True),
    'distill.subclass.temperature': (0.0, None, False),
    'distill.crd.nce_k': (1, None, True),
    'distill.crd.nce_t': (0.0, None, False),
    'distill.crd.nce_m': (0.0, 1.0, True),
    'distill.crd.feat_dim': (1, None, True),
    'distill.dist.beta': (0.0, None, True),
    'distill.dist.gamma': (0.0, None, True),
    'distill.dist.tau': (0.0, None, False),
    'distill.nkd.temperature': (0.0, None, False),
    'distill.nkd.gamma': (0.0, None, True),
    'distill.ctkd.t_start': (0.0, None, True),
    'distill.ctkd.t_end': (0.0, None, False),
    'distill.ctkd.lambda_max': (0.0, None, True),
    'distill.ctkd.loops': (0.0, None, False),
    'distill.reviewkd.warmup_epochs': (0.0, None, True),
    'distill.reviewkd.max_mid_channels': (1, None, True),
    'distill.ofd.connector_kernel_size': (1, None, True),
    'distill.cat_kd.cam_resolution': (1, None, True),
    'distill.cc.feat_dim': (1, None, True),
    'distill.ab.margin': (0.0, None, True),
    'distill.ft.factor': (0.0, None, False),
    'distill.kdsvd.k': (1, None, True),
    'distill.init.epochs': (0, None, True),
    'distill.init.lr': (0.0, None, True),
    'optimizer.lr': (0.0, None, False),
    'optimizer.momentum': (0.0, 1.0, True),
    'optimizer.weight_decay': (0.0, None, True),
    'optimizer.dot_delta': (0.0, None, True),
    'distill.mlkd.num_strong': (0, None, True),
    'schedule.decay_factor': (0.0, None, False),
    'schedule.warmup_epochs': (0.0, None, True),
    'schedule.final_fraction': (0.0, 1.0, True),
    'data.device_budget_gb': (0.0, None, True),
    'data.workers': (0, None, True),
    'data.prefetch': (1, None, True),
    'data.image_size': (1, None, True),
    'data.resize': (1, None, True),
}
# Upper bounds that are excluded (a fraction of 1 leaves nothing to train on; momentum 1 never forgets).
_OPEN_ABOVE = ('data.val_fraction', 'distill.label_smoothing', 'optimizer.momentum')


_MISSING = object()


def _is_number(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check(cfg):
  """Raises ConfigError naming the first bad field of `cfg` (a run config, one student's). Read from plain
  containers where it can: it runs for every student of a sweep."""
  plain = cfg.to_dict() if hasattr(cfg, 'to_dict') else cfg
  sweep.check_numbers(plain)  # every number, wherever it is: no NaN or inf, integers in int64, seeds in 32 bits
  flat = sweep.flatten(plain)
  for path, allowed in CHOICES.items():
    value = flat.get(path, _MISSING)
    if value is not _MISSING and value not in allowed:
      raise ConfigError(f'config.{path} must be one of {", ".join(map(repr, allowed))}, got {value!r}')
  for path, (low, high, low_ok) in RANGES.items():
    value = flat.get(path, _MISSING)
    if value is _MISSING:
      continue
    if not _is_number(value):
      raise ConfigError(f'config.{path} must be a number, got {value!r}')
    if isinstance(low, int) and not isinstance(value, int):
      raise ConfigError(f'config.{path} must be an integer, got {value!r}')
    if value < low or (value == low and not low_ok):
      raise ConfigError(f'config.{path} must be {">=" if low_ok else ">"} {low}, got {value!r}')
    if high is not None and (value > high or (value == high and path in _OPEN_ABOVE)):
      raise ConfigError(f'config.{path} must be {"<" if path in _OPEN_ABOVE else "<="} {high}, got {value!r}')
  _check_models(cfg)
  _check_losses(cfg)
  _check_schedule(cfg)
  _check_init(cfg)
  from kdjax.data import stream
  stream.check_config(cfg)


def _check_models(cfg):
  from kdjax import models
  known = models.names()
  for role in ('student', 'teacher'):
    name = cfg[role].get('model', '')
    if name and name not in known:
      raise ConfigError(f'config.{role}.model: unknown model {name!r}; registered models: {", ".join(known)}')
  if not cfg.student.model:
    raise ConfigError('config.student.model is empty: name the network to train')
  teachers = list(cfg.get('teachers', None) or [])
  for i, entry in enumerate(teachers):
    name = dict(entry).get('model', '')
    if name not in known:
      raise ConfigError(f'config.teachers[{i}].model: unknown model {name!r}; registered models: {", ".join(known)}')
  if teachers and not cfg.teacher.get('model'):
    raise ConfigError('config.teachers is set but config.teacher.model is empty: config.teacher is teacher 0')
  for term, index in dict(cfg.distill.get('teacher_for', None) or {}).items():
    if not isinstance(index, int) or not 0 <= index <= len(teachers):
      raise ConfigError(f'config.distill.teacher_for.{term}={index!r}: teacher index out of range (0 = '
                        f'config.teacher, 1..{len(teachers)} = config.teachers)')
  o = cfg.optimizer
  if o.name == 'dot' and not 0 <= o.momentum - o.dot_delta <= o.momentum + o.dot_delta < 1:
    raise ConfigError(f'config.optimizer.dot_delta={o.dot_delta}: DOT needs 0 <= momentum - dot_delta and '
                      f'momentum + dot_delta < 1 (momentum {o.momentum})')


def _check_losses(cfg):
  from kdjax import distill
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
  if needing and not cfg.teacher.get('model'):
    raise ConfigError(f'config.distill.losses: {", ".join(needing)} need(s) a teacher, but config.teacher.model is '
                      'empty')


def _check_schedule(cfg):
  s = cfg.schedule
  if s.name == 'step':
    epochs = list(s.decay_epochs)
    if any(not _is_number(e) or e <= 0 for e in epochs) or epochs != sorted(epochs):
      raise ConfigError(f'config.schedule.decay_epochs must be increasing positive epochs, got {tuple(epochs)}')
  if s.get('warmup_epochs', 0) >= cfg.epochs:
    raise ConfigError(f'config.schedule.warmup_epochs={s.warmup_epochs} leaves no epoch after the warmup '
                      f'(config.epochs={cfg.epochs})')


def _check_init(cfg):
  """The pre-training stage (kdjax/stages.py): shorter than the run, known terms with weights >= 0, something to
  train. Whether `train`/`freeze_after` name real parameters is checked when the step is traced."""
  from kdjax import distill
  init = cfg.distill.get('init', None)
  if init is None or not init.get('epochs', 0):
    return
  if init.epochs >= cfg.epochs:
    raise ConfigError(f'config.distill.init.epochs={init.epochs} leaves no main training (config.epochs='
                      f'{cfg.epochs} counts the stage)')
  losses = dict(init.get('losses', {}))
  for name, weight in losses.items():
    if name not in distill.METHODS:
      raise ConfigError(f'config.distill.init.losses: unknown loss term {name!r}; known: '
                        f'{", ".join(sorted(distill.METHODS))}')
    if not _is_number(weight) or weight < 0:
      raise ConfigError(f'config.distill.init.losses.{name} must be a number >= 0, got {weight!r}')
  if not any(losses.values()):
    raise ConfigError('config.distill.init.losses: no term with a positive weight, the stage would train nothing')
  for field in ('train', 'freeze_after'):
    paths = init.get(field, ())
    if isinstance(paths, str) or any(not isinstance(p, str) or not p.strip('/') for p in paths):
      raise ConfigError(f'config.distill.init.{field} must be a tuple of parameter paths like '
                        f"'student/backbone', got {paths!r}")
  if not tuple(init.get('train', ())):
    raise ConfigError("config.distill.init.train is empty: name what the stage trains, e.g. ('student/backbone',)")
