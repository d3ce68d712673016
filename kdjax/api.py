"""kdjax's public, functional entry: the train state, the teacher variables and the pure step of a config, for
batches the caller makes (a notebook, another loader, a step-by-step check against another framework).

    from kdjax import api, config_lib, data
    ds = data.from_arrays(x_train, y_train, x_test, y_test)      # uint8 images, integer labels
    run = api.init(cfg, ds, teacher_vars)                         # cfg: config_lib.base() and your fields
    state = run.state
    for x, y in my_batches:                                       # uint8 (normalised here) or float images
      state, metrics = run.train_step(state, run.teacher_vars, {'images': x, 'labels': y})
    print(run.accuracy(state, x_test, y_test))

`train_step` and `eval_step` are `jax.jit`s of `kdjax.step.train_step` / `eval_step`: the same functions
`launch.py` dispatches (tests/test_api.py checks a step on user batches against the same step through the run
loop). A batch of K steps ([K, B, ...]) trains K steps in one call. Every bad input is refused with one line
(`ConfigError`): a batch of another shape or dtype, labels out of range, a state of another config.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import checkpoint as ckpt_lib
from kdjax import distill
from kdjax import models
from kdjax import sharding
from kdjax import step as step_lib
from kdjax import sweep as sweep_lib
from kdjax import teacher as teacher_lib
from kdjax import trainer as trainer_lib
from kdjax import validate
from kdjax.errors import ConfigError


@dataclasses.dataclass(eq=False)
class Program:
  """A config's compiled step, bound to its students (a sweep's, or one), its teachers and a dataset's shape."""
  parts: step_lib.Parts
  sweep: sweep_lib.Sweep
  state: step_lib.TrainState      # the initial state (students stacked on the leading axis)
  teacher_vars: Any               # the teachers' variables (a tuple for several), or None
  hparams: dict                   # {path: [S]}: the swept numbers
  keys: jax.Array                 # [S]: each student's step keys (from its seed, as launch.py derives them)
  steps_loop: str                 # how a batch of K steps runs: 'unroll' | 'scan'

  def __post_init__(self):
    self._abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.state)
    self._train = jax.jit(self._train_fn)
    self._eval = jax.jit(functools.partial(step_lib.eval_step, self.parts))

  @property
  def num_students(self) -> int:
    return self.sweep.size

  def _train_fn(self, state, teacher_vars, batch, keys):
    def step(ts, b):
      views = dict(b['views'])
      for name in self.parts.distiller.views:
        if name not in views:  # made from the batch's images (uint8), as the run loop makes them from its own
          view = distill.VIEWS[name]
          rng = jax.random.fold_in(step_lib.seed_key(self.sweep.base.data.seed, view.stream), ts.step)
          views[name] = view.make(rng, b['images'], 'none')
      return step_lib.train_step(self.parts, ts, teacher_vars, dict(b, views=views), self.hparams, keys)

    if batch['labels'].ndim == 1:
      return step(state, batch)
    if self.steps_loop == 'scan':
      return jax.lax.scan(step, state, batch)
    metrics = []
    for i in range(batch['labels'].shape[0]):
      state, m = step(state, jax.tree.map(lambda a: a[i], batch))
      metrics.append(m)
    return state, jax.tree.map(lambda *ms: jnp.stack(ms), *metrics)

  def train_step(self, state, teacher_vars, batch: dict, rng=None):
    """(new state, metrics [S] per student; [K, S] for a batch of K steps). `batch`: {'images' [B, H, W, C]
    uint8 or float, 'labels' [B], 'indices' [B] (the examples' rows in the training set: needed by CRD's memory
    banks), 'views' (extra views a method reads; made from 'images' when absent)}, or the same with a leading K.
    `rng`: None for each student's own keys (as launch.py), or a key split over the students."""
    self.check_state(state)
    batch = self.check_batch(batch, train=True)
    keys = self.keys if rng is None else jax.random.split(rng, self.num_students)
    return self._train(state, teacher_vars, batch, keys)

  def eval_step(self, state, teacher_vars, batch: dict) -> dict:
    """Per student, the sums of `step.eval_step` over `batch` = {'images', 'labels', 'mask' (optional)}."""
    self.check_state(state)
    batch = self.check_batch(batch, train=False)
    return self._eval(state, teacher_vars, batch, self.hparams)

  def accuracy(self, state, images, labels, batch_size: int = 500) -> list[float]:
    """Each student's top-1 accuracy on (images, labels), in batches (the last one masked)."""
    images, labels = np.asarray(images), np.asarray(labels)
    sums = None
    for i in range(0, len(labels), batch_size):
      x, y = images[i:i + batch_size], labels[i:i + batch_size]
      pad = batch_size - len(y) if len(labels) > batch_size else 0
      batch = {'images': np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]),
               'labels': np.concatenate([y, np.zeros((pad,), y.dtype)]),
               'mask': np.arange(len(y) + pad) < len(y)}
      new = jax.device_get(self.eval_step(state, self.teacher_vars, batch))
      sums = new if sums is None else jax.tree.map(np.add, sums, new)
    return [float(t / c) for t, c in zip(sums['top1'], sums['count'])]

  def variables(self, state, i: int = 0) -> dict:
    """Student `i`'s network variables ({'params', 'batch_stats', ...}): e.g. the teacher variables of a later KD
    program, or what `checkpoint.save_model` writes."""
    one = step_lib.student(state, i)
    return {'params': one.params['student'], **one.state['student']}

  # ------------------------------------------------------------------------------------------------------ checks
  def check_state(self, state):
    """A state of another program (another config, model or sweep) is refused, naming the first leaf that
    differs."""
    if not isinstance(state, step_lib.TrainState):
      raise ConfigError(f'state must be the TrainState of api.init, got {type(state).__name__}')
    got = jax.tree_util.tree_flatten_with_path(state)[0]
    want = jax.tree_util.tree_flatten_with_path(self._abstract)[0]
    got_paths = [jax.tree_util.keystr(p) for p, _ in got]
    want_paths = [jax.tree_util.keystr(p) for p, _ in want]
    if got_paths != want_paths:
      diff = sorted(set(got_paths) ^ set(want_paths))
      raise ConfigError(f'state is not this program\'s: it {"lacks" if diff[0] in want_paths else "has"} '
                        f'{diff[0]} (a state of another config, model or sweep)')
    for (path, a), (_, b) in zip(got, want):
      if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
        raise ConfigError(f'state is not this program\'s: {jax.tree_util.keystr(path)} is {a.dtype}'
                          f'{list(a.shape)}, this program\'s is {b.dtype}{list(b.shape)} (a state of another '
                          'config, model or sweep)')

  def check_batch(self, batch: dict, train: bool) -> dict:
    """The batch as the step reads it, or one line saying what is wrong with it."""
    if not isinstance(batch, dict) or 'images' not in batch or 'labels' not in batch:
      raise ConfigError("batch must be a dict with 'images' and 'labels'")
    images, labels = batch['images'], batch['labels']
    shape = tuple(self.parts.data.image_shape)
    lead = tuple(images.shape[:-len(shape)]) if images.ndim > len(shape) else ()
    if tuple(images.shape[len(lead):]) != shape or len(lead) not in (1, 2):
      raise ConfigError(f"batch['images'] must be [B, {', '.join(map(str, shape))}] (or [K, B, ...]), got "
                        f'{list(images.shape)}')
    if not (images.dtype == np.uint8 or jnp.issubdtype(images.dtype, jnp.floating)):
      raise ConfigError(f"batch['images'] must be uint8 (normalised by the step) or float (already normalised), "
                        f'got {images.dtype}')
    if tuple(labels.shape) != lead or not jnp.issubdtype(labels.dtype, jnp.integer):
      raise ConfigError(f"batch['labels'] must be integers {list(lead)}, got {labels.dtype} {list(labels.shape)}")
    _check_range(labels, self.parts.data.num_classes, "batch['labels']", 'the classes')
    out = {'images': images, 'labels': labels, 'mask': batch.get('mask')}
    if not train:
      return out
    indices = batch.get('indices')
    if indices is None and any(m.needs_indices for _, m in self.parts.distiller.terms.values()):
      needing = [n for n, (_, m) in self.parts.distiller.terms.items() if m.needs_indices]
      raise ConfigError(f"batch['indices'] is needed by {', '.join(needing)} (the examples' rows in the training "
                        'set, for its memory banks)')
    if indices is not None:
      if tuple(indices.shape) != lead or not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ConfigError(f"batch['indices'] must be integers {list(lead)}, got {indices.dtype} "
                          f'{list(indices.shape)}')
      _check_range(indices, self.parts.data.num_train, "batch['indices']", 'the training set')
    views = dict(batch.get('views') or {})
    missing = [n for n in self.parts.distiller.views if n not in views]
    if missing and images.dtype != np.uint8:
      raise ConfigError(f"the view(s) {', '.join(missing)} are made from uint8 images; with float images give "
                        "batch['views'] = {name: images}")
    return dict(out, indices=indices, views=views)


def _check_range(values, n: int, what: str, of: str):
  if isinstance(values, jax.core.Tracer):
    return
  v = np.asarray(values)
  if v.size and (v.min() < 0 or v.max() >= n):
    raise ConfigError(f'{what} must lie in [0, {n}) ({of}), got {int(v.min())}..{int(v.max())}')


def _data_spec(data) -> step_lib.DataSpec:
  if isinstance(data, step_lib.DataSpec):
    return data
  if hasattr(data, 'train') and hasattr(data, 'num_classes'):
    return step_lib.DataSpec.of(data)
  raise ConfigError(f'data must be a kdjax.data.Dataset (e.g. data.from_arrays(...)) or a step.DataSpec, got '
                    f'{type(data).__name__}')


def _teacher(cfg, spec: step_lib.DataSpec):
  if not cfg.teacher.model:
    return None
  members = [teacher_lib.with_teacher(cfg, i) for i in range(len(cfg.teachers) + 1)]
  built = [models.build_teacher(m, spec.num_classes) for m in members]
  return built[0] if len(built) == 1 else teacher_lib.TeacherGroup(built)


def init(cfg, data, teacher_vars=None, mesh=None, batch_size: int | None = None) -> Program:
  """The program of `cfg` (its sweep's students; one for a single run) on `data` (a Dataset, or a step.DataSpec):
  the initial state, the teachers' variables (given: `teacher_vars`, a tuple with `config.teachers`; or None,
  then read from `config.teacher.checkpoint`), and the jitted steps. `batch_size` (default `config.batch_size`)
  sizes the extra modules traced at init; the steps take any batch size."""
  sweep = sweep_lib.expand(cfg)
  if sweep.groups:
    raise ConfigError('config.sweep: method= and student.model= axes make a program of several groups, which '
                      'launch.py runs; api.init takes one group (sweep the numbers only)')
  for s in sweep.students:
    validate.check(s.cfg)
  base = sweep.base
  spec = _data_spec(data)
  mesh = mesh if mesh is not None else sharding.make_mesh(1, sweep.size)
  teacher = _teacher(base, spec)
  student = models.build_student(base, spec.num_classes)
  distiller = distill.Distiller(base.distill, student, teacher, len(teacher_lib.modules(teacher)) or 1)
  if not distiller.needs_teacher:
    teacher = teacher_vars = None
  elif teacher_vars is None:
    teacher_vars = _load_teacher_vars(base, data, mesh, teacher)
  teacher_lib.check_ensemble(base, teacher, teacher_vars, spec.image_shape)
  batch_size = batch_size or base.batch_size
  steps_per_epoch = max(spec.num_train // batch_size, 1)
  students_loop = sweep_lib.students_loop(base)
  parts = step_lib.Parts(cfg=base, student=student, teacher=teacher, distiller=distiller, data=spec,
                         batch_size=batch_size, steps_per_epoch=steps_per_epoch, students_loop=students_loop)
  seeds = np.asarray([s.cfg.seed for s in sweep.students])
  init_keys = jax.vmap(lambda s: step_lib.seed_key(s, 2))(seeds)
  keys = jax.vmap(lambda s: step_lib.seed_key(s, 3))(seeds)
  hparams = {k: jnp.asarray(v) for k, v in sweep.traced.items()}
  # Compiled as the run loop compiles it (trainer.INIT_COMPILER_OPTIONS): the same initial state, bit for bit.
  state = jax.jit(functools.partial(step_lib.init_state, parts)).lower(init_keys, hparams, teacher_vars).compile(
      trainer_lib.INIT_COMPILER_OPTIONS.get(jax.default_backend()))(init_keys, hparams, teacher_vars)
  steps_loop = base.steps_loop
  if steps_loop == 'auto':
    steps_loop = 'unroll' if jax.default_backend() == 'cpu' else 'scan'
  return Program(parts, sweep, state, teacher_vars, hparams, keys, steps_loop)


def _load_teacher_vars(cfg, data, mesh, teacher):
  if not cfg.teacher.checkpoint:
    raise ConfigError('the loss terms need a teacher: pass teacher_vars= (e.g. api.init(...).variables(state) of a '
                      'trained program) or set config.teacher.checkpoint')
  if cfg.teachers:
    raise ConfigError('several teachers (config.teachers): pass their variables as a tuple, teacher_vars=')
  if not hasattr(data, 'train'):
    raise ConfigError('reading config.teacher.checkpoint needs the dataset (a kdjax.data.Dataset), not a DataSpec')
  return teacher_lib.load(cfg, data, mesh, cfg.teacher.checkpoint)[1]


def save(workdir: str, program: Program, state, i: int = 0, name: str | None = None):
  """Writes student `i`'s network as a model checkpoint: a later run's `config.teacher.checkpoint` or
  `student.init_checkpoint`, or `api.init(..., teacher_vars=api.load(...))`. Its methods' extra modules ride along:
  a later run's `config.distill.extras_checkpoint`."""
  cfg = program.sweep.base
  meta = {'model': cfg.student.model, 'model_kwargs': cfg.student.kwargs.to_dict(),
          'num_classes': program.parts.data.num_classes, 'subclasses': cfg.student.subclasses,
          'dataset': name or cfg.data.name, 'image_shape': list(program.parts.data.image_shape)}
  one = step_lib.student(state, i)
  extras = {'params': one.params['extras'], 'state': one.state['extras']}
  ckpt_lib.save_model(workdir, jax.device_get(program.variables(state, i)), meta, step=int(state.step),
                      extras=jax.device_get(extras))
