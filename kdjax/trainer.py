"""Compiling and dispatching the pure step (kdjax/step.py) for a run: K steps per dispatch, the initial state, the
compiled-executable cache's keys, the memory estimate, evaluation.

`Trainer` binds one sweep (a single run is the sweep of one student), one batch source (kdjax/data/source.py) and
the teachers to a mesh. A dispatch is one jitted program, the state donated: it reads the source's batches (gathered
from the device-resident training set, or the streamed uint8 batches it is given), and runs K steps of
`step.train_step` (a rolled `lax.scan` on accelerators; on the CPU, where XLA runs a step inside a loop or a
conditional many times slower, K > 1 unrolled into straight-line code). The train state, the teacher variables,
the teacher table, the swept hyperparameters, the per-student keys and the training arrays are all arguments:
the program closes over nothing but shapes.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import threading

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from kdjax import compile_cache
from kdjax import distill
from kdjax import memory
from kdjax import models
from kdjax import sharding
from kdjax import step as step_lib
from kdjax import sweep as sweep_lib
from kdjax import teacher as teacher_lib
from kdjax import teacher_table
from kdjax.data import source as source_lib
from kdjax.errors import ConfigError

# The initialisation runs once: on the CPU, LLVM's -O1 compiles it ~3x faster than the default -O2/-O3 (its
# threefry and erf_inv code is most of the setup of a CIFAR ResNet) and gives the same bits (tests/test_dispatch.py).
INIT_COMPILER_OPTIONS = {'cpu': {'xla_backend_optimization_level': 1}}
# The CPU's auto setting dispatches 4 steps at once from this many steps of training on: the extra compiles (the
# unrolled program, the single-step tail: 10-30 s for the CIFAR pairs of benchmarks/README.md) are repaid after
# roughly 400-1500 steps.
CPU_UNROLL_STEPS = 2000


def check_mesh(mesh, batch_size: int, num_students: int):
  n_data = sharding.data_size(mesh)
  if batch_size % n_data:
    over = f' (over {jax.process_count()} processes)' if jax.process_count() > 1 else ''
    raise ConfigError(f'batch_size {batch_size} is not divisible by the {n_data} devices of the data axis{over}')
  if num_students % mesh.shape['students']:
    raise ConfigError(f'{num_students} students do not split over the {mesh.shape["students"]} devices of the '
                      'students axis')


class Trainer:
  """The compiled programs of one run: its sweep's students, its batch source and its teachers on a mesh."""

  def __init__(self, cfg, source, mesh=None, teacher=None, teacher_vars=None, sweep=None):
    self.sweep = sweep if sweep is not None else sweep_lib.expand(cfg)
    self.cfg = cfg = self.sweep.base
    self.num_students = self.sweep.size
    self.source, ds = source, source.ds
    self.mesh = mesh if mesh is not None else sharding.make_mesh(cfg.num_devices, self.num_students,
                                                                 cfg.mesh_students, cfg.batch_size)
    check_mesh(self.mesh, cfg.batch_size, self.num_students)
    self.steps_per_epoch = len(ds.train) // cfg.batch_size
    if self.steps_per_epoch == 0:
      raise ConfigError(f'batch_size {cfg.batch_size} exceeds the {len(ds.train)} training examples')
    self.total_steps = cfg.epochs * self.steps_per_epoch
    self.replicated = sharding.replicated(self.mesh)
    self.students_sharded = sharding.students_sharded(self.mesh)
    students_loop = sweep_lib.students_loop(cfg)

    student = models.build_student(cfg, ds.num_classes)
    distiller = distill.Distiller(cfg.distill, student, teacher, len(teacher_lib.modules(teacher)) or 1)
    if source.streaming and distiller.views:
      raise ConfigError(f"the view(s) {', '.join(distiller.views)} of {', '.join(distiller.terms)} are made from "
                        "the device-resident training set; data.pipeline='stream' has none: use "
                        "data.pipeline='device'")
    if not distiller.needs_teacher:
      teacher = teacher_vars = None
    teacher_lib.check_ensemble(cfg, teacher, teacher_vars, ds.image_shape)
    self.teacher, self.teacher_vars = teacher, teacher_vars
    self.parts = step_lib.Parts(cfg=cfg, student=student, teacher=teacher, distiller=distiller,
                                data=step_lib.DataSpec.of(ds), batch_size=cfg.batch_size,
                                steps_per_epoch=self.steps_per_epoch, students_loop=students_loop,
                                batch_sharding=sharding.batch_sharded(self.mesh))
    self.k = min(cfg.steps_per_dispatch or self._auto_steps_per_dispatch(), self.steps_per_epoch)
    self.steps_loop = cfg.steps_loop
    if self.steps_loop == 'auto':
      self.steps_loop = 'unroll' if jax.default_backend() == 'cpu' else 'scan'
    if self.k > 1:
      logging.info('%d steps per dispatch (config.steps_per_dispatch = %d; auto: 4 on the CPU for one convolutional '
                   'student trained %d steps or more, up to 32 elsewhere), %s (config.steps_loop = %r; auto: '
                   'unroll on the CPU, where XLA runs a step inside a loop many times slower, benchmarks/README.md; '
                   'scan elsewhere)', self.k, cfg.steps_per_dispatch, CPU_UNROLL_STEPS,
                   'unrolled' if self.steps_loop == 'unroll' else 'in a rolled lax.scan', cfg.steps_loop)

    # Per-student randomness (initialisation, dropout) from each student's seed; the data's from the data seed.
    # Placed from host values (NumPy, the same on every process), as a mesh spanning many processes requires.
    seeds = np.asarray([s.cfg.seed for s in self.sweep.students])
    self.init_keys = jax.jit(jax.vmap(lambda s: step_lib.seed_key(s, 2)), out_shardings=self.replicated)(seeds)
    self.step_keys = jax.jit(jax.vmap(lambda s: step_lib.seed_key(s, 3)), out_shardings=self.students_sharded)(seeds)
    self.hparams = jax.device_put({k: np.asarray(v) for k, v in self.sweep.traced.items()}, self.students_sharded)
    self.teacher_table = self._teacher_table()

    self._compiled_chunk = None
    self._init_shapes = None  # the initial state's shapes, traced once
    self._compiled_init = None  # the initial state's executable, and the thread that compiles it early
    self._init_thread = self._init_error = None
    self._key_base = None  # the compiled-executable cache's key ingredients (`program_key`), computed once
    self._single_step = None  # unrolled K > 1: the epoch's last steps when fewer than K are left
    self._evaluate = jax.jit(functools.partial(step_lib.eval_scan, self.parts), out_shardings=self.replicated)

  @property
  def ds(self):
    return self.source.ds

  @property
  def student(self):
    return self.parts.student

  @property
  def distiller(self):
    return self.parts.distiller

  @property
  def init_steps(self) -> int:
    return self.parts.init_steps

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
      return 4 if long_run and self.num_students == 1 and models.convolutional(self.parts.student) else 1
    return max(d for d in range(1, 33) if self.steps_per_epoch % d == 0)

  def _teacher_table(self):
    layout = teacher_table.plan(self.parts, self.teacher_vars, self.sweep.traced, self.ds.augment,
                                self.source.streaming)
    if layout is None:
      return None
    self.parts = dataclasses.replace(self.parts, table=layout)
    return teacher_table.compute(self.parts, layout, self.teacher_vars,
                                 self.source.table_arrays(self.cfg.eval_batch_size))

  # ----------------------------------------------------------------------------------------------------- dispatch
  def _dispatch_fn(self, ts, teacher_vars, table, hparams, keys, arrays, epoch, start, taken=None,
                   k: int | None = None):
    """`k` (default `self.k`) steps from step `start` of `epoch`. In a rolled scan, steps past the epoch's end are
    skipped (one compilation); unrolled, the K steps are straight-line code and `train_chunk` never asks for steps
    past the end. Metrics are per student, [S], summed over the dispatch. `taken`: the streamed batches of the
    dispatch's steps ([K, B, ...]), or None on the device path."""
    k = self.k if k is None else k
    epoch_input = self.source.dispatch_input(taken, epoch)
    views = self.parts.distiller.views

    def step(ts, s):
      batch = self.source.batch(arrays, epoch_input, s - start, s, ts.step, views)
      return step_lib.train_step(self.parts, ts, teacher_vars, batch, hparams, keys, table)

    return run_steps(step, ts, start, k, self.steps_loop, self.steps_per_epoch)

  def _args(self, epoch, start, taken):
    return (self.teacher_vars, self.teacher_table, self.hparams, self.step_keys, self.source.arrays(),
            jnp.int32(epoch), jnp.int32(start), taken)

  def compile(self, ts) -> dict:
    """Compiles the train dispatch for `ts`'s shapes (abstract values are enough) before anything trains, and
    returns XLA's memory estimate per device (`memory.estimate`)."""
    shardings = self.state_shardings(ts)
    key = self.program_key('train_chunk')
    key = key and compile_cache.program_key(key, compile_cache.signature(ts))  # the state it is compiled for
    # The metrics come back replicated: every process (of a multi-host run too) reads them whole.
    lower = lambda name: jax.jit(compile_cache.named(self._dispatch_fn, name), donate_argnums=(0,),
                                 out_shardings=(shardings, self.replicated)).lower(
                                     ts, *self._args(0, 0, self.source.dispatch_spec(self.k))).compile()
    self._compiled_chunk = compile_cache.load_or_compile(key, self.mesh.devices.flat, lower)[0]
    return memory.estimate(self._compiled_chunk, memory.tree_bytes(ts) // self.mesh.shape['students'],
                           self.mesh.devices.size)

  def with_students(self, n: int) -> 'Trainer':
    """This trainer for its first `n` students only (a multiple of the students axis' devices), sharing the rest
    (the source, the teachers and their table, the mesh, K): the small program that `memory.estimate_before_compile`
    compiles to estimate the whole sweep's memory before the whole sweep's program is compiled."""
    sub = copy.copy(self)
    first = lambda tree: jax.tree.map(lambda a: a[:n], tree)
    sub.sweep = dataclasses.replace(self.sweep, students=self.sweep.students[:n], traced=first(self.sweep.traced))
    sub.num_students = n
    sub.init_keys = jax.jit(first, out_shardings=self.replicated)(self.init_keys)
    sub.step_keys = jax.jit(first, out_shardings=self.students_sharded)(self.step_keys)
    sub.hparams = jax.jit(first, out_shardings=self.students_sharded)(self.hparams)
    sub._compiled_chunk = sub._init_shapes = sub._compiled_init = sub._init_thread = sub._init_error = None
    sub._key_base = sub._single_step = None
    return sub

  def train_chunk(self, ts, epoch: int, start: int):
    """One dispatch from step `start` of `epoch` (compiled by `compile` first)."""
    if self.k > 1 and self.steps_loop == 'unroll' and start + self.k > self.steps_per_epoch:
      # The unrolled program has no mask: the steps left before the epoch's end run as single-step dispatches
      # (their own program, compiled when first needed), their metrics summed in the same order as the K steps'.
      if self._single_step is None:
        self._single_step = jax.jit(functools.partial(self._dispatch_fn, k=1), donate_argnums=(0,),
                                    out_shardings=(self.state_shardings(ts), self.replicated))
      sums = None
      for s in range(start, self.steps_per_epoch):
        ts, m = self._single_step(ts, *self._args(epoch, s, self.source.take(1)))
        sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
      return ts, sums
    # A rolled scan's steps past the epoch's end are masked: zeros stand in for their streamed batches.
    taken = self.source.take(min(self.k, self.steps_per_epoch - start), pad_to=self.k)
    if self._compiled_chunk is None:
      self.compile(self.init_state(abstract=True))
    return self._compiled_chunk(ts, *self._args(epoch, start, taken))

  def trace_train_step(self):
    """Traces one step, as a dispatch of one, on abstract values: a cheap check that a config builds and lowers."""
    return jax.eval_shape(functools.partial(self._dispatch_fn, k=1), self.init_state(abstract=True),
                          *self._args(0, 0, self.source.dispatch_spec(1)))

  # --------------------------------------------------------------------------------------------------------- init
  def _init_fn(self, init_keys, hparams, teacher_vars):
    return step_lib.init_state(self.parts, init_keys, hparams, teacher_vars)

  def state_shardings(self, abstract_state):
    return step_lib.TrainState(
        step=self.replicated, params=jax.tree.map(lambda _: self.students_sharded, abstract_state.params),
        state=jax.tree.map(lambda _: self.students_sharded, abstract_state.state),
        opt_state=jax.tree.map(lambda _: self.students_sharded, abstract_state.opt_state))

  def init_state(self, abstract: bool = False):
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
    def compile_fn(name):
      shardings = self.state_shardings(self.init_state(abstract=True))
      lowered = jax.jit(compile_cache.named(self._init_fn, name), out_shardings=shardings).lower(
          self.init_keys, self.hparams, self.teacher_vars)
      return lowered.compile(INIT_COMPILER_OPTIONS.get(jax.default_backend()))
    self._compiled_init = compile_cache.load_or_compile(self.program_key('init'), self.mesh.devices.flat,
                                                        compile_fn)[0]

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
    """The compiled-executable cache's key of this run's program `name` (kdjax/compile_cache.py), computed without
    tracing from everything that can change the program; None when that cache is off."""
    if compile_cache.executables_dir() is None or any(
        isinstance(v, jax.ShapeDtypeStruct) for v in jax.tree.leaves(self.teacher_vars)):  # an abstract teacher
      return None  # (tracing a config, kdjax/validate.py): nothing will run
    if self._key_base is None:
      ds, teachers, parts = self.ds, teacher_lib.modules(self.teacher), self.parts
      self._key_base = {
          'trainer': f'{type(self).__module__}.{type(self).__qualname__}',
          'students': [compile_cache.config_ingredient(s.cfg) for s in self.sweep.students],
          'sweep': self.sweep.to_json(), 'traced': compile_cache.signature(self.hparams),
          'data': {'name': ds.name, 'classes': ds.num_classes, 'mean': ds.mean, 'std': ds.std, 'augment': ds.augment,
                   'omitted': ds.omitted, 'image_shape': ds.image_shape,
                   'sizes': [len(x) if x is not None else None for x in (ds.train, ds.val, ds.test)],
                   **self.source.key_ingredients(),
                   'arrays': compile_cache.signature(self.source.arrays()),
                   'batches': compile_cache.signature(self.source.dispatch_spec(self.k))},
          'mesh': [self.mesh.axis_names, self.mesh.devices.shape, [d.id for d in self.mesh.devices.flat]],
          'modules': [compile_cache.describe(m) for m in (parts.student,) + teachers],
          'teacher_variables': compile_cache.signature(self.teacher_vars),
          'teacher_table': compile_cache.signature(self.teacher_table),
          'resolved': [self.k, self.steps_loop, parts.students_loop, str(jnp.dtype(parts.dtype))],
          'init_options': INIT_COMPILER_OPTIONS.get(jax.default_backend()),
          'source': compile_cache.source_digest(self, parts.student, *teachers, functions=[
              f for _, m in parts.distiller.terms.values() for f in (m.loss, m.module, m.check) if f is not None])}
    return compile_cache.program_key(name, self._key_base)

  # ------------------------------------------------------------------------------------------------------- eval
  def evaluate(self, ts) -> list[dict]:
    """Per student: {split}_loss, {split}_accuracy, {split}_top5, {split}_count, per-class accuracy and, with a
    teacher, {split}_agreement, {split}_top5_agreement and {split}_teacher_kl (`step.teacher_agreement`), for val
    (if any) and test; a student with a distillation token adds {split}_cls_head_accuracy and
    {split}_dist_head_accuracy; omitted-class runs add {split}_omitted_accuracy and the bias-adjusted
    {split}_*_adjusted."""
    out = [{} for _ in range(self.num_students)]
    for name, batches in self.source.eval_batches():
      sums = None
      for arrays in batches:  # the whole split at once on the device path; streamed, one batch at a time
        new = jax.device_get(self._evaluate(ts, self.teacher_vars, arrays, self.hparams))
        sums = new if sums is None else jax.tree.map(np.add, sums, new)
      for i, o in enumerate(out):
        o.update(eval_record(name, jax.tree.map(lambda a: np.asarray(a)[i], sums), self.ds.omitted))
    return out


def eval_record(name: str, s: dict, omitted: int = -1) -> dict:
  """One student's evaluation sums over a split (`step.eval_step`'s) as its record's fields."""
  n = float(s['count'])
  o = {f'{name}_loss': float(s['loss']) / n, f'{name}_accuracy': float(s['top1']) / n,
       f'{name}_top5': float(s['top5']) / n, f'{name}_count': int(n),
       f'{name}_class_accuracy': (s['class_correct'] / np.maximum(s['class_count'], 1)).tolist()}
  if 'agree' in s:  # with a teacher (step.teacher_agreement)
    o.update({f'{name}_agreement': float(s['agree']) / n, f'{name}_top5_agreement': float(s['agree5']) / n,
              f'{name}_teacher_kl': float(s['kl']) / n})
  if 'top1_cls' in s:  # a distillation token: each head alone ({name}_accuracy is their average)
    o.update({f'{name}_cls_head_accuracy': float(s['top1_cls']) / n,
              f'{name}_dist_head_accuracy': float(s['top1_dist']) / n})
  if omitted >= 0:
    o[f'{name}_omitted_accuracy'] = float(s['class_correct'][omitted] / max(s['class_count'][omitted], 1))
    if 'top1_adj' in s:
      o[f'{name}_accuracy_adjusted'] = float(s['top1_adj']) / n
      o[f'{name}_omitted_accuracy_adjusted'] = float(s['class_correct_adj'][omitted] /
                                                     max(s['class_count'][omitted], 1))
  return o


def run_steps(step, ts, start, k: int, loop: str, steps_per_epoch: int):
  """`k` applications of `step(ts, s) -> (ts, metrics)` for s = start, start + 1, ...: one call (k = 1), unrolled
  straight-line code, or a rolled `lax.scan` that skips the steps past the epoch's end. Returns (ts, the metrics
  summed over the steps, float32, with 'steps' counting them)."""
  as_sums = lambda m: dict(jax.tree.map(lambda a: a.astype(jnp.float32), m), steps=jnp.float32(1))
  if k == 1:  # no loop and no mask: `start` is always inside the epoch
    ts, m = step(ts, start)
    return ts, as_sums(m)
  if loop == 'unroll':  # straight-line code, no loop and no mask: see `Trainer.train_chunk`
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

    return jax.lax.cond(s < steps_per_epoch, run, lambda c: c, carry), None

  (ts, sums), _ = jax.lax.scan(body, (ts, zeros), jnp.arange(k))
  return ts, sums


def build(cfg, ds, mesh=None, teacher=None, teacher_vars=None, sweep=None) -> Trainer:
  """A Trainer over dataset `ds` with the batch source it needs (kdjax/data/source.py)."""
  sweep = sweep if sweep is not None else sweep_lib.expand(cfg)
  base = sweep.base
  mesh = mesh if mesh is not None else sharding.make_mesh(base.num_devices, sweep.size, base.mesh_students,
                                                          base.batch_size)
  check_mesh(mesh, base.batch_size, sweep.size)
  data_seed = base.seed if base.data.seed < 0 else base.data.seed
  return Trainer(cfg, source_lib.open_source(base, ds, mesh, data_seed), mesh, teacher, teacher_vars, sweep)
