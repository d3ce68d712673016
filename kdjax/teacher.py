"""The frozen teacher: restore it from a checkpoint (checking it is the configured network), or train and cache it;
several teachers as one group; the teacher the loss terms read.

The teacher's variables are passed to the jitted step as an argument: never donated, never in the optimizer, used
in eval mode under stop_gradient.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from kdjax import checkpoint as ckpt_lib
from kdjax import compile_cache
from kdjax import config_lib
from kdjax.config_lib import as_dict
from kdjax.errors import CheckpointMismatchError, CheckpointNotFoundError, ConfigError, KDError


class TeacherGroup:
  """Several frozen teachers (`config.teacher` then `config.teachers`) applied as one: their variables are a tuple,
  one argument of the step; `apply` returns the tuple of their outputs; `classify` is teacher 0's head (SimKD)."""

  def __init__(self, modules):
    self.modules = tuple(modules)

  def apply(self, variables, x, train: bool = False, method=None):
    if method == 'classify':
      return self.modules[0].apply(variables[0], x, method='classify')
    return tuple(m.apply(v, x, train=train) for m, v in zip(self.modules, variables))


def modules(teacher) -> tuple:
  """The Linen modules of a teacher (one, a TeacherGroup's, or none)."""
  if teacher is None:
    return ()
  return teacher.modules if isinstance(teacher, TeacherGroup) else (teacher,)


def module0(teacher):
  """The teacher's Linen module (teacher 0's with several: SimKD reuses its classifier), or None."""
  return (modules(teacher) or (None,))[0]


def combine(cfg, teacher, t_out):
  """(the teacher output the terms read by default, every teacher's outputs or None). With several teachers
  (`config.teachers`), `t_out` is a tuple: the default is teacher 0, or with `distill.ensemble` teacher 0's
  outputs with the mean of all the teachers' logits."""
  if not isinstance(teacher, TeacherGroup) or t_out is None:
    return t_out, None
  default = t_out[0]
  if cfg.distill.ensemble:
    default = default.replace(logits=jnp.mean(jnp.stack([o.logits for o in t_out]), axis=0))
  return default, tuple(t_out)


def input_shape(cfg, image_shape) -> tuple:
  """The image shape the teachers read: `teacher.image_size` square when set (the step resizes each batch to
  it: kdjax/step.py `teacher_input`), else the data's."""
  size = cfg.teacher.image_size
  return (size, size, image_shape[-1]) if size else tuple(image_shape)


def check_ensemble(cfg, teacher, teacher_vars, image_shape):
  """`distill.ensemble` averages logits: the teachers must agree on the class count."""
  if not cfg.distill.ensemble or not isinstance(teacher, TeacherGroup):
    return
  x = jnp.zeros((1,) + input_shape(cfg, image_shape), jnp.float32)
  counts = [o.logits.shape[-1] for o in jax.eval_shape(lambda v: teacher.apply(v, x), teacher_vars)]
  if len(set(counts)) > 1:
    raise ConfigError(f'config.distill.ensemble: the teachers have different class counts {counts} (teacher '
                      f'models {[m.name or type(m).__name__ for m in teacher.modules]})')


# Fields that do not change what the teacher learns; left out of the cache key.
_IN_CACHE_KEY = ('seed', 'data', 'student', 'epochs', 'batch_size', 'optimizer', 'schedule', 'dtype')
_DISTILL_IN_CACHE_KEY = ('losses', 'label_smoothing', 'subclass')


def cache_dir(cfg, dataset: str) -> str:
  """`<cache>/<dataset>-<model>-seed<k>-<recipe hash>`: a changed recipe trains a new teacher, never a stale one."""
  run = teacher_run_config(cfg).to_dict()
  # Only what a supervised teacher run reads: fields added to the schema later (another method's options, a new
  # top-level switch) leave the keys of teachers cached before them unchanged.
  recipe = {key: run[key] for key in _IN_CACHE_KEY}
  recipe['distill'] = {key: run['distill'][key] for key in _DISTILL_IN_CACHE_KEY}
  for where in ('data_dir', 'cache_dir'):  # where the data lies, not what it is (data.dir stays: a folder is its data)
    recipe['data'].pop(where, None)
  defaults = config_lib.base()
  later = [('data', k, v) for k, v in (('dir', ''), ('label_set', 'fine'))]
  later += [('data', k, defaults.data[k].to_dict()) for k in VIEW_FIELDS]
  later += [('optimizer', 'clip_norm', 0.0), ('schedule', 'length_epochs', 0)]
  for section, key, default in later:  # later fields: at their defaults, the keys cached before
    if recipe[section][key] == default:
      recipe[section].pop(key)
  # Teachers cached before BatchNorm kept PyTorch's unbiased running variance (layers.BatchNorm) hold other
  # statistics: this entry gives every teacher trained since a new key, so an old entry is never read.
  recipe['batch_norm'] = 'running variance unbiased'
  digest = hashlib.sha1(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:8]
  root = os.path.expanduser(cfg.teacher.cache_dir or '~/.cache/kdjax/teachers')
  return os.path.join(root, f"{dataset}-{cfg.teacher.model}-seed{cfg.teacher.seed}-{digest}")


# What a teacher's supervised run takes over from the run that needs it (the data, the length and the optimizer);
# everything else starts from the defaults, so that distillation settings do not change the teacher's cache key.
_INHERITED = ('data', 'epochs', 'batch_size', 'eval_batch_size', 'optimizer', 'schedule', 'dtype', 'num_devices',
              'steps_per_dispatch', 'eval_every_epochs', 'checkpoint_every_epochs', 'keep_checkpoints',
              'tensorboard')


def teacher_run_config(cfg) -> ml_collections.ConfigDict:
  """The config that trains the teacher: the run's data and recipe, overridden by `cfg.teacher.recipe`."""
  t = config_lib.base()
  for key in _INHERITED:
    t[key] = ml_collections.ConfigDict(cfg[key].to_dict()) if hasattr(cfg[key], 'to_dict') else cfg[key]
  _reset_views(t, as_dict(cfg.teacher.recipe))
  for key, value in as_dict(cfg.teacher.recipe).items():
    if isinstance(value, dict) and isinstance(t[key], ml_collections.ConfigDict):
      t[key].update(value)
    else:
      t[key] = value
  t.seed = cfg.teacher.seed
  t.student.update(model=cfg.teacher.model, kwargs=as_dict(cfg.teacher.kwargs),
                   init_checkpoint=cfg.teacher.init_checkpoint, subclasses=cfg.teacher.subclasses)
  t.distill.losses = as_dict(cfg.teacher.losses) or {'ce': 1.0}
  t.distill.subclass = ml_collections.ConfigDict(cfg.distill.subclass.to_dict())
  t.data.omit_class = -1  # the omitted-class experiment hides a class from the student's transfer set only
  return t


VIEW_FIELDS = ('mixup', 'cutmix', 'erasing', 'inception_crop', 'randaugment')


def _reset_views(t, recipe: dict):
  """The consistent views (mixup, ...: kdjax/views.py) are the distillation's: the teacher's own run trains
  without them unless its recipe sets them."""
  defaults = config_lib.base().data
  for field in VIEW_FIELDS:
    if field not in as_dict(recipe.get('data', {})):
      t.data[field] = defaults[field]
  return t


def with_teacher(cfg, index: int) -> ml_collections.ConfigDict:
  """`cfg` with teacher `index` as its `teacher` section: 0 is `config.teacher`, i > 0 is `config.teachers[i - 1]`
  over the teacher section's defaults (not over `config.teacher`: a second teacher inherits no checkpoint)."""
  if index == 0:
    return cfg
  entry = dict(as_dict(cfg.teachers[index - 1]) if hasattr(cfg.teachers[index - 1], 'to_dict')
               else cfg.teachers[index - 1])
  section = config_lib.base().teacher
  unknown = sorted(set(entry) - set(section))
  if unknown:
    raise ConfigError(f'config.teachers[{index - 1}]: unknown field(s) {unknown}; known: {", ".join(section)}')
  sub = ml_collections.ConfigDict(cfg.to_dict())
  section.update(entry)
  sub.teacher = section
  sub.teachers = []
  return sub


def check_meta(meta: dict, path: str, model: str, num_classes: int | None, subclasses: int = 1,
               role: str = 'teacher', kwargs: dict | None = None):
  """Fails before training when a checkpoint holds another network than the config's `role` section names."""
  if meta.get('model') != model:
    raise CheckpointMismatchError(f"{role} checkpoint {path} holds a {meta.get('model')!r} network, but "
                                  f'config.{role}.model is {model!r}')
  if num_classes is not None and meta.get('num_classes') != num_classes:
    raise CheckpointMismatchError(f"{role} checkpoint {path} has {meta.get('num_classes')} classes, but the "
                                  f'dataset and config need {num_classes}')
  # The layout of an imported network (Keras' padding and BatchNorm epsilon) must be the one the config builds.
  layout = (meta.get('model_kwargs') or {}).get('layout', 'torch')
  if kwargs is not None and layout != kwargs.get('layout', 'torch'):
    raise CheckpointMismatchError(f"{role} checkpoint {path} holds a {layout!r}-layout {model}, but "
                                  f"config.{role}.kwargs gives layout {kwargs.get('layout', 'torch')!r}; set "
                                  f"--config.{role}.kwargs=\"{{'layout': '{layout}'}}\"")
  if meta.get('subclasses', 1) != subclasses:
    raise CheckpointMismatchError(f"{role} checkpoint {path} has {meta.get('subclasses', 1)} subclasses per class, "
                                  f'but config.{role}.subclasses is {subclasses}')


def checkpoint_path(cfg, ds) -> tuple[str, bool]:
  """(the teacher's checkpoint directory, whether it must be trained first): `teacher.checkpoint`, or the cache
  entry of its recipe, complete or not yet. The loop trains a missing one (`teacher_run_config`) before `load`."""
  path = cfg.teacher.checkpoint or ''
  if path:
    meta = ckpt_lib.read_meta(path)
    if not meta.get('complete', True) and cfg.teacher.which == 'latest' and not cfg.teacher.accept_incomplete:
      raise CheckpointMismatchError(
          f"teacher checkpoint {path} is an unfinished run (step {meta.get('step')} of {meta.get('total_steps')}); "
          'finish it, or accept it with --config.teacher.accept_incomplete=true (or --config.teacher.which=best)')
    return path, False
  path = cache_dir(cfg, ds.name)
  try:
    done = ckpt_lib.read_meta(path).get('complete', False)
  except CheckpointNotFoundError:
    done = False
  if done:
    logging.info('teacher: reusing the cached %s at %s', cfg.teacher.model, path)
  elif cfg.teacher.image_size:
    raise ConfigError(f'config.teacher.image_size={cfg.teacher.image_size} needs config.teacher.checkpoint: a '
                      'teacher trained here trains at the data\'s own resolution')
  else:
    logging.info('teacher: config.teacher.checkpoint is empty; training %s first, cached at %s', cfg.teacher.model,
                 path)
  return path, not done


def load(cfg, ds, mesh, path: str):
  """(teacher module, its variables replicated over `mesh`) from the checkpoint at `path`, after checking that it
  holds the configured network."""
  from kdjax import models, sharding
  num_classes, subclasses = ds.num_classes, cfg.teacher.subclasses
  teacher = models.build_teacher(cfg, num_classes)
  which = cfg.teacher.which
  # The metadata of the step that will be restored: a mismatch is reported by name, not as a shape error.
  meta = ckpt_lib.read_meta(path, which)
  check_meta(meta, path, cfg.teacher.model, num_classes, subclasses, kwargs=as_dict(cfg.teacher.kwargs))
  index, students = cfg.teacher.index, meta.get('students', 1)
  if not 0 <= index < students:
    raise CheckpointMismatchError(f'config.teacher.index={index}, but teacher checkpoint {path} holds '
                                  f'{students} network(s)')
  x = jnp.zeros((1,) + input_shape(cfg, ds.image_shape), jnp.float32)
  # The shapes traced once, then read from the compilation cache's folder (a warm start).
  shapes = compile_cache.cached_shapes('teacher_shapes', [compile_cache.describe(teacher), x.shape,
                                                          compile_cache.source_digest(teacher)],
                                       lambda: jax.eval_shape(lambda: teacher.init(jax.random.key(0), x)))
  rep = sharding.replicated(mesh)
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), shapes)
  variables, _ = ckpt_lib.load_model(path, target, which, index)
  logging.info('teacher: %s restored from %s (step %s%s)', cfg.teacher.model, path, meta.get('step'),
               f', student {index} of its sweep of {students}' if students > 1 else '')
  return teacher, variables


def init_from_checkpoint(cfg, ds, trainer, ts):
  """Fine-tuning: start the student from a run's checkpoint. The head is kept when the class counts agree, else
  re-initialised; `student.freeze_backbone` is applied by the optimizer."""
  path = cfg.student.init_checkpoint
  from kdjax import step
  one = step.student(ts, 0)
  target = {'params': one.params['student'], **one.state['student']}
  if path.endswith('.h5'):  # a Keras weight file (kdjax.tools.import_keras), converted on the fly
    from kdjax.tools import import_keras
    layout = as_dict(cfg.student.kwargs).get('layout', 'torch')
    if layout != 'keras':
      raise ConfigError(f"student.init_checkpoint {path} is a Keras weight file, but config.student.kwargs gives "
                        f"layout {layout!r}; set --config.student.kwargs=\"{{'layout': 'keras'}}\"")
    variables = import_keras.convert(import_keras.read_weights(path, cfg.student.model), cfg.student.model,
                                     image_shape=ds.image_shape)
    same_head = variables['params']['head']['bias'].shape[0] == ds.num_classes
    restored = {c: v if same_head or c != 'params' else {k: a for k, a in v.items() if k != 'head'}
                for c, v in variables.items()}
  else:
    meta = ckpt_lib.read_meta(path)
    # The class count may differ (a new head is trained), the architecture may not.
    check_meta(meta, path, cfg.student.model, None, cfg.student.subclasses, role='student',
               kwargs=as_dict(cfg.student.kwargs))
    if meta.get('num_classes') != ds.num_classes:
      target['params'] = {k: v for k, v in target['params'].items() if k != 'head'}
    restored, _ = ckpt_lib.load_model(path, ckpt_lib.abstract(target))
  # Every student of a sweep starts from the same network.
  restored = jax.tree.map(lambda a: jnp.broadcast_to(a, (trainer.num_students,) + a.shape), restored)
  params = dict(ts.params, student=dict(ts.params['student'], **restored['params']))
  state = dict(ts.state, student={k: restored[k] for k in ts.state['student']})
  logging.info('student initialised from %s (%s)', path,
               'all weights' if 'head' in restored['params'] else 'backbone; new head')
  opt_state = jax.vmap(lambda p, hp: trainer.parts.optimizer(hp).init(p))(params, trainer.hparams)
  ts = ts.replace(params=params, state=state, opt_state=opt_state)
  return jax.device_put(ts, trainer.state_shardings(ts))


def evaluate_teacher(trainer) -> float:
  """The teacher's own test accuracy, a check that the right network was restored: over the test batches of the
  run's source (the device-resident arrays in one dispatch, or the streamed split batch by batch)."""
  parts = trainer.parts

  def run(teacher_vars, arrays):
    def body(sums, batch):
      from kdjax import step
      x = step.normalize(batch['images'], parts.data, parts.dtype)
      x = jax.lax.with_sharding_constraint(x, parts.batch_sharding)
      logits = combine(parts.cfg, parts.teacher, parts.teacher.apply(teacher_vars, step.teacher_input(parts, x),
                                                                train=False))[0].logits
      hit = (jnp.argmax(logits, -1) == batch['labels']) & batch['mask']  # class logits, also with subclasses
      return (sums[0] + jnp.sum(hit), sums[1] + jnp.sum(batch['mask'])), None
    return jax.lax.scan(body, (jnp.int32(0), jnp.int32(0)), arrays)[0]

  compiled, correct, count = None, 0, 0
  for arrays in dict(trainer.source.eval_batches())['test']:
    if compiled is None:  # one program for every batch (the streamed ones share their shapes)
      # A program of the run's: kept by the compiled-executable cache under its key (kdjax/compile_cache.py).
      key = trainer.program_key('evaluate_teacher')
      key = key and compile_cache.program_key(key, compile_cache.signature(arrays))
      compiled = compile_cache.load_or_compile(
          key, trainer.mesh.devices.flat,
          lambda name: jax.jit(compile_cache.named(run, name)).lower(trainer.teacher_vars, arrays).compile())[0]
    c, n = jax.device_get(compiled(trainer.teacher_vars, arrays))
    correct, count = correct + int(c), count + int(n)
  return correct / max(count, 1)


def prepare(cfg, ds, mesh, train_fn):
  """(teacher module, replicated variables), or (None, None) when the config has no teacher. A teacher that is
  neither given nor cached is trained first by `train_fn(config, workdir)` (the run loop, kdjax/train.py), as a
  supervised run with its own recipe."""
  from kdjax import distributed as dist
  if not cfg.teacher.model:
    return None, None
  path, must_train = checkpoint_path(cfg, ds)
  if must_train:  # on many hosts: every process trains it, as one run; process 0 writes its records
    train_fn(teacher_run_config(cfg), path)
    dist.barrier('kdjax-teacher-trained')
  if cfg.teacher.checkpoint:
    return load(cfg, ds, mesh, path)
  try:
    return load(cfg, ds, mesh, path)
  except KDError as e:  # it reads but does not fit (its data changed since it was cached): not damaged, kept
    raise CheckpointMismatchError(f'{e}: it is the cached teacher of this recipe, kept as it is (not damaged); if '
                                  f'the data it was trained on changed in place, rename or delete {path} to train '
                                  'it again, or set --config.teacher.cache_dir') from None
  except Exception as e:  # a cached teacher damaged on disk: kept aside, trained again
    aside = f'{path}.damaged-{int(time.time())}'
    if dist.is_primary():
      os.rename(path, aside)
    dist.barrier('kdjax-teacher-set-aside')
    logging.warning('the cached teacher %s is damaged (%s); moved to %s and trained again', path,
                    (str(e).strip().splitlines() or [type(e).__name__])[0][:200], aside)
    train_fn(teacher_run_config(cfg), path)
    return load(cfg, ds, mesh, path)


def prepare_all(cfg, ds, mesh, train_fn):
  """`prepare` for `config.teacher` and then each of `config.teachers` (each loaded, or trained first and cached,
  as a teacher of its own): (a TeacherGroup, the tuple of their variables) when there are several, else
  `prepare`'s (module, variables)."""
  first = prepare(cfg, ds, mesh, train_fn)
  extra = list(cfg.teachers or [])
  if not extra or first[0] is None:
    return first
  pairs = [first] + [prepare(with_teacher(cfg, i + 1), ds, mesh, train_fn) for i in range(len(extra))]
  return TeacherGroup([m for m, _ in pairs]), tuple(v for _, v in pairs)
