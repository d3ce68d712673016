"""The run loop, in three phases: setup (the workdir's records, the data, the teachers, trained first when needed,
the compiled step: `kdjax.trainer`, the state restored or new), the epochs (dispatches, evaluation, checkpoints,
per-student records, SIGTERM), and the finish (summary, results.csv, tables and figures: `kdjax.results`).

Module graph (no cycles): train -> trainer, teacher, results; trainer -> step, teacher_table, replay, data.source;
step -> distill, models, teacher. A teacher that must be trained first is trained by this same loop, as a run of
its own (`teacher.prepare` is handed `train_and_evaluate`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import signal
import time

from absl import logging
import jax
import ml_collections
import numpy as np

from kdjax import atomic
from kdjax import checkpoint as ckpt_lib
from kdjax import compile_cache
from kdjax import config_lib
from kdjax import data as data_lib
from kdjax import distributed as dist
from kdjax import extras_init
from kdjax import memory
from kdjax import replay
from kdjax import reporting
from kdjax import results
from kdjax import sharding
from kdjax import step as step_lib
from kdjax import sweep as sweep_lib
from kdjax import table_split
from kdjax import teacher as teacher_lib
from kdjax import trainer as trainer_lib
from kdjax import validate
from kdjax.data import stream as stream_data
from kdjax.errors import CheckpointMismatchError, ConfigError, KDError, NonFiniteError, Preempted, WorkdirInUse

def _meta(cfg, trainer: trainer_lib.Trainer, step: int, complete: bool) -> dict:
  ds = trainer.ds
  return {'model': cfg.student.model, 'model_kwargs': config_lib.as_dict(cfg.student.kwargs),
          'num_classes': ds.num_classes, 'subclasses': cfg.student.subclasses, 'dataset': ds.name,
          'image_shape': list(ds.image_shape), 'step': int(step), 'epoch': int(step) // trainer.steps_per_epoch,
          'total_steps': trainer.total_steps, 'complete': bool(complete), 'students': trainer.num_students}


def write_config(cfg, workdir: str, sweep: sweep_lib.Sweep | None = None):
  os.makedirs(workdir, exist_ok=True)
  with atomic.writing(os.path.join(workdir, 'config.json')) as f:
    f.write(cfg.to_json_best_effort(indent=2, sort_keys=True))
  if sweep is not None:
    with atomic.writing(os.path.join(workdir, 'sweep.json')) as f:
      json.dump(sweep.to_json(), f, indent=2)


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds `workdir/kdjax.lock` for the run: a second live process on the same workdir is refused with the holder's
  pid. The kernel releases the lock of a killed process, so a stale lock file is simply taken over. A run refused
  before it wrote anything (bad data, a bad teacher) leaves no workdir behind when it made it."""
  created = not os.path.exists(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    f = open(os.path.join(workdir, 'kdjax.lock'), 'a+')
  except OSError as e:
    raise ConfigError(f'workdir {workdir} cannot be created or written: {e.strerror}') from None
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.seek(0)
    pid = f.read().strip() or 'unknown'
    f.close()
    raise WorkdirInUse(f'workdir {workdir} is in use by process {pid} (lock {f.name}); wait for it to finish or '
                       'choose another --workdir') from None
  f.seek(0)
  f.truncate()
  f.write(str(os.getpid()))
  f.flush()
  try:
    yield
  except KDError:
    if created and os.listdir(workdir) == ['kdjax.lock']:
      os.remove(f.name)
      os.rmdir(workdir)
    raise
  finally:
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str, restart: bool = False) -> dict:
  """Trains every student of `cfg`'s sweep (one for a single run), distilling from `cfg.teacher` when the losses
  need one; returns the run summary (per student under 'students'; a single run's also at the top level)."""
  return run(cfg, workdir, restart).summary


def run(cfg: ml_collections.ConfigDict, workdir: str, restart: bool = False) -> Outcome:
  """`train_and_evaluate`, returning also the final train state and the trainer (tests, notebooks)."""
  reporting.quiet_library_logs()
  compile_cache.enable(cfg.compilation_cache)  # before anything compiles
  if not workdir:
    raise ConfigError('--workdir is empty: name the directory for checkpoints, logs and metrics')
  workdir = os.path.abspath(os.path.expanduser(workdir))
  sweep = sweep_lib.expand(cfg)  # refuses a bad sweep, and then any bad field, before anything is written
  for student in sweep.students:
    validate.check(student.cfg)
  # On many hosts only process 0 holds the lock: the processes of one run share the workdir.
  with workdir_lock(workdir) if dist.is_primary() else contextlib.nullcontext():
    return _train(cfg, sweep, workdir, restart)


# Fields a resumed run may change: how long it trains, how often it evaluates, checkpoints and logs, and where it
# runs. Every other field changes the computation, and a resume with it changed is refused.
RESUMABLE_CHANGES = ('epochs', 'eval_every_epochs', 'checkpoint_every_epochs', 'keep_checkpoints', 'tensorboard',
                     'figures', 'eval_batch_size', 'steps_per_dispatch', 'num_devices', 'mesh_students',
                     'students_loop', 'data.data_dir', 'data.dir', 'data.cache_dir', 'teacher.cache_dir',
                     'compilation_cache', 'steps_loop', 'data.workers', 'data.prefetch', 'memory_budget_gb')


def check_resume(cfg, workdir: str):
  """A workdir that holds checkpoints resumes only the run that wrote them: the saved config.json and `cfg` may
  differ in RESUMABLE_CHANGES alone (logged); anything else is refused, naming each field with both values."""
  saved_path, root = os.path.join(workdir, 'config.json'), ckpt_lib.directory(workdir)
  if not os.path.isdir(root):
    return
  if not os.path.isfile(saved_path):
    # Saved steps ('<step>', or an Orbax temporary '<step>.orbax-checkpoint-tmp-...') with nothing to check them by.
    if any(n[:1].isdigit() for n in os.listdir(root)):
      raise ConfigError(f'{workdir} holds checkpoints but no config.json, so this config cannot be checked against '
                        'the run that wrote them; put that run\'s config.json back, choose another --workdir, or '
                        'pass --restart to set that run aside and start anew')
    return
  try:
    with open(saved_path) as f:
      saved = json.load(f)
    if not isinstance(saved, dict):
      raise ValueError(f'a JSON {type(saved).__name__}, not an object')
  except (OSError, ValueError) as e:  # ValueError: JSON and UTF-8 decoding errors too
    raise ConfigError(f'{saved_path} cannot be read ({(str(e).strip().splitlines() or [type(e).__name__])[0]}), so '
                      'this config cannot be checked against the run in that workdir; repair it, choose another '
                      '--workdir, or pass --restart to set that run aside and start anew') from None
  saved = sweep_lib.flatten(saved)
  new = sweep_lib.flatten(json.loads(cfg.to_json_best_effort()))
  # A field the saved run did not know (added to kdjax since) counts as unchanged while it holds its default.
  defaults = sweep_lib.flatten(json.loads(config_lib.base().to_json_best_effort()))
  changed = sorted(k for k in set(saved) | set(new) if saved.get(k) != new.get(k)
                   and not (k not in saved and k in defaults and new.get(k) == defaults[k]))
  allowed = [k for k in changed if k in RESUMABLE_CHANGES]
  refused = [k for k in changed if k not in RESUMABLE_CHANGES]
  if refused:
    fields = '; '.join(f'{k}: {saved.get(k)!r} -> {new.get(k)!r}' for k in refused)
    raise ConfigError(f'{workdir} holds a run with another config ({fields}); resume it with its own config, '
                      'choose another --workdir, or pass --restart to set that run aside and start anew')
  for k in allowed:
    logging.info('resuming with config.%s changed: %r -> %r', k, saved.get(k), new.get(k))


def set_aside(workdir: str) -> str | None:
  """Moves a previous run's files into `workdir/previous-<time>` (nothing is deleted); returns that folder."""
  names = [n for n in os.listdir(workdir) if n != 'kdjax.lock' and not n.startswith('previous-')]
  if not names:
    return None
  dest = os.path.join(workdir, time.strftime('previous-%Y%m%d-%H%M%S'))
  os.makedirs(dest)
  for n in names:
    os.rename(os.path.join(workdir, n), os.path.join(dest, n))
  logging.info('--restart: the previous run in %s is set aside in %s', workdir, dest)
  return dest


class Preemption:
  """SIGTERM while training: the handler only records the signal; the loop stops after the dispatch in flight,
  saves the step it reached and exits 143. On many hosts the processes agree at every dispatch on whether any of
  them got one (`dist.agree_signal`), so that all stop after the same step."""

  def __init__(self):
    self.received = None  # the signal this process got
    self.agreed = None    # the one every process stops for (many hosts)
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.received = signum

  def check(self) -> int | None:
    """The signal that stops the run, agreed across processes (one tiny collective on many hosts)."""
    if dist.multi():
      self.agreed = dist.agree_signal(self.received)
    return self.signal

  @property
  def signal(self) -> int | None:
    return self.agreed if dist.multi() else self.received

  def error(self, step: int) -> Preempted:
    return Preempted(f'stopped by signal {self.signal} at step {step}; the checkpoint is saved, rerun the same '
                     'command to resume')

  def close(self):
    signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class Outcome:
  """What `run` returns: the run summary (as summary.json), the final train state and the trainer that made it.
  Reads like the summary: `outcome['test_accuracy']`."""
  summary: dict
  state: step_lib.TrainState | None
  trainer: trainer_lib.Trainer | None
  programs: list | None = None  # a split table's: each program's Outcome (then no state or trainer of its own)

  def student_state(self, i: int) -> step_lib.TrainState:
    """Student `i`'s own train state (numbered as in the whole table when split)."""
    if not self.programs:
      return self.trainer.student_state(self.state, i)
    for program, out in zip(self.summary['programs'], self.programs):
      if i in program['students']:
        return out.trainer.student_state(out.state, program['students'].index(i))
    raise IndexError(i)

  def __getitem__(self, key):
    return self.summary[key]

  def __contains__(self, key):
    return key in self.summary

  def get(self, key, default=None):
    return self.summary.get(key, default)


@dataclasses.dataclass
class _Run:
  """A run between its phases: what `_setup` made, what the epochs advance, what `_finish` reads."""
  workdir: str
  sweep: sweep_lib.Sweep
  trainer: trainer_lib.Trainer
  ckpt: ckpt_lib.Checkpointer
  reporter: reporting.Reporter
  preemption: Preemption
  state: step_lib.TrainState
  select: str               # the split that chooses the best checkpoint: 'val' when there is one, else 'test'
  t_start: float
  partial: dict | None = None  # the train metrics' sums of an epoch that a preemption cut
  diverged: dict = dataclasses.field(default_factory=dict)  # student -> the step of its first non-finite update
  last_eval: list = dataclasses.field(default_factory=list)

  def close(self):
    self.preemption.close()
    self.trainer.source.close()
    self.reporter.close()
    self.ckpt.close()


def _train(cfg, sweep: sweep_lib.Sweep, workdir: str, restart: bool = False, may_split: bool = True) -> Outcome:
  plan = table_split.load(workdir) if may_split and not restart else None
  if plan is not None:  # a split table resumed: its saved plan
    return _train_split(cfg, sweep, workdir, plan)
  try:
    r = _setup(cfg, sweep, workdir, restart, may_split)
  except table_split.Split as split:
    if dist.is_primary():
      write_config(cfg, workdir, split.sweep)
      table_split.save(workdir, split.plan)
    dist.barrier('kdjax-split-saved')
    return _train_split(cfg, sweep, workdir, split.plan)
  try:
    _epochs(r)
    return _finish(r)
  finally:
    r.close()


def _train_split(cfg, sweep: sweep_lib.Sweep, workdir: str, plan: dict) -> Outcome:
  """A table split by `table_split.plan`: its programs trained one after another, each a run of its own in
  `programs/<p>/` (resumed where it stopped, a finished one restored and not trained again); the workdir's
  records, summary and results gathered from them."""
  t_start = time.time()
  logging.info('%s', table_split.describe(plan))
  outcomes = []
  for p, program in enumerate(plan['programs']):
    logging.info('program %d of %d: %s', p + 1, len(plan['programs']), ', '.join(program['groups']))
    try:
      outcomes.append(_train(cfg, sweep_lib.subset(sweep, program['groups']), table_split.program_dir(workdir, p),
                             may_split=False))
    finally:
      if dist.is_primary():
        table_split.gather(workdir, plan)
  students = []
  for program, out in zip(plan['programs'], outcomes):
    students += [dict(s, index=program['students'][s['index']]) for s in out['students']]
  students.sort(key=lambda s: s['index'])
  summary = {'select_split': outcomes[0]['select_split'], 'num_students': len(students),
             'wall_seconds': time.time() - t_start,
             'programs': [{k: p[k] for k in ('groups', 'students')} for p in plan['programs']],
             'students': students}
  if dist.is_primary():
    with atomic.writing(os.path.join(workdir, 'summary.json')) as f:
      json.dump(summary, f, indent=2)
    table = results.finish(workdir) if cfg.figures else results.report_text(_csv(workdir))
    print(table, flush=True)
  return Outcome(summary, None, None, programs=outcomes)


def _csv(workdir: str):
  run = results.load_run(workdir)
  results.write_csv(run)
  return run


def _load_data(base):
  pipeline = stream_data.choose(base.data)
  if pipeline == 'stream':
    stream_data.check_config(base, pipeline)  # 'auto' chose it from the folder's size
    ds = stream_data.load(base.data)
    logging.info("data.pipeline='stream': %s read by %d Grain worker process(es) (data.workers), decoded and "
                 'augmented on the host, %d batch(es) prefetched', ds.name, ds.workers, ds.prefetch)
  else:
    ds = data_lib.load(base.data)
  logging.info('data %s: %d train, %s val, %d test, %d classes, images %s, augment %s', ds.name, len(ds.train),
               len(ds.val) if ds.val is not None else 0, len(ds.test), ds.num_classes, ds.image_shape, ds.augment)
  return ds


def _has_steps(workdir: str) -> bool:
  path = ckpt_lib.directory(workdir)
  return os.path.isdir(path) and any(name.isdigit() for name in os.listdir(path))


def _compile(trainer: trainer_lib.Trainer, abstract, workdir: str, may_split: bool):
  """The train step compiled and its memory checked, before the checkpoint folder is made. A table that does not
  fit (a fresh one, `may_split`) is split (`table_split.Split` raised with the plan); any other run is refused."""
  split = may_split and len(trainer.sweep.groups) > 1 and not _has_steps(workdir)
  build = lambda sub, mesh: trainer_lib.build(trainer.cfg, trainer.ds, mesh, trainer.teacher, trainer.teacher_vars,
                                              sub)
  # A sweep too large for memory is refused before its whole program compiles (unrolled: minutes, or an hour).
  before = memory.estimate_before_compile(trainer, abstract)
  if split and not memory.fits(before):
    _split(trainer, build)
  memory.check(before, trainer.num_students)
  if not _has_steps(workdir):  # a fresh run: the initial state's program compiles beside the step's
    trainer.start_init_compile()
  compiled = trainer.compile(abstract)
  if split and not memory.fits(compiled):
    _split(trainer, build)
  memory.check(compiled, trainer.num_students)


def _split(trainer: trainer_lib.Trainer, build):
  """Raises `table_split.Split` with the plan of `trainer`'s table (refused when a group alone does not fit), its
  batch source closed: each program opens its own."""
  try:
    plan = table_split.plan(trainer, build)
  finally:
    trainer.source.close()
  raise table_split.Split(trainer.sweep, plan)


def _setup(cfg, sweep: sweep_lib.Sweep, workdir: str, restart: bool, may_split: bool = True) -> _Run:
  """Phase 1: the workdir's records, the data, the teachers, the compiled step, the state (restored or new)."""
  t_start = time.time()
  base = sweep.base
  if restart and dist.is_primary():
    set_aside(workdir)
  dist.barrier('kdjax-set-aside')
  check_resume(cfg, workdir)
  # Every process has read the saved config before process 0 rewrites it (below, once the checkpoint is known to
  # fit: a refused resume leaves the workdir as it was).
  dist.barrier('kdjax-resume-checked')
  ds = _load_data(base)
  if base.distill.teacher_store:  # before a teacher is trained for nothing
    replay.check_config(base, isinstance(ds, stream_data.StreamDataset))
  sweep = trainer_lib.applicable(sweep, ds)  # a method that cannot apply to its pair: refused, or left out
  mesh = sharding.make_mesh(base.num_devices, trainer_lib.mesh_students(sweep), base.mesh_students,
                            base.batch_size)
  teacher, teacher_vars = teacher_lib.prepare_all(base, ds, mesh, train_and_evaluate)
  trainer = trainer_lib.build(cfg, ds, mesh, teacher, teacher_vars, sweep)
  if sweep.groups:
    logging.info('table: %d groups (%s), %d students, one program and one teachers\' pass per step',
                 len(sweep.groups), '; '.join(f'{g.name}: {g.size}' for g in sweep.groups), sweep.size)
  elif sweep.size > 1:
    logging.info('sweep: %d students (%s%s), one program on a %s mesh (students x data)', sweep.size,
                 ', '.join(f'{k}: {len(v)} values' for k, v in sweep.axes.items()) or 'no axes',
                 f', {len(sweep.seeds)} seeds' if len(sweep.seeds) > 1 else '',
                 'x'.join(str(n) for n in mesh.devices.shape))
  select = 'val' if ds.val is not None else 'test'
  if select == 'test':
    logging.info('no validation split (data.val_fraction = 0): the best checkpoint is chosen by test accuracy')
  # Traced before the checkpoint folder is made: a model or method that refuses its inputs (an image size, a pair)
  # leaves the workdir as it was.
  abstract = trainer.init_state(abstract=True)
  if base.distill.extras_checkpoint and not _has_steps(workdir):  # refused before the checkpoint folder is made
    extras_init.check_run(base, abstract)
  _compile(trainer, abstract, workdir, may_split)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=base.keep_checkpoints)
  models_seen = {}
  for p in trainer.programs:
    models_seen.setdefault(p.group.sweep.base.student.model, trainer.param_count(abstract, p.group.offset))
  logging.info('student %s: %s parameters; %d steps/epoch, %d epochs, %d steps per dispatch, %d device(s)',
               ', '.join(models_seen), ', '.join(f'{n:,}' for n in models_seen.values()), trainer.steps_per_epoch,
               base.epochs, trainer.k, mesh.devices.size)
  latest, ts, meta = _restore_newest_intact(ckpt, abstract, ds)
  if dist.is_primary():  # before the first checkpoint of a fresh run: a workdir with checkpoints has its config
    write_config(cfg, workdir, sweep)
  partial = None  # the train metrics' sums of an epoch that a preemption cut
  if latest is not None:
    partial = meta.get('partial_sums')
    logging.info('resuming from the checkpoint at step %d (epoch %d)', latest, latest // trainer.steps_per_epoch)
  else:
    ts = trainer.init_state()
    if base.student.init_checkpoint:
      ts = teacher_lib.init_from_checkpoint(base, ds, trainer, ts)
    if base.distill.extras_checkpoint:
      ts = extras_init.init_from_checkpoint(base, trainer, ts)
  if trainer.teacher is not None and latest is None:
    logging.info('teacher %s test accuracy %.4f', base.teacher.model, teacher_lib.evaluate_teacher(trainer))
  # The input stream restarts where the checkpoint's batches ended (closed by `_Run.close`).
  data_state = ckpt.read_data(latest) if latest is not None and trainer.source.streaming else None
  trainer.source.start(stream_data.resume_position(data_state, int(ts.step), base.batch_size))
  # Records past the restored step (an earlier attempt's, lost with its process) are dropped: one per epoch.
  reporter = reporting.Reporter(workdir, base.epochs, trainer.steps_per_epoch, [s.name for s in sweep.students],
                                base.tensorboard, resume_step=int(ts.step), write=dist.is_primary())
  return _Run(workdir, sweep, trainer, ckpt, reporter, Preemption(), ts, select, t_start, partial)


def _epochs(r: _Run):
  """Phase 2: epochs of dispatches (the next dispatched before the last one's metrics are read), evaluation,
  records and checkpoints, until the run's end or a SIGTERM (the state saved, then `Preempted`)."""
  trainer, base = r.trainer, r.sweep.base
  spe = trainer.steps_per_epoch
  step = int(r.state.step)
  while step < trainer.total_steps:
    epoch, start = divmod(step, spe)
    t0 = time.time()
    pending, sums = [], None
    if start and r.partial is not None:
      sums = {k: np.asarray(v, np.float64) for k, v in r.partial.items()}
    pos = start
    while pos < spe:
      r.state, chunk = trainer.train_chunk(r.state, epoch, pos)
      pending.append((epoch * spe + pos, chunk))
      pos = min(pos + trainer.k, spe)
      if len(pending) > 1:  # fetch the previous dispatch's metrics while this one runs
        sums = _accumulate(sums, _fetch(pending.pop(0), trainer, r.ckpt, r.diverged))
        r.reporter.progress(epoch, pos - trainer.k, float(np.mean(sums['loss'] / sums['steps'])))
      if r.preemption.check() is not None:
        break
    for item in pending:
      sums = _accumulate(sums, _fetch(item, trainer, r.ckpt, r.diverged))
    step = epoch * spe + pos
    if r.preemption.signal is not None and pos < spe:  # stopped mid-epoch
      r.ckpt.save(step, r.state, dict(_meta(base, trainer, step, False),
                                      partial_sums={k: v.tolist() for k, v in sums.items()}),
                  data=trainer.source.state())
      r.ckpt.wait()
      raise r.preemption.error(step)
    r.partial = None
    trainer.source.end_epoch(epoch)
    r.reporter.progress(epoch, spe)
    _end_epoch(r, epoch, step, sums, time.time() - t0)
    if r.preemption.signal is not None and step < trainer.total_steps:
      r.ckpt.wait()
      raise r.preemption.error(step)
  r.ckpt.wait()


def _end_epoch(r: _Run, epoch: int, step: int, sums: dict, epoch_seconds: float):
  """An epoch's records (train metrics, and the evaluation when due) and its checkpoint when due."""
  trainer, base = r.trainer, r.sweep.base
  # A student of a group shorter than the program (a table's) has records up to its own last epoch only.
  records = [{'train_loss': float(sums['loss'][i] / sums['steps']),
              'train_accuracy': float(sums['correct'][i] / sums['count'][i]),
              **{k: float(sums[k][i] / sums['steps']) for k in sums
                 if k.startswith('loss_') and (not trainer.grouped or k[5:] in trainer.terms(i))}}
             if trainer.active(i, step) else None for i in range(trainer.num_students)]
  done, is_last = epoch + 1, step >= trainer.total_steps
  metrics = None
  if done % base.eval_every_epochs == 0 or is_last or trainer.ends_at(step):
    r.last_eval = trainer.evaluate(r.state)
    for record, e in zip(records, r.last_eval):
      if record is not None:
        record.update({k: v for k, v in e.items() if not k.endswith(('class_accuracy', '_count'))})
    metrics = {ckpt_lib.SELECT_METRIC: float(np.mean([e[f'{r.select}_accuracy'] for e in r.last_eval]))}
  r.reporter.epoch(epoch, step, records, epoch_seconds, int(sums['count'][0]))
  if done % base.checkpoint_every_epochs == 0 or is_last or r.preemption.signal is not None:
    r.ckpt.save(step, r.state, _meta(base, trainer, step, is_last), metrics, data=trainer.source.state())


def _finish(r: _Run) -> Outcome:
  """Phase 3: the summary, results.csv, tables and figures."""
  trainer, base, sweep = r.trainer, r.sweep.base, r.sweep
  if not r.last_eval:  # the run was already complete: report from the final state
    r.last_eval = trainer.evaluate(r.state)
  summary = _summary(r.workdir, trainer, r.state, r.select, r.last_eval, time.time() - r.t_start, r.ckpt)
  r.reporter.write({'summary': {k: v for k, v in summary.items() if k != 'students'}})
  table = None
  if not dist.is_primary():
    pass  # process 0 writes the results
  elif base.figures:
    table = results.finish(r.workdir)
  else:
    run = results.load_run(r.workdir)
    results.write_csv(run)
    table = results.report_text(run)
  if sweep.size > 1:
    if table is not None:
      print(table, flush=True)
  else:
    logging.info('done: last %s acc %.4f, best %s acc %.4f (step %s), test acc %.4f, wall time %.1fs',
                 r.select, summary['last_select_accuracy'], r.select, summary['best_select_accuracy'],
                 summary['best_step'], summary['test_accuracy'], summary['wall_seconds'])
  omitted = trainer.ds.omitted
  if omitted >= 0:
    for s in summary['students']:
      logging.info('omitted class %d%s: test acc %.4f; with its bias raised by %g: %.4f (overall %.4f)',
                   omitted, f" ({s['name']})" if sweep.size > 1 else '', s['test_omitted_accuracy'],
                   base.distill.omitted.bias, s.get('test_omitted_accuracy_adjusted', float('nan')),
                   s.get('test_accuracy_adjusted', float('nan')))
  return Outcome(summary, r.state, trainer)


def _restore_newest_intact(ckpt, abstract, ds=None):
  """(step, state, meta) of the newest checkpoint that restores, or (None, None, None) without any: a step
  damaged on disk (a truncated file, a half-written save) is skipped with one warning naming it, and moved aside to
  `checkpoints/damaged-<step>` (kept, not deleted) so that the step can be saved again. A step that reads but does
  not fit this config's state (another class count, image size or network) is not damaged: the resume is refused
  with one line naming the difference, and nothing is moved."""
  found, damaged = (None, None, None), []
  for step in sorted(ckpt.manager.all_steps(), reverse=True):
    try:
      found = step, ckpt.restore(step, abstract), ckpt.read_meta(step)
      break
    except CheckpointMismatchError as e:
      raise CheckpointMismatchError(f'{e}; {_mismatch_hint(ckpt, step, ds)}') from None
    except Exception as e:  # Orbax and TensorStore report damage under many types
      reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
      logging.warning('checkpoint step %d in %s is damaged (%s); trying the previous one', step,
                      ckpt_lib.directory(ckpt.workdir), reason)
      damaged.append(step)
  for step in damaged:
    root = ckpt_lib.directory(ckpt.workdir)
    if dist.is_primary():
      os.rename(os.path.join(root, str(step)), os.path.join(root, f'damaged-{step}-{int(time.time())}'))
  if damaged:
    dist.barrier('kdjax-damaged-set-aside')
    ckpt.manager.reload()
    logging.warning('resuming from %s; the damaged step(s) %s are kept in %s as damaged-<step>-<time>',
                    f'step {found[0]}' if found[0] is not None else 'the start',
                    ', '.join(map(str, damaged)), ckpt_lib.directory(ckpt.workdir))
  return found


def _mismatch_hint(ckpt, step: int, ds) -> str:
  """Why a saved step may not fit: its data (from its meta, when readable) against the data this run loaded."""
  try:
    meta = ckpt.read_meta(step)
    was = f"{meta['num_classes']} classes of {'x'.join(map(str, meta['image_shape']))} images"
  except Exception:  # the meta item is damaged or older: the shapes above say what differs
    was = None
  now = None if ds is None else f"{ds.num_classes} classes of {'x'.join(map(str, ds.image_shape))} images"
  why = (f'the run was trained on {was}, the data read now (data.dir, data.data_dir) has {now}' if was and now
         and was != now else 'a field a resume may change (data.dir, data.data_dir) points at other data, or this '
         'kdjax builds the network differently')
  return (f'{why}; the run is kept as it is: resume it with the data it was trained on, choose another --workdir, '
          'or pass --restart to set it aside and start anew')


def _fetch(item, trainer: trainer_lib.Trainer, ckpt, diverged: dict) -> dict:
  """A dispatch's metrics on the host; a non-finite step stops a single run (nothing after the last good
  checkpoint is saved) and freezes that student of a sweep (its update was skipped in the step; the others go on)."""
  first_step, chunk = item
  m = jax.device_get(chunk)
  bad = np.flatnonzero(np.asarray(m['nonfinite']) > 0)
  for i in bad:
    if i in diverged:
      continue
    diverged[i] = first_step
    terms = [k[5:] for k in m if k.startswith('loss_') and not np.isfinite(np.asarray(m[k])[i])]
    what = f"non-finite loss term(s) {', '.join(terms)}" if terms else (
        'a non-finite gradient (the loss was finite)' if m['grad_nonfinite'][i] else 'a non-finite loss')
    where = f'steps {first_step}-{first_step + trainer.k - 1}' if trainer.k > 1 else f'step {first_step}'
    good = ckpt.latest_step()
    if trainer.num_students == 1:
      raise NonFiniteError(f'training diverged: {what} at {where} (epoch {first_step // trainer.steps_per_epoch + 1}); '
                           f'nothing was saved after the last good checkpoint (step {good}); lower the learning '
                           'rate or check the inputs')
    logging.warning('student %r diverged: %s at %s; its parameters stay those of its last finite step and it '
                    'trains no further', trainer.sweep.students[i].name, what, where)
  return m


def _accumulate(sums, new):
  new = {k: np.asarray(v, np.float64) for k, v in new.items()}
  return new if sums is None else {k: sums[k] + new[k] for k in sums}


def _summary(workdir, trainer: trainer_lib.Trainer, ts, select, last_eval, wall, ckpt) -> dict:
  """summary.json: per student its best (over the evaluated epochs in metrics.jsonl) and last accuracy, its last
  evaluation and its exported artefacts; a single run's student also at the top level."""
  rows = {r['index']: r for r in results.student_rows(results.load_run(workdir))}
  students = []
  for s, e in zip(trainer.sweep.students, last_eval):
    row = rows.get(s.index, {})
    best = row.get(f'best_{select}_accuracy')
    entry = {'index': s.index, 'name': s.name, 'values': s.values, 'seed': s.seed,
             'last_select_accuracy': e[f'{select}_accuracy'],
             'best_select_accuracy': best if best is not None else e[f'{select}_accuracy'],
             'best_epoch': row.get('best_epoch'), **{k: v for k, v in e.items() if k.startswith('test_')}}
    group = trainer.for_group(trainer.locate(s.index)[0])
    for export in group.distiller.exports:
      path = os.path.join(workdir, 'deploy') if trainer.num_students == 1 else \
          os.path.join(workdir, 'deploy', f'student_{s.index}')
      entry.update(export(group, trainer.student_state(ts, s.index), path))
    students.append(entry)
  summary = {'select_split': select, 'num_students': trainer.num_students, 'best_step': ckpt.best_step(),
             'wall_seconds': wall, 'students': students}
  if trainer.num_students == 1:
    summary.update({k: v for k, v in students[0].items() if k not in ('index', 'name', 'values')})
  if dist.is_primary():
    with atomic.writing(os.path.join(workdir, 'summary.json')) as f:
      json.dump(summary, f, indent=2)
  return summary
