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
import math
import os
import threading

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from kdjax import compile_cache
from kdjax import distill
from kdjax import memory
from kdjax import models
from kdjax import replay
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


@dataclasses.dataclass
class GroupProgram:
  """One group of a program's students (kdjax/sweep.py `Group`; a run without program axes has one): its step's
  static parts, its swept numbers, its keys and its length in steps."""
  group: sweep_lib.Group
  parts: step_lib.Parts
  hparams: dict
  init_keys: object
  step_keys: object
  total_steps: int

  @property
  def size(self) -> int:
    return self.group.size


def mesh_students(sweep) -> int:
  """The student count the mesh's students axis must divide: every group's."""
  return math.gcd(*(g.size for g in sweep.parts()))


class Trainer:
  """The compiled programs of one run: its sweep's students, its batch source and its teachers on a mesh. A sweep
  with program axes (a table) has several groups of students, each with its own step parts (student network,
  methods), trained in the one program on the same batches and the same teachers' pass."""

  def __init__(self, cfg, source, mesh=None, teacher=None, teacher_vars=None, sweep=None):
    self.sweep = sweep if sweep is not None else sweep_lib.expand(cfg)
    self.cfg = cfg = self.sweep.base
    self.num_students = self.sweep.size
    self.source, ds = source, source.ds
    groups = self.sweep.parts()
    self.mesh = mesh if mesh is not None else sharding.make_mesh(cfg.num_devices, mesh_students(self.sweep),
                                                                 cfg.mesh_students, cfg.batch_size)
    for g in groups:
      check_mesh(self.mesh, cfg.batch_size, g.size)
    self.steps_per_epoch = len(ds.train) // cfg.batch_size
    if self.steps_per_epoch == 0:
      raise ConfigError(f'batch_size {cfg.batch_size} exceeds the {len(ds.train)} training examples')
    self.total_steps = cfg.epochs * self.steps_per_epoch
    self.replicated = sharding.replicated(self.mesh)
    self.students_sharded = sharding.students_sharded(self.mesh)
    students_loop = sweep_lib.students_loop(cfg)

    distillers = []
    for g in groups:
      g_cfg = g.sweep.base
      student = models.build_student(g_cfg, ds.num_classes)
      distiller = distill.Distiller(g_cfg.distill, student, teacher, len(teacher_lib.modules(teacher)) or 1)
      if source.streaming and distiller.views:
        raise ConfigError(f"the view(s) {', '.join(distiller.views)} of {', '.join(distiller.terms)} are made from "
                          "the device-resident training set; data.pipeline='stream' has none: use "
                          "data.pipeline='device'")
      if len(groups) > 1 and g_cfg.student.init_checkpoint:
        raise ConfigError(f'{g.name}: student.init_checkpoint starts every student from one checkpoint; a program '
                          'of several groups (method= / student.model= axes) cannot take one')
      if len(groups) > 1 and g_cfg.distill.extras_checkpoint:
        raise ConfigError(f'{g.name}: distill.extras_checkpoint starts every student\'s extra modules from one '
                          'checkpoint; a program of several groups (method= / student.model= axes) cannot take one')
      distillers.append((student, distiller))
    if not any(d.needs_teacher for _, d in distillers):
      teacher = teacher_vars = None
    teacher_lib.check_ensemble(cfg, teacher, teacher_vars, ds.image_shape)
    self.teacher, self.teacher_vars = teacher, teacher_vars
    all_parts = [step_lib.Parts(cfg=g.sweep.base, student=student, teacher=teacher, distiller=distiller,
                                data=step_lib.DataSpec.of(ds), batch_size=cfg.batch_size,
                                steps_per_epoch=self.steps_per_epoch, students_loop=students_loop,
                                batch_sharding=sharding.batch_sharded(self.mesh))
                 for g, (student, distiller) in zip(groups, distillers)]
    # The replay store is checked (and read) before anything compiles.
    self.store = self._open_store([(p, g.sweep.traced) for p, g in zip(all_parts, groups)])
    self.programs = []
    for g, parts in zip(groups, all_parts):
      # Per-student randomness (initialisation, dropout) from each student's seed; the data's from the data seed.
      # Placed from host values (NumPy, the same on every process), as a mesh spanning many processes requires.
      seeds = np.asarray([s.cfg.seed for s in g.sweep.students])
      init_keys = jax.jit(jax.vmap(lambda s: step_lib.seed_key(s, 2)), out_shardings=self.replicated)(seeds)
      step_keys = jax.jit(jax.vmap(lambda s: step_lib.seed_key(s, 3)), out_shardings=self.students_sharded)(seeds)
      hparams = jax.device_put({k: np.asarray(v) for k, v in g.sweep.traced.items()}, self.students_sharded)
      self.programs.append(GroupProgram(g, parts, hparams, init_keys, step_keys,
                                        g.sweep.base.epochs * self.steps_per_epoch))
    self.grouped = len(self.programs) > 1
    self._bind()
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
    self.teacher_table = self._teacher_table()

    self._compiled_chunk = None
    self._init_shapes = None  # the initial state's shapes, traced once
    self._compiled_init = None  # the initial state's executable, and the thread that compiles it early
    self._init_thread = self._init_error = None
    self._key_base = None  # the compiled-executable cache's key ingredients (`program_key`), computed once
    self._single_step = None  # unrolled K > 1: the epoch's last steps when fewer than K are left
    self._evaluate = [jax.jit(functools.partial(step_lib.eval_scan, p.parts), out_shardings=self.replicated)
                      for p in self.programs]

  def _bind(self):
    """The attributes the step's arguments are read from: group 0's alone (a run without program axes, whose
    arguments are those of a single group), or a tuple over the groups."""
    first = self.programs[0]
    self.parts = first.parts
    if self.grouped:
      self.hparams = tuple(p.hparams for p in self.programs)
      self.init_keys = tuple(p.init_keys for p in self.programs)
      self.step_keys = tuple(p.step_keys for p in self.programs)
    else:
      self.hparams, self.init_keys, self.step_keys = first.hparams, first.init_keys, first.step_keys

  # ------------------------------------------------------------------------------------------------- groups
  def locate(self, i: int) -> tuple[int, int]:
    """(group, index inside it) of student `i` of the program."""
    for g, p in enumerate(self.programs):
      if p.group.offset <= i < p.group.offset + p.size:
        return g, i - p.group.offset
    raise IndexError(i)

  def student_state(self, ts, i: int) -> step_lib.TrainState:
    """Student `i`'s own train state, without the students axis."""
    if not self.grouped:
      return step_lib.student(ts, i)
    g, j = self.locate(i)
    return step_lib.student(ts.groups[g], j)

  def for_group(self, g: int) -> 'Trainer':
    """This trainer as group `g`'s alone would read (its config, parts and numbers): for what reads one group
    (exports)."""
    if not self.grouped:
      return self
    sub = copy.copy(self)
    p = self.programs[g]
    sub.cfg, sub.parts, sub.hparams = p.group.sweep.base, p.parts, p.hparams
    sub.init_keys, sub.step_keys, sub.grouped = p.init_keys, p.step_keys, False
    return sub

  def terms(self, i: int) -> tuple:
    """The loss terms of student `i`'s method."""
    return tuple(self.programs[self.locate(i)[0]].parts.distiller.terms)

  def active(self, i: int, step: int) -> bool:
    """Whether student `i` still trains at `step` (a group with fewer epochs than the program's longest stops at
    its own end: its state is kept from then on)."""
    return step <= self.programs[self.locate(i)[0]].total_steps

  def ends_at(self, step: int) -> bool:
    """Whether a group of a table ends at `step` before the program does (it is evaluated then, at its last
    epoch)."""
    return self.grouped and any(p.total_steps == step for p in self.programs)

  def param_count(self, abstract, i: int = 0) -> int:
    """Student `i`'s network's parameter count."""
    g, _ = self.locate(i)
    ts = abstract.groups[g] if self.grouped else abstract
    return sum(x.size for x in jax.tree.leaves(ts.params['student'])) // self.programs[g].size

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

  def _open_store(self, programs):
    """(replay.StoreLayout, the store's host arrays) of `distill.teacher_store`, checked against this run; None
    without one (or without a teacher)."""
    path = self.cfg.distill.teacher_store
    if not path or self.teacher is None:
      return None
    replay.check_config(self.cfg, self.source.streaming)
    x = jnp.zeros((self.cfg.batch_size,) + teacher_lib.input_shape(self.cfg, self.ds.image_shape),
                  models.compute_dtype(self.cfg))
    t_shapes = jax.eval_shape(lambda v: self.teacher.apply(v, x, train=False), self.teacher_vars)
    replay.check_methods(programs, self.teacher_vars, t_shapes)
    if any(isinstance(v, jax.ShapeDtypeStruct) for v in jax.tree.leaves(self.teacher_vars)):
      return None  # an abstract teacher (tracing a config): nothing runs, the store is not read
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(os.path.join(path, 'meta.json')) and jax.process_count() == 1:
      logging.info('teacher replay store %s does not exist: made now, the teacher once over %d epochs', path,
                   self.cfg.epochs)
      replay.make(self.cfg, self.ds, self.mesh, self.teacher, self.teacher_vars, path)
    arrays = replay.load(path, replay.key(self.cfg, self.ds, self.teacher_vars), self.total_steps,
                         self.steps_per_epoch)
    leaves, treedef = jax.tree.flatten(t_shapes)
    return replay.StoreLayout(treedef, tuple(leaves), replay.logits_leaf(t_shapes)), arrays

  def _read_teacher_from(self, layout):
    """Every group's step reads the teachers' outputs through `layout` (a teacher_table.Layout or a
    replay.StoreLayout) instead of running them."""
    for p in self.programs:
      p.parts = dataclasses.replace(p.parts, table=layout)
    self._bind()

  def _teacher_table(self):
    """The cached teachers' outputs (kdjax/teacher_table.py): the union of what every group's losses read; or the
    replay store's rows (kdjax/replay.py) when there is one."""
    if self.store is not None:
      layout, arrays = self.store
      if replay.streams(self.cfg, arrays):
        layout = dataclasses.replace(layout, rows=self.k)
        self.store = (layout, arrays)
        logging.info('teacher replay store: %.1f MB of rows for the run, sent %d steps\' rows per dispatch '
                     '(distill.store_stream = %r)', sum(a.nbytes for a in arrays.values()) / 1e6, self.k,
                     self.cfg.distill.store_stream)
      self._read_teacher_from(layout)
      if layout.rows:
        return jax.device_put(replay.dispatch_rows(arrays, 0, layout.rows), self.replicated)
      return jax.device_put({k: np.asarray(a) for k, a in arrays.items()}, self.replicated)
    layouts = [teacher_table.plan(p.parts, self.teacher_vars, p.group.sweep.traced, self.ds.augment,
                                  self.source.streaming) for p in self.programs]
    if any(layout is None for layout in layouts):
      return None
    layout = dataclasses.replace(layouts[0], read=tuple(map(any, zip(*(l.read for l in layouts)))))
    self._read_teacher_from(layout)
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
    views = tuple(sorted({v for p in self.programs for v in p.parts.distiller.views}))

    def step(ts, s):
      batch = self.source.batch(arrays, epoch_input, s - start, s, ts.step, views)
      if not self.grouped:
        return step_lib.train_step(self.parts, ts, teacher_vars, batch, hparams, keys, table)
      return self._table_step(ts, teacher_vars, batch, hparams, keys, table)

    return run_steps(step, ts, start, k, self.steps_loop, self.steps_per_epoch)

  def _table_step(self, ts, teacher_vars, batch, hparams, keys, table):
    """One step of every group on one batch: the teachers run once (`step.batch_teacher_outputs`) and every group's
    step reads what its methods need; a group past its own length keeps its state. Metrics [S] over the program's
    students (a term that a group's method lacks reads 0 for its students)."""
    x, targets, t_out, views = step_lib.batch_teacher_outputs(self.parts, teacher_vars, batch, ts.step, table)
    states, metrics = [], []
    for p, g_ts, hp, key in zip(self.programs, ts.groups, hparams, keys):
      own = {v: views[v] for v in p.parts.distiller.views}
      g_batch = dict(batch, views={v: batch['views'][v] for v in own})
      new, m = step_lib.train_step(p.parts, g_ts, teacher_vars, g_batch, hp, key, table, (x, targets, t_out, own))
      if p.total_steps < self.total_steps:
        on = g_ts.step < p.total_steps
        keep = lambda a, b: jax.tree.map(lambda u, v: jnp.where(on, u, v), a, b)
        new = new.replace(params=keep(new.params, g_ts.params), state=keep(new.state, g_ts.state),
                          opt_state=keep(new.opt_state, g_ts.opt_state))
        m = dict(m, nonfinite=m['nonfinite'] * on, grad_nonfinite=m['grad_nonfinite'] * on)
      states.append(new)
      metrics.append(m)
    keys_all = list(dict.fromkeys(k for m in metrics for k in m))
    merged = {k: jnp.concatenate([m[k] if k in m else jnp.zeros((p.size,), jnp.float32)
                                  for m, p in zip(metrics, self.programs)]) for k in keys_all}
    return step_lib.TableState(tuple(states)), merged

  def _args(self, epoch, start, taken):
    table = self.teacher_table
    if self.store is not None and self.store[0].rows:  # a streamed store: this dispatch's rows
      layout, arrays = self.store
      table = jax.device_put(replay.dispatch_rows(arrays, epoch * self.steps_per_epoch + start, layout.rows),
                             self.replicated)
    return (self.teacher_vars, table, self.hparams, self.step_keys, self.source.arrays(),
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
                           self.mesh.devices.size, self.cfg.get('memory_budget_gb', 0.0))

  def with_students(self, n: int) -> 'Trainer':  # (a program of one group only: memory.estimate_before_compile)
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
    if self.grouped:
      return step_lib.TableState(tuple(step_lib.init_state(p.parts, k, hp, teacher_vars)
                                       for p, k, hp in zip(self.programs, init_keys, hparams)))
    return step_lib.init_state(self.parts, init_keys, hparams, teacher_vars)

  def state_shardings(self, abstract_state):
    if isinstance(abstract_state, step_lib.TableState):
      return step_lib.TableState(tuple(self.state_shardings(g) for g in abstract_state.groups))
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
          'modules': [compile_cache.describe(m) for m in tuple(p.parts.student for p in self.programs) + teachers],
          'teacher_variables': compile_cache.signature(self.teacher_vars),
          'teacher_table': compile_cache.signature(self.teacher_table),
          'resolved': [self.k, self.steps_loop, parts.students_loop, str(jnp.dtype(parts.dtype))],
          'init_options': INIT_COMPILER_OPTIONS.get(jax.default_backend()),
          'source': compile_cache.source_digest(self, parts.student, *teachers, functions=[
              f for p in self.programs for _, m in p.parts.distiller.terms.values()
              for f in (m.loss, m.module, m.check) if f is not None])}
    return compile_cache.program_key(name, self._key_base)

  # ------------------------------------------------------------------------------------------------------- eval
  def evaluate(self, ts) -> list[dict]:
    """Per student: {split}_loss, {split}_accuracy, {split}_top5, {split}_count, per-class accuracy and, with a
    teacher, {split}_agreement, {split}_top5_agreement and {split}_teacher_kl (`step.teacher_agreement`), for val
    (if any) and test; a student with a distillation token adds {split}_cls_head_accuracy and
    {split}_dist_head_accuracy; omitted-class runs add {split}_omitted_accuracy and the bias-adjusted
    {split}_*_adjusted."""
    out = [{} for _ in range(self.num_students)]
    states = ts.groups if self.grouped else (ts,)
    for name, batches in self.source.eval_batches():
      sums = [None] * len(self.programs)
      for arrays in batches:  # the whole split at once on the device path; streamed, one batch at a time
        for g, (p, evaluate, g_ts) in enumerate(zip(self.programs, self._evaluate, states)):
          new = jax.device_get(evaluate(g_ts, self.teacher_vars, arrays, p.hparams))
          sums[g] = new if sums[g] is None else jax.tree.map(np.add, sums[g], new)
      for p, g_sums in zip(self.programs, sums):
        for j in range(p.size):
          out[p.group.offset + j].update(eval_record(name, jax.tree.map(lambda a: np.asarray(a)[j], g_sums),
                                                     self.ds.omitted))
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
  mesh = mesh if mesh is not None else sharding.make_mesh(base.num_devices, mesh_students(sweep),
                                                          base.mesh_students, base.batch_size)
  for g in sweep.parts():
    check_mesh(mesh, base.batch_size, g.size)
  data_seed = base.seed if base.data.seed < 0 else base.data.seed
  return Trainer(cfg, source_lib.open_source(base, ds, mesh, data_seed), mesh, teacher, teacher_vars, sweep)


def applicable(sweep, ds):
  """`sweep` with every group's methods checked against its pair (`distill.check_pair`, on the networks' output
  shapes: nothing is computed or compiled): a group whose method cannot apply is refused in one line naming the
  method and the models, or, with `config.sweep_skip_inapplicable`, left out with one warning line (the table shows
  it as n/a)."""
  if not sweep.groups:
    return sweep
  drop = {}
  for g in sweep.groups:
    cfg = g.sweep.base
    student = models.build_student(cfg, ds.num_classes)
    teacher = models.build_teacher(cfg, ds.num_classes) if cfg.teacher.model else None
    x = jnp.zeros((cfg.batch_size,) + tuple(ds.image_shape), models.compute_dtype(cfg))
    shapes = lambda m: jax.eval_shape(lambda: m.apply(m.init(jax.random.key(0), x), x))
    s_shapes, t_shapes = shapes(student), (shapes(teacher) if teacher is not None else None)
    info = distill.DataInfo(len(ds.train), ds.num_classes, student, teacher, cfg.student.model, cfg.teacher.model)
    try:
      distill.Distiller(cfg.distill, student, teacher).build_extras(s_shapes, t_shapes, info)
    except ConfigError as e:
      if not cfg.sweep_skip_inapplicable:
        raise ConfigError(f'config.sweep: {g.name}: {e} (or set config.sweep_skip_inapplicable=true to leave it '
                          'out)') from None
      logging.warning('config.sweep: %s left out (n/a in the table): %s', g.name, e)
      drop[g.index] = str(e)
  return sweep_lib.without(sweep, drop) if drop else sweep
