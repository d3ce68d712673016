"""The train state and the one jitted train step (K steps per dispatch) for the S students of a sweep, and evaluation.

Data path, all inside jit: gather the batch from the device-resident uint8 arrays by the epoch's permutation and
augment it, or take it from the dispatch's streamed uint8 batches, an argument decoded and augmented on the host
(`data.pipeline = 'stream'`, kdjax/data/stream.py; `Experiment._batch`), normalise -> teacher forward once (eval mode, stop_gradient; its variables are an argument, never donated,
never in the optimizer; or its outputs read from a table computed once when the images are not augmented) ->
vmapped over the students: student forward (+ the methods' extra modules), every loss term, value_and_grad over the
trainable tree, optax update. The step is a pure function of (state, teacher variables, data, rng, step); each
student reads its swept hyperparameters from arrays with a leading students axis. A single run is S = 1.

Several teachers (`config.teachers`) are a `TeacherGroup`: their variables a tuple, their outputs a tuple, combined
into the terms' teacher by `Experiment.combine_teachers`. A method with `strong_view` (MLKD) adds a second,
strongly augmented view of the batch (its own rng stream), run through the teachers once and through each student
after the weak view. With `optimizer.name = 'dot'` the step takes the task and distillation gradients from one
forward pass (`jax.vjp`, two cotangents) and DOT's two momentum buffers combine them.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import threading
from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax import compile_cache
from kdjax import config_lib
from kdjax import data as data_lib
from kdjax import distill
from kdjax import models
from kdjax import optim
from kdjax import sharding
from kdjax import stages
from kdjax import sweep as sweep_lib
from kdjax.data import device as device_data
from kdjax.data import stream as stream_data
from kdjax.errors import ConfigError

# Teacher outputs cached on the device for the whole training set only below this size ('auto').
TEACHER_CACHE_LIMIT_BYTES = 2 << 30
# The initialisation runs once: on the CPU, LLVM's -O1 compiles it ~3x faster than the default -O2/-O3 (its
# threefry and erf_inv code is most of the setup of a CIFAR ResNet) and gives the same bits (tests/test_dispatch.py).
INIT_COMPILER_OPTIONS = {'cpu': {'xla_backend_optimization_level': 1}}
# The CPU's auto setting dispatches 4 steps at once from this many steps of training on: the extra compiles (the
# unrolled program, the single-step tail: 10-30 s for the CIFAR pairs of benchmarks/README.md) are repaid after
# roughly 400-1500 steps.
CPU_UNROLL_STEPS = 2000


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # shared by every student
  params: Any      # [S, ...] {'student': ..., 'extras': ...}: everything the optimizer updates
  state: Any       # [S, ...] {'student': {'batch_stats': ...}, 'extras': {...}}: non-trained collections
  opt_state: Any   # [S, ...]


def student(ts: TrainState, i: int) -> TrainState:
  """Student `i` of a (stacked) train state, without the students axis."""
  return ts.replace(params=jax.tree.map(lambda a: a[i], ts.params), state=jax.tree.map(lambda a: a[i], ts.state),
                    opt_state=jax.tree.map(lambda a: a[i], ts.opt_state))


def compute_dtype(cfg):
  return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[cfg.get('dtype', 'float32')]


def build_student(cfg, num_classes: int):
  return models.create(cfg.student.model, num_classes=num_classes, dtype=compute_dtype(cfg),
                       subclasses=cfg.student.get('subclasses', 1), **config_lib.as_dict(cfg.student.get('kwargs')))


def build_teacher(cfg, num_classes: int):
  return models.create(cfg.teacher.model, num_classes=num_classes, dtype=compute_dtype(cfg),
                       subclasses=cfg.teacher.get('subclasses', 1), **config_lib.as_dict(cfg.teacher.get('kwargs')))


def _seed_key(seed, stream: int):
  # Separate streams of one seed: the data order, the augmentation, the initialisation, the per-step randomness.
  return jax.random.fold_in(jax.random.key(seed), stream)


def map_students(fn, mode: str, *args):
  """`fn` applied to every student's slice of `args` (pytrees with a leading students axis), stacked again.

  'vmap' batches the students' arithmetic into one computation (the accelerators' path); 'unroll' traces one copy
  of `fn` per student into the same program. XLA:CPU runs the batched (grouped) convolutions that vmap makes of
  per-student weights many times slower than S separate ones (measured in benchmarks/sweep.py), so the CPU unrolls,
  at the price of a compile time that grows with S."""
  if mode == 'vmap':
    return jax.vmap(fn)(*args)
  n = jax.tree.leaves(args)[0].shape[0]
  outs = [fn(*jax.tree.map(lambda a: a[i], args)) for i in range(n)]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def _bytes(tree) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


class TeacherGroup:
  """Several frozen teachers (`config.teacher` then `config.teachers`) applied as one: their variables are a tuple,
  one argument of the step; `apply` returns the tuple of their outputs; `classify` is teacher 0's head (SimKD)."""

  def __init__(self, modules):
    self.modules = tuple(modules)

  def apply(self, variables, x, train: bool = False, method=None):
    if method == 'classify':
      return self.modules[0].apply(variables[0], x, method='classify')
    return tuple(m.apply(v, x, train=train) for m, v in zip(self.modules, variables))


class Experiment:
  """Everything a run compiles: models, distiller, optimizer and the jitted functions, bound to one dataset and one
  sweep (a single run is the sweep of one student)."""

  def __init__(self, cfg, ds: data_lib.Dataset, mesh=None, teacher=None, teacher_vars=None, sweep=None):
    self.sweep = sweep if sweep is not None else sweep_lib.expand(cfg)
    self.cfg = cfg = self.sweep.base
    self.num_students = self.sweep.size
    self.ds = ds
    self.batch_size = cfg.batch_size
    self.mesh = mesh if mesh is not None else sharding.make_mesh(cfg.get('num_devices', 0), self.num_students,
                                                                 cfg.get('mesh_students', 0), self.batch_size)
    n_data = sharding.data_size(self.mesh)
    if self.batch_size % n_data:
      over = f' (over {jax.process_count()} processes)' if jax.process_count() > 1 else ''
      raise ConfigError(f'batch_size {self.batch_size} is not divisible by the {n_data} devices of the data axis'
                        f'{over}')
    if self.num_students % self.mesh.shape['students']:
      raise ConfigError(f'{self.num_students} students do not split over the {self.mesh.shape["students"]} devices '
                        'of the students axis')
    self.steps_per_epoch = len(ds.train) // self.batch_size
    if self.steps_per_epoch == 0:
      raise ConfigError(f'batch_size {self.batch_size} exceeds the {len(ds.train)} training examples')
    self.total_steps = cfg.epochs * self.steps_per_epoch
    self.init_steps = stages.steps(cfg, self.steps_per_epoch)  # the pre-training stage (kdjax/stages.py), if any
    self.dtype = compute_dtype(cfg)
    if cfg.get('students_loop', 'auto') not in ('auto', 'vmap', 'unroll'):
      raise ConfigError(f"students_loop must be 'auto', 'vmap' or 'unroll', got {cfg.get('students_loop')!r}")
    self.students_loop = sweep_lib.students_loop(cfg)  # 'auto': unroll on the CPU, else vmap
    self.replicated = sharding.replicated(self.mesh)
    self.batch_sharded = sharding.batch_sharded(self.mesh)
    self.students_sharded = sharding.students_sharded(self.mesh)
    # The batch source: gathered from the device-resident arrays, or streamed (kdjax/data/stream.py): then each
    # dispatch's K uint8 batches [K, B, ...] are an argument of the step, split along the batch axis.
    self.streaming = isinstance(ds, stream_data.StreamDataset)
    self.chunk_sharded = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(None, 'data'))
    if self.streaming:
      self._check_streaming(cfg, n_data)

    self.student = build_student(cfg, ds.num_classes)
    self.teacher, self.teacher_vars = teacher, teacher_vars
    num_teachers = len(teacher.modules) if isinstance(teacher, TeacherGroup) else 1
    self.distiller = distill.Distiller(cfg.distill, self.student, teacher, num_teachers)
    self.k = min(cfg.get('steps_per_dispatch', 0) or self._auto_steps_per_dispatch(), self.steps_per_epoch)
    self.steps_loop = cfg.get('steps_loop', 'auto')
    if self.steps_loop not in ('auto', 'scan', 'unroll'):
      raise ConfigError(f"steps_loop must be 'auto', 'scan' or 'unroll', got {self.steps_loop!r}")
    if self.steps_loop == 'auto':
      self.steps_loop = 'unroll' if jax.default_backend() == 'cpu' else 'scan'
    if self.k > 1:
      logging.info('%d steps per dispatch (config.steps_per_dispatch = %d; auto: 4 on the CPU for one convolutional '
                   'student trained %d steps or more, up to 32 elsewhere), %s (config.steps_loop = %r; auto: '
                   'unroll on the CPU, where XLA runs a step inside a loop many times slower, benchmarks/README.md; '
                   'scan elsewhere)',
                   self.k, cfg.get('steps_per_dispatch', 0), CPU_UNROLL_STEPS,
                   'unrolled' if self.steps_loop == 'unroll' else 'in a rolled lax.scan', cfg.get('steps_loop', 'auto'))
    self.dot = cfg.optimizer.name == 'dot'
    if self.streaming and self.distiller.strong_view:
      raise ConfigError("mlkd's strong view is gathered from the device-resident training set; data.pipeline='stream' "
                        "has none: use data.pipeline='device'")
    if not self.distiller.needs_teacher:
      self.teacher = self.teacher_vars = None
    if cfg.distill.get('ensemble', False) and isinstance(self.teacher, TeacherGroup):
      x = jnp.zeros((1,) + tuple(ds.image_shape), self.dtype)
      shapes = jax.eval_shape(lambda v: self.teacher.apply(v, x), self.teacher_vars)
      counts = [o.logits.shape[-1] for o in shapes]
      if len(set(counts)) > 1:
        raise ConfigError(f'config.distill.ensemble: the teachers have different class counts {counts} (teacher '
                          f'models {[m.name or type(m).__name__ for m in self.teacher.modules]})')

    # Shared randomness (batch order, augmentation) from the data seed; per-student (init, dropout) from each seed.
    data_seed = cfg.data.get('seed', -1)
    self.data_seed = data_seed = cfg.seed if data_seed < 0 else data_seed  # also the streamed order's
    self.data_rng, self.aug_rng = _seed_key(data_seed, 0), _seed_key(data_seed, 1)
    self.strong_rng = _seed_key(data_seed, 4)  # the strong view's augmentation (MLKD), its own stream
    # Placed from host values (NumPy, the same on every process), as a mesh spanning many processes requires.
    seeds = np.asarray([s.cfg.seed for s in self.sweep.students])
    self.init_keys = jax.jit(jax.vmap(lambda s: _seed_key(s, 2)), out_shardings=self.replicated)(seeds)
    self.step_keys = jax.jit(jax.vmap(lambda s: _seed_key(s, 3)), out_shardings=self.students_sharded)(seeds)
    self.hparams = jax.device_put({k: np.asarray(v) for k, v in self.sweep.traced.items()},
                                  self.students_sharded)

    self.train_data = None if self.streaming else device_data.put_replicated(ds.train, self.replicated)
    self.eval_sets = {} if self.streaming else {
        name: jax.device_put(device_data.padded_eval_arrays(split, cfg.eval_batch_size), self.replicated)
        for name, split in (('val', ds.val), ('test', ds.test)) if split is not None}
    self.teacher_table = self._teacher_table()
    self._train_chunk = jax.jit(self._train_chunk_fn, donate_argnums=(0,))
    self._evaluate = jax.jit(self._evaluate_fn, out_shardings=self.replicated)  # every process reads the sums
    self._compiled_chunk = None
    self._init_shapes = None  # the initial state's shapes, traced once
    self._compiled_init = None  # the initial state's executable, and the thread that compiles it early
    self._init_thread = self._init_error = None
    self._key_base = None  # the compiled-executable cache's key ingredients (`program_key`), computed once
    self._single_step = None  # unrolled K > 1: the epoch's last steps when fewer than K are left

  def _check_streaming(self, cfg, n_data: int):
    if self.cfg.distill.get('cache_teacher', 'auto') == 'on':
      raise ConfigError("distill.cache_teacher=on needs the training set's example indices without augmentation; "
                        "data.pipeline='stream' cannot: set it to 'auto' or 'off'")
    if cfg.eval_batch_size % n_data:
      raise ConfigError(f'eval_batch_size {cfg.eval_batch_size} is not divisible by the {n_data} devices of the '
                        "data axis (data.pipeline='stream' splits every eval batch)")
    if jax.process_count() > 1 and self.mesh.shape['students'] > 1:
      raise ConfigError("data.pipeline='stream' on several processes needs mesh_students=1 (each process feeds "
                        'its own block of the data axis)')

  def _auto_steps_per_dispatch(self) -> int:
    # On the CPU, K = 4 steps unrolled into straight-line code: 4-15 % less time per step than single dispatches
    # for convolutional students, measured interleaved under kdjax's CPU setting (benchmarks/README.md,
    # step_ab.py), but compiled about K times longer (plus the single-step program of an epoch's last steps when K
    # does not divide it), so only on runs long enough to repay that (CPU_UNROLL_STEPS). A rolled loop is no option
    # there: XLA:CPU runs a step inside a while loop ~20x slower. Accelerators amortise dispatch over up to 32 steps
    # in a rolled scan, a divisor of the epoch so that no step is masked.
    if jax.default_backend() == 'cpu':
      # The one pair whose student has no convolutions (cnn_small -> MLP) ran 11 % slower per step unrolled; a
      # sweep's program already holds every student's step (unrolled on the CPU): not measured, left at 1.
      long_run = self.total_steps >= CPU_UNROLL_STEPS
      return 4 if long_run and self.num_students == 1 and models.convolutional(self.student) else 1
    return max(d for d in range(1, 33) if self.steps_per_epoch % d == 0)

  def view(self, hp) -> sweep_lib.View:
    """The config as one student reads it inside the step: its swept fields are the arrays in `hp`."""
    return sweep_lib.view(self.cfg, hp)

  def optimizer(self, hp) -> optax.GradientTransformation:
    return optim.optimizer(self.view(hp), self.steps_per_epoch)

  # ----------------------------------------------------------------------------------------------- teacher table
  def _teacher_table(self):
    """The teacher's outputs for every training example, [N, ...], when they can stand in for its forward pass:
    no augmentation (the same image every epoch) and an eval-mode teacher. None otherwise."""
    mode = self.cfg.distill.get('cache_teacher', 'auto')
    if mode not in ('auto', 'on', 'off'):
      raise ConfigError(f"distill.cache_teacher must be 'auto', 'on' or 'off', got {mode!r}")
    if self.teacher is None or mode == 'off':
      return None
    if self.streaming:
      logging.info("teacher outputs not cached (distill.cache_teacher): data.pipeline='stream' gives no example "
                   'indices to a fixed table; the teacher runs every step')
      return None
    if self.ds.augment != 'none':
      if mode == 'on':
        raise ConfigError(f'distill.cache_teacher=on needs un-augmented training images, but data.augment is '
                          f'{self.ds.augment!r}')
      return None
    n = len(self.ds.train)
    one = jax.eval_shape(lambda v: self.teacher.apply(v, jnp.zeros((1,) + self.ds.image_shape, self.dtype)),
                         self.teacher_vars)
    leaves, self._teacher_treedef = jax.tree.flatten(one)
    read = self._teacher_leaves_read()
    self._teacher_leaf_shapes = [jax.ShapeDtypeStruct(l.shape[1:], l.dtype) for l in leaves]
    size = sum(_bytes(l) for l, r in zip(leaves, read) if r) * n
    if mode == 'auto' and size > TEACHER_CACHE_LIMIT_BYTES:
      logging.info('the teacher outputs the losses read would take %.1f MiB for the %d training images: not cached '
                   '(limit %.0f MiB)', size / 2**20, n, TEACHER_CACHE_LIMIT_BYTES / 2**20)
      return None
    arrays = jax.device_put(device_data.padded_eval_arrays(self.ds.train, self.cfg.eval_batch_size),
                            self.replicated)

    @jax.jit
    def table(teacher_vars, arrays):
      def body(_, batch):
        x = device_data.normalize(batch['images'], self.ds.mean, self.ds.std, self.dtype)
        out = jax.tree.leaves(self.teacher.apply(teacher_vars, x, train=False))
        return None, [l if r else None for l, r in zip(out, read)]
      out = jax.lax.scan(body, None, arrays)[1]
      return [None if a is None else a.reshape((-1,) + a.shape[2:])[:n] for a in out]

    if any(isinstance(v, jax.ShapeDtypeStruct) for v in jax.tree.leaves(self.teacher_vars)):
      return jax.eval_shape(table, self.teacher_vars, arrays)  # an abstract teacher (tracing a config)
    logging.info('teacher outputs cached for the %d training images (%s: %.1f MiB): one teacher pass for the run',
                 n, f'{sum(read)} of {len(read)} output arrays, the ones the losses read', size / 2**20)
    return table(self.teacher_vars, arrays)

  def _teacher_leaves_read(self) -> list[bool]:
    """Which arrays of the teacher's output (its ModelOutput's leaves) one training step reads: traced once on
    abstract values, an input the step's computation never uses is not read (features that no loss taps)."""
    x, hp = self._dummy_input(), {k: jax.ShapeDtypeStruct((), jnp.asarray(v).dtype)
                                   for k, v in self.sweep.traced.items()}
    t_out = jax.eval_shape(lambda v: self.teacher.apply(v, x), self.teacher_vars)
    t_leaves, treedef = jax.tree.flatten(t_out)
    ts = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype),
                      jax.eval_shape(self._init_fn, self.init_keys, self.hparams, self.teacher_vars))
    y = jnp.zeros((x.shape[0],), jnp.int32)

    def loss(t_leaves, params, state, hp, teacher_vars):
      t_out = jax.tree.unflatten(treedef, t_leaves)
      strong = (x, t_out) if self.distiller.strong_view else (None, None)
      ctx, _ = self._forward(params, state, teacher_vars, x, y, y, jax.random.key(0), True, 0.0, t_out,
                             self.view(hp), *strong)
      return self.distiller.losses(ctx, self.view(hp).distill)[0]

    jaxpr = jax.make_jaxpr(loss)(t_leaves, ts.params, ts.state, hp, self.teacher_vars).jaxpr
    used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars} | {id(v) for v in jaxpr.outvars}
    return [id(v) in used for v in jaxpr.invars[:len(t_leaves)]]

  # ----------------------------------------------------------------------------------------------------------- init
  def _dummy_input(self):
    return jnp.zeros((self.batch_size,) + self.ds.image_shape, self.dtype)

  def _build_extras(self):
    x = self._dummy_input()
    s_shapes = jax.eval_shape(lambda: self.student.apply(self.student.init(jax.random.key(0), x), x))
    t_shapes = None
    if self.teacher is not None:
      t_shapes = jax.eval_shape(lambda v: self.distiller.term_teachers(
          *self.combine_teachers(self.teacher.apply(v, x))), self.teacher_vars)
    return self.distiller.build_extras(s_shapes, t_shapes,
                                       distill.DataInfo(len(self.ds.train), self.ds.num_classes, self.student,
                                                        self._teacher_module(), self.cfg.student.model,
                                                        self.cfg.teacher.get('model', '')))

  def _init_fn(self, init_keys, hparams, teacher_vars):
    extras = self._build_extras()
    x = self._dummy_input()

    def one(key, hp):
      k_s, k_e = jax.random.split(key)
      s_vars = self.student.init(k_s, x)
      params = {'student': s_vars['params'], 'extras': {}}
      state = {'student': {k: v for k, v in s_vars.items() if k != 'params'}, 'extras': {}}
      if extras is not None:
        s_out = self.student.apply(s_vars, x)
        t_out = self.teacher.apply(teacher_vars, x) if self.teacher is not None else None
        t_out = self.distiller.term_teachers(*self.combine_teachers(t_out))
        e_vars = extras.init({'params': k_e, 'memory': k_e}, s_out, t_out,
                             labels=jnp.zeros((x.shape[0],), jnp.int32),
                             indices=jnp.zeros((x.shape[0],), jnp.int32), train=False,
                             **self._extras_inputs(teacher_vars, s_vars['params']))
        params['extras'] = e_vars.get('params', {})
        state['extras'] = {k: v for k, v in e_vars.items() if k != 'params'}
      return params, state, self.optimizer(hp).init(params)

    params, state, opt_state = jax.vmap(one)(init_keys, hparams)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, state=state, opt_state=opt_state)

  def state_shardings(self, abstract_state: TrainState):
    return TrainState(step=self.replicated,
                      params=jax.tree.map(lambda _: self.students_sharded, abstract_state.params),
                      state=jax.tree.map(lambda _: self.students_sharded, abstract_state.state),
                      opt_state=jax.tree.map(lambda _: self.students_sharded, abstract_state.opt_state))

  def init_state(self, abstract: bool = False) -> TrainState:
    """The initial train state of every student; `abstract=True` gives its shapes (with their shardings) only:
    nothing is computed or compiled (the shapes are read from the cached executable when there is one)."""
    if self._init_shapes is None:
      if self._compiled_init is None and self._init_thread is None:
        self._compiled_init = compile_cache.load(self.program_key('init'), self.mesh.devices.flat)
      if self._compiled_init is not None:
        self._init_shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype),
                                         self._compiled_init.out_info)
      else:
        self._init_shapes = jax.eval_shape(self._init_fn, self.init_keys, self.hparams, self.teacher_vars)
    shapes = self._init_shapes
    shardings = self.state_shardings(shapes)
    if abstract:
      return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    if self._init_thread is not None:
      self._init_thread.join()
      self._init_thread = None
      if self._init_error is not None:
        raise self._init_error
    if self._compiled_init is None:
      self._compile_init()
    return self._compiled_init(self.init_keys, self.hparams, self.teacher_vars)

  def _compile_init(self):
    """The initial state's executable: from the compiled-executable cache, or compiled (at INIT_COMPILER_OPTIONS)
    and stored there."""
    key = self.program_key('init')

    def compile_fn(name):
      shardings = self.state_shardings(self.init_state(abstract=True))
      lowered = jax.jit(compile_cache.named(self._init_fn, name), out_shardings=shardings).lower(
          self.init_keys, self.hparams, self.teacher_vars)
      return lowered.compile(INIT_COMPILER_OPTIONS.get(jax.default_backend()))
    self._compiled_init = compile_cache.load_or_compile(key, self.mesh.devices.flat, compile_fn)[0]

  def start_init_compile(self):
    """Compiles the initial state's program in a thread, beside the train step's compilation (XLA releases the
    GIL while it compiles): a run that will call `init_state()` (not a resume) calls this before `compile`. On one
    process only: the processes of a multi-host run must compile their programs in the same order."""
    if self._compiled_init is not None or self._init_thread is not None or jax.process_count() > 1:
      return
    self.init_state(abstract=True)  # the shapes, traced here (once) and not in two threads
    if self._compiled_init is not None:
      return

    def run():
      try:
        self._compile_init()
      except BaseException as e:  # raised again by init_state, in the caller's thread
        self._init_error = e

    self._init_thread = threading.Thread(target=run, name='kdjax-init-compile', daemon=True)
    self._init_thread.start()

  def program_key(self, name: str) -> str | None:
    """The compiled-executable cache's key of this experiment's program `name` (kdjax/compile_cache.py), computed
    without tracing from everything that can change the program; None when that cache is off."""
    if compile_cache.executables_dir() is None or any(
        isinstance(v, jax.ShapeDtypeStruct) for v in jax.tree.leaves(self.teacher_vars)):  # an abstract teacher
      return None  # (tracing a config, kdjax/validate.py): nothing will run
    if self._key_base is None:
      ds, teachers = self.ds, self._teacher_modules()
      self._key_base = {
          'experiment': f'{type(self).__module__}.{type(self).__qualname__}',
          'students': [compile_cache.config_ingredient(s.cfg) for s in self.sweep.students],
          'sweep': self.sweep.to_json(), 'traced': compile_cache.signature(self.hparams),
          'data': {'name': ds.name, 'classes': ds.num_classes, 'mean': ds.mean, 'std': ds.std, 'augment': ds.augment,
                   'omitted': ds.omitted, 'image_shape': ds.image_shape,
                   'sizes': [len(x) if x is not None else None for x in (ds.train, ds.val, ds.test)],
                   # the device path's step gathers its batches from the training set, which is compiled into
                   # it; the streaming path's step takes them as an argument (their shapes: 'batches')
                   'train': None if self.streaming else compile_cache.array_digest(ds.train.images, ds.train.labels),
                   'streaming': self.streaming,
                   'batches': compile_cache.signature(self.batches_spec())},
          'mesh': [self.mesh.axis_names, self.mesh.devices.shape, [d.id for d in self.mesh.devices.flat]],
          'modules': [compile_cache.describe(m) for m in (self.student,) + teachers],
          'teacher_variables': compile_cache.signature(self.teacher_vars),
          'teacher_table': compile_cache.signature(self.teacher_table),
          'resolved': [self.k, self.steps_loop, self.students_loop, str(jnp.dtype(self.dtype))],
          'init_options': INIT_COMPILER_OPTIONS.get(jax.default_backend()),
          'source': compile_cache.source_digest(self, self.student, *teachers, functions=[
              f for _, m in self.distiller.terms.values() for f in (m.loss, m.module, m.check) if f is not None])}
    return compile_cache.program_key(name, self._key_base)

  def _teacher_modules(self) -> tuple:
    if self.teacher is None:
      return ()
    return self.teacher.modules if isinstance(self.teacher, TeacherGroup) else (self.teacher,)

  def trace_train_step(self):
    """Traces one step, as a dispatch of one, on abstract values: a cheap check that a config builds and lowers."""
    return jax.eval_shape(functools.partial(self._train_chunk_fn, k=1), self.init_state(abstract=True),
                          self.teacher_vars, self.teacher_table, self.hparams, jnp.int32(0), jnp.int32(0),
                          self.batches_spec(1))

  def _teacher_module(self):
    """The teacher's Linen module (teacher 0's with several: SimKD reuses its classifier)."""
    return self.teacher.modules[0] if isinstance(self.teacher, TeacherGroup) else self.teacher

  def _teacher_classify(self, teacher_vars):
    if self.teacher is None:
      return None
    return lambda emb: self.teacher.apply(teacher_vars, emb, method='classify')

  def _extras_inputs(self, teacher_vars, student_params) -> dict:
    """The networks the extra modules may call: the teacher's head, teacher 0's variables (methods that read them
    keep teacher 0: `Method.teacher0_network`) and the student's head."""
    teacher0 = teacher_vars[0] if isinstance(self.teacher, TeacherGroup) else teacher_vars
    return {'teacher_classify': self._teacher_classify(teacher_vars), 'teacher_variables': teacher0,
            'student_classify': lambda emb: self.student.apply({'params': student_params}, emb, method='classify')}

  # ---------------------------------------------------------------------------------------------------- forward
  def _forward(self, params, state, teacher_vars, x, y, idx, rng, train: bool, epoch, t_out=None, cfg=None,
               x_strong=None, t_strong=None):
    """One student's forward (+ extras); returns (Context, new non-trained state). `t_out`: the teacher's outputs
    when already computed (shared by the students); `cfg`: the config as this student reads it; `x_strong`,
    `t_strong`: the strongly augmented view and the teacher's outputs on it (MLKD), or None."""
    cfg = self.cfg if cfg is None else cfg
    if t_out is None:
      t_out = self._teacher_outputs(teacher_vars, None, x, idx)
    t_default, t_all = self.combine_teachers(t_out)
    drop_rng, extra_drop_rng, sample_rng = jax.random.split(rng, 3)
    mutable = list(state['student']) if train else False
    s_res = self.student.apply({'params': params['student'], **state['student']}, x, train=train,
                               mutable=mutable, rngs={'dropout': drop_rng})
    s_out, s_new = s_res if train else (s_res, state['student'])
    s_strong = None
    if x_strong is not None:  # the strong view after the weak one, BatchNorm statistics updated by both (MLKD)
      s_res = self.student.apply({'params': params['student'], **s_new}, x_strong, train=train, mutable=mutable,
                                 rngs={'dropout': jax.random.fold_in(drop_rng, 1)})
      s_strong, s_new = s_res if train else (s_res, s_new)
      t_strong = self.combine_teachers(t_strong)[0]
    extras_out, e_new = {}, state['extras']
    if self.distiller.extras is not None:
      e_mutable = list(state['extras']) if train else False
      res = self.distiller.extras.apply(
          {'params': params['extras'], **state['extras']}, s_out, self.distiller.term_teachers(t_default, t_all),
          labels=y, indices=idx, train=train, **self._extras_inputs(teacher_vars, params['student']),
          mutable=e_mutable, rngs={'dropout': extra_drop_rng, 'sample': sample_rng})
      extras_out, e_new = res if train else (res, state['extras'])
    ctx = distill.Context(student=s_out, teacher=t_default, labels=y, extras=extras_out, epoch=epoch,
                          teachers=t_all, strong_student=s_strong, strong_teacher=t_strong)
    return ctx, {'student': dict(s_new), 'extras': dict(e_new)}

  def combine_teachers(self, t_out):
    """(the teacher output the terms read by default, every teacher's outputs or None). With several teachers
    (`config.teachers`), `t_out` is a tuple: the default is teacher 0, or with `distill.ensemble` teacher 0's
    outputs with the mean of all the teachers' logits."""
    if not isinstance(self.teacher, TeacherGroup) or t_out is None:
      return t_out, None
    default = t_out[0]
    if self.cfg.distill.get('ensemble', False):
      default = default.replace(logits=jnp.mean(jnp.stack([o.logits for o in t_out]), axis=0))
    return default, tuple(t_out)

  def _teacher_outputs(self, teacher_vars, table, x, idx):
    if self.teacher is None:
      return None
    if table is not None:  # the arrays no loss reads are not kept: zeros of their shape, which XLA drops
      leaves = [jnp.zeros((idx.shape[0],) + s.shape, s.dtype) if a is None else a[idx]
                for a, s in zip(table, self._teacher_leaf_shapes)]
      return jax.tree.unflatten(self._teacher_treedef, leaves)
    return jax.lax.stop_gradient(self.teacher.apply(teacher_vars, x, train=False))

  # ------------------------------------------------------------------------------------------------------ train
  def _batch(self, source, i, step_in_epoch, step):
    """(images in the compute dtype, int32 labels, the examples' indices in the training set) of one step: gathered
    by the epoch's permutation `source` and augmented on the device, or step `i` of the streamed dispatch's batches
    `source` ({'images': uint8 [K, B, ...], 'labels', 'indices'}), already augmented on the host."""
    if self.streaming:
      x = device_data.normalize(source['images'][i], self.ds.mean, self.ds.std, self.dtype)
      return x, source['labels'][i], source['indices'][i]
    return device_data.train_batch(self.train_data, source, step_in_epoch, self.batch_size,
                                   jax.random.fold_in(self.aug_rng, step), self.ds, self.dtype)

  def _train_step(self, ts: TrainState, teacher_vars, table, hparams, source, i, step_in_epoch, epoch):
    x, y, idx = self._batch(source, i, step_in_epoch, ts.step)
    x = jax.lax.with_sharding_constraint(x, self.batch_sharded)
    t_out = self._teacher_outputs(teacher_vars, table, x, idx)  # once, shared by every student
    x_strong = t_strong = None
    if self.distiller.strong_view:  # a second, strongly augmented view of the same examples (MLKD)
      x_strong = device_data.strong_batch(self.train_data, idx, jax.random.fold_in(self.strong_rng, ts.step), self.ds,
                                          self.dtype)
      x_strong = jax.lax.with_sharding_constraint(x_strong, self.batch_sharded)
      t_strong = self._teacher_outputs(teacher_vars, None, x_strong, idx)
    progress = epoch + step_in_epoch.astype(jnp.float32) / self.steps_per_epoch

    def one(params, state, opt_state, hp, key):
      cfg = self.view(hp)
      in_stage = ts.step < self.init_steps
      if self.init_steps:  # the main stage starts with fresh moments, as the reference's fresh optimizer
        opt_state = stages.restart_moments(opt_state, self.optimizer(hp).init(params), ts.step == self.init_steps)

      def loss_fn(params):
        ctx, new_state = self._forward(params, state, teacher_vars, x, y, idx, jax.random.fold_in(key, ts.step),
                                       True, progress, t_out, cfg, x_strong, t_strong)
        weights = stages.loss_weights(cfg.distill, self.distiller.terms, in_stage) if self.init_steps else None
        total, terms = self.distiller.losses(ctx, cfg.distill, weights)
        if self.dot:  # DOT: the task and the distillation parts of the loss, differentiated separately
          w = cfg.distill.losses if weights is None else weights
          task = sum((w.get(n, 0.0) * terms[n] for n in terms if n in optim.DOT_TASK_TERMS), jnp.float32(0))
          total = jnp.stack([task, total - task])
        return total, (terms, self.distiller.logits(ctx), new_state)

      if self.dot:  # one forward pass, two backward passes through its linearisation
        parts, vjp, (terms, logits, new_state) = jax.vjp(loss_fn, params, has_aux=True)
        grads = tuple(vjp(jnp.eye(2, dtype=parts.dtype)[i])[0] for i in range(2))
        total = jnp.sum(parts)
      else:
        (total, (terms, logits, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, new_opt_state = self.optimizer(hp).update(grads, opt_state, params)
      new_params = optax.apply_updates(params, updates)
      if stages.needed(self.cfg):  # what the current stage does not train keeps its parameters and statistics
        masks = stages.Masks(self.cfg, params, tuple(self.distiller.terms))
        new_params, new_state = masks.params(new_params, params, in_stage), masks.state(new_state, state, in_stage)
      # The non-finite guard, in the step (no extra host sync): a step whose loss or gradient is not finite
      # changes nothing, and says so in its metrics, which the host reads a dispatch later.
      grads_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
      finite = jnp.isfinite(total) & grads_finite
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
      metrics = {'loss': total, 'correct': jnp.sum(jnp.argmax(logits, -1) == y).astype(jnp.float32),
                 'count': jnp.float32(y.shape[0]), 'nonfinite': 1.0 - finite.astype(jnp.float32),
                 'grad_nonfinite': 1.0 - grads_finite.astype(jnp.float32),
                 **{f'loss_{k}': v for k, v in terms.items()}}
      return keep(new_params, params), keep(new_state, state), keep(new_opt_state, opt_state), metrics

    params, state, opt_state, metrics = map_students(one, self.students_loop, ts.params, ts.state, ts.opt_state,
                                                     hparams, self.step_keys)
    # Per-step sums over a dispatch; loss terms are batch means, so they are weighted per step, not per example.
    return TrainState(ts.step + 1, params, state, opt_state), metrics

  def _train_chunk_fn(self, ts: TrainState, teacher_vars, table, hparams, epoch, start, batches=None,
                      k: int | None = None):
    """`k` (default `self.k`) steps from step `start` of `epoch`. In a rolled scan, steps past the epoch's end are
    skipped (one compilation); unrolled, the K steps are straight-line code and `train_chunk` never asks for steps
    past the end. Metrics are per student, [S], summed over the dispatch. `batches`: the streamed batches of the
    dispatch's steps ([K, B, ...]), or None to gather them from the device-resident training set."""
    k = self.k if k is None else k
    source = batches if self.streaming else device_data.epoch_permutation(self.data_rng, epoch, len(self.ds.train))
    step = lambda ts, s: self._train_step(ts, teacher_vars, table, hparams, source, s - start, s, epoch)
    as_sums = lambda m: dict(jax.tree.map(lambda a: a.astype(jnp.float32), m), steps=jnp.float32(1))
    if k == 1:  # no loop and no mask: `start` is always inside the epoch
      ts, m = step(ts, start)
      return ts, as_sums(m)
    if self.steps_loop == 'unroll':  # straight-line code, no loop and no mask: see `train_chunk`
      sums = None
      for i in range(k):
        ts, m = step(ts, start + i)
        sums = as_sums(m) if sums is None else jax.tree.map(jnp.add, sums, as_sums(m))
      return ts, sums
    zeros = jax.eval_shape(lambda: step(ts, jnp.int32(0))[1])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), zeros)
    zeros['steps'] = jnp.float32(0)

    def body(carry, i):
      s = start + i

      def run(c):
        ts, sums = c
        ts, m = step(ts, s)
        m = dict(m, steps=jnp.float32(1))
        return ts, jax.tree.map(lambda a, b: a + b.astype(jnp.float32), sums, m)

      return jax.lax.cond(s < self.steps_per_epoch, run, lambda c: c, carry), None

    (ts, sums), _ = jax.lax.scan(body, (ts, zeros), jnp.arange(k))
    return ts, sums

  def batches_spec(self, k: int | None = None):
    """The abstract streamed batches of a dispatch of `k` steps (None on the device-resident path)."""
    if not self.streaming:
      return None
    k, b = self.k if k is None else k, self.batch_size
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=self.chunk_sharded)
    return {'images': spec((k, b) + tuple(self.ds.image_shape), jnp.uint8), 'labels': spec((k, b), jnp.int32),
            'indices': spec((k, b), jnp.int32)}

  def compile(self, ts: TrainState) -> dict:
    """Compiles the train dispatch for `ts`'s shapes (abstract values are enough) before anything trains, and
    returns XLA's memory estimate per device: {'state', 'temp', 'total', 'available'} in bytes."""
    args = (ts, self.teacher_vars, self.teacher_table, self.hparams, jnp.int32(0), jnp.int32(0),
            self.batches_spec())
    shardings = self.state_shardings(ts)
    # The metrics come back replicated: every process (of a multi-host run too) reads them whole.
    key = self.program_key('train_chunk')
    key = key and compile_cache.program_key(key, compile_cache.signature(ts))  # the state it is compiled for
    self._train_chunk = jax.jit(self._train_chunk_fn, donate_argnums=(0,), out_shardings=(shardings, self.replicated))
    lower = lambda name: jax.jit(compile_cache.named(self._train_chunk_fn, name), donate_argnums=(0,),
                                 out_shardings=(shardings, self.replicated)).lower(*args).compile()
    compiled = compile_cache.load_or_compile(key, self.mesh.devices.flat, lower)[0]
    self._compiled_chunk = compiled  # the dispatches run this executable: compiled once, checked, then used
    analysis = compiled.memory_analysis()
    n_dev = self.mesh.devices.size
    state = _bytes(ts) // self.mesh.shape['students']
    out = {'state': state, 'temp': 0, 'total': state, 'available': available_memory(n_dev)}
    if analysis is not None:
      out['temp'] = int(analysis.temp_size_in_bytes)
      out['total'] = int(analysis.argument_size_in_bytes + analysis.temp_size_in_bytes +
                         max(analysis.output_size_in_bytes - analysis.alias_size_in_bytes, 0))
    return out

  def with_students(self, n: int) -> 'Experiment':
    """This experiment for its first `n` students only (a multiple of the students axis' devices), sharing the rest
    (the data on the devices, the teacher and its outputs' table, the mesh, K): the small program that
    `kdjax.memory` compiles to estimate the whole sweep's memory before the whole sweep's program is compiled."""
    sub = copy.copy(self)
    first = lambda tree: jax.tree.map(lambda a: a[:n], tree)
    sub.sweep = dataclasses.replace(self.sweep, students=self.sweep.students[:n], traced=first(self.sweep.traced))
    sub.num_students = n
    sub.init_keys = jax.jit(first, out_shardings=self.replicated)(self.init_keys)
    sub.step_keys = jax.jit(first, out_shardings=self.students_sharded)(self.step_keys)
    sub.hparams = jax.jit(first, out_shardings=self.students_sharded)(self.hparams)
    sub._train_chunk = jax.jit(sub._train_chunk_fn, donate_argnums=(0,))
    sub._evaluate = jax.jit(sub._evaluate_fn, out_shardings=self.replicated)
    sub._compiled_chunk = sub._init_shapes = sub._compiled_init = sub._init_thread = sub._init_error = None
    sub._key_base = sub._single_step = None
    return sub

  def train_chunk(self, ts, epoch: int, start: int, loader=None):
    """One dispatch from step `start` of `epoch`; on the streaming path `loader` (a `stream.TrainLoader`) gives
    its batches."""
    args = (self.teacher_vars, self.teacher_table, self.hparams, jnp.int32(epoch))
    if self.streaming and loader is None:
      raise ValueError("data.pipeline='stream': train_chunk needs the loader of the streamed batches")
    if self.k > 1 and self.steps_loop == 'unroll' and start + self.k > self.steps_per_epoch:
      # The unrolled program has no mask: the steps left before the epoch's end run as single-step dispatches
      # (their own program, compiled when first needed), their metrics summed in the same order as the K steps'.
      if self._single_step is None:
        self._single_step = jax.jit(functools.partial(self._train_chunk_fn, k=1), donate_argnums=(0,),
                                    out_shardings=(self.state_shardings(ts), self.replicated))
      sums = None
      for s in range(start, self.steps_per_epoch):
        ts, m = self._single_step(ts, *args, jnp.int32(s), loader.take(1) if self.streaming else None)
        sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
      return ts, sums
    batches = None
    if self.streaming:  # a rolled scan's steps past the epoch's end are masked: zeros stand in for them
      batches = loader.take(min(self.k, self.steps_per_epoch - start), pad_to=self.k)
    fn = self._compiled_chunk if self._compiled_chunk is not None else self._train_chunk
    return fn(ts, *args, jnp.int32(start), batches)

  # ------------------------------------------------------------------------------------------------------- eval
  def _evaluate_fn(self, ts: TrainState, teacher_vars, hparams, arrays):
    num_classes = self.ds.num_classes
    top_k = min(5, num_classes)
    adjust = self.cfg.distill.omitted.bias if self.ds.omitted >= 0 else 0.0

    def batch_sums(batch):
      x = device_data.normalize(batch['images'], self.ds.mean, self.ds.std, self.dtype)
      x = jax.lax.with_sharding_constraint(x, self.batch_sharded)
      y, mask = batch['labels'], batch['mask'].astype(jnp.float32)
      t_out = self._teacher_outputs(teacher_vars, None, x, y)  # once, shared by every student

      def one(params, state, hp):
        ctx, _ = self._forward(params, state, teacher_vars, x, y, y, jax.random.key(0), False, 0.0, t_out,
                               self.view(hp))
        logits = self.distiller.logits(ctx)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        top1 = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
        top5 = jnp.any(jax.lax.top_k(logits, top_k)[1] == y[:, None], axis=-1).astype(jnp.float32)
        onehot = jax.nn.one_hot(y, num_classes) * mask[:, None]
        new = {'loss': jnp.sum(nll * mask), 'top1': jnp.sum(top1 * mask), 'top5': jnp.sum(top5 * mask),
               'count': jnp.sum(mask), 'class_correct': onehot.T @ top1, 'class_count': jnp.sum(onehot, 0)}
        if t_out is not None:  # teacher-student top-1 agreement (the ensemble's, with several teachers)
          agree = (jnp.argmax(logits, -1) == jnp.argmax(self.combine_teachers(t_out)[0].logits, -1))
          agree = agree.astype(jnp.float32)
          new['agree'] = jnp.sum(agree * mask)
        if adjust:
          adjusted = logits.at[:, self.ds.omitted].add(adjust)
          top1_adj = (jnp.argmax(adjusted, -1) == y).astype(jnp.float32)
          new.update(top1_adj=jnp.sum(top1_adj * mask), class_correct_adj=onehot.T @ top1_adj)
        return new

      return map_students(one, self.students_loop, ts.params, ts.state, hparams)

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(batch_sums, jax.tree.map(lambda a: a[0], arrays)))
    return jax.lax.scan(lambda sums, batch: (jax.tree.map(jnp.add, sums, batch_sums(batch)), None), zeros,
                        arrays)[0]

  def evaluate(self, ts: TrainState) -> list[dict]:
    """Per student: {split}_loss, {split}_accuracy, {split}_top5, {split}_count, per-class accuracy and, with a
    teacher, {split}_agreement (top-1 agreement with it), for val (if any) and test; omitted-class runs add
    {split}_omitted_accuracy and the bias-adjusted {split}_*_adjusted."""
    out = [{} for _ in range(self.num_students)]
    for name, batches in self.eval_batches():
      sums = None
      for arrays in batches:  # the whole split at once on the device path; streamed, one batch at a time
        new = jax.device_get(self._evaluate(ts, self.teacher_vars, self.hparams, arrays))
        sums = new if sums is None else jax.tree.map(np.add, sums, new)
      for i, o in enumerate(out):
        s = jax.tree.map(lambda a: np.asarray(a)[i], sums)
        n = float(s['count'])
        o.update({f'{name}_loss': float(s['loss']) / n, f'{name}_accuracy': float(s['top1']) / n,
                  f'{name}_top5': float(s['top5']) / n, f'{name}_count': int(n),
                  f'{name}_class_accuracy': (s['class_correct'] / np.maximum(s['class_count'], 1)).tolist()})
        if 'agree' in s:
          o[f'{name}_agreement'] = float(s['agree']) / n
        k = self.ds.omitted
        if k >= 0:
          o[f'{name}_omitted_accuracy'] = float(s['class_correct'][k] / max(s['class_count'][k], 1))
          if 'top1_adj' in s:
            o[f'{name}_accuracy_adjusted'] = float(s['top1_adj']) / n
            o[f'{name}_omitted_accuracy_adjusted'] = float(s['class_correct_adj'][k] / max(s['class_count'][k], 1))
    return out


  def eval_batches(self):
    """(split name, its batches as the evaluation reads them) for val (if any) and test: the device-resident
    padded arrays as one item, or the streamed split batch by batch ([1, B, ...], masked)."""
    if not self.streaming:
      return [(name, [arrays]) for name, arrays in self.eval_sets.items()]
    return [(name, self._streamed_eval(name)) for name in ('val', 'test')
            if getattr(self.ds, name) is not None]

  def _streamed_eval(self, name: str):
    skipped = []
    for batch, corrupt in stream_data.eval_batches(self.ds, name, self.cfg.eval_batch_size, self.chunk_sharded):
      skipped += corrupt
      yield batch
    if skipped:
      logging.warning('evaluation (%s): %d corrupt image(s) skipped (data.on_corrupt=skip), e.g. %s', name,
                      len(skipped), skipped[0])


def available_memory(num_devices: int) -> int | None:
  """Bytes one device may use: the accelerator's limit, or on the CPU the host's available memory shared by the
  CPU devices. None when unknown."""
  dev = jax.devices()[0]
  try:
    stats = dev.memory_stats()
  except Exception:  # not every backend reports
    stats = None
  if stats and 'bytes_limit' in stats:
    return int(stats['bytes_limit'])
  try:
    with open('/proc/meminfo') as f:
      info = dict(line.split(':', 1) for line in f)
    return int(info['MemAvailable'].split()[0]) * 1024 // max(num_devices, 1)
  except (OSError, KeyError, ValueError):
    return None
