"""The run loop: read the data, prepare the teacher (training it first when needed), build the experiment
(`kdjax.step`: the jitted step for every student of the sweep), then epochs of dispatches, evaluation, checkpoints,
per-student records and the results (`kdjax.results`).

Module graph (no cycles): train -> teacher, step, results; step -> distill, models, data, sweep; teacher ->
checkpoint. A teacher that must be trained first is trained here, by this same loop, as a run of its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import time

from absl import logging
import jax
import ml_collections
import numpy as np

from kdjax import checkpoint as ckpt_lib
from kdjax import compile_cache
from kdjax import config_lib
from kdjax import data as data_lib
from kdjax import distributed as dist
from kdjax import memory as memory_lib
from kdjax import reporting
from kdjax import results
from kdjax import sharding
from kdjax import step as step_lib
from kdjax import sweep as sweep_lib
from kdjax import teacher as teacher_lib
from kdjax import validate
from kdjax.data import stream as stream_data
from kdjax.errors import ConfigError, NonFiniteError, Preempted, WorkdirInUse

# Re-exported: the state and the step live in kdjax.step.
Experiment = step_lib.Experiment
TrainState = step_lib.TrainState
compute_dtype = step_lib.compute_dtype
build_student = step_lib.build_student


def _meta(cfg, ds, exp: Experiment, step: int, complete: bool) -> dict:
  return {'model': cfg.student.model, 'model_kwargs': config_lib.as_dict(cfg.student.get('kwargs')),
          'num_classes': ds.num_classes, 'subclasses': cfg.student.get('subclasses', 1), 'dataset': ds.name,
          'image_shape': list(ds.image_shape), 'step': int(step), 'epoch': int(step) // exp.steps_per_epoch,
          'total_steps': exp.total_steps, 'complete': bool(complete), 'students': exp.num_students}


def _preempted(signum, step) -> Preempted:
  return Preempted(f'stopped by signal {signum} at step {step}; the checkpoint is saved, rerun the same command '
                   'to resume')


def write_config(cfg, workdir: str, sweep: sweep_lib.Sweep | None = None):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(cfg.to_json_best_effort(indent=2, sort_keys=True))
  if sweep is not None:
    with open(os.path.join(workdir, 'sweep.json'), 'w') as f:
      json.dump(sweep.to_json(), f, indent=2)


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds `workdir/kdjax.lock` for the run: a second live process on the same workdir is refused with the holder's
  pid. The kernel releases the lock of a killed process, so a stale lock file is simply taken over."""
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
  finally:
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()


def prepare_teacher(cfg, ds, mesh):
  """(teacher module, replicated variables), or (None, None) when the config has no teacher. A teacher that is
  neither given nor cached is trained first by this loop, as a supervised run with its own recipe."""
  if not cfg.teacher.get('model'):
    return None, None
  path, must_train = teacher_lib.checkpoint_path(cfg, ds)
  if must_train:  # on many hosts: every process trains it, as one run; process 0 writes its records
    train_and_evaluate(teacher_lib.teacher_run_config(cfg), path)
    dist.barrier('kdjax-teacher-trained')
  if cfg.teacher.get('checkpoint'):
    return teacher_lib.load(cfg, ds, mesh, path)
  try:
    return teacher_lib.load(cfg, ds, mesh, path)
  except Exception as e:  # a cached teacher damaged on disk: kept aside, trained again
    aside = f'{path}.damaged-{int(time.time())}'
    if dist.is_primary():
      os.rename(path, aside)
    dist.barrier('kdjax-teacher-set-aside')
    logging.warning('the cached teacher %s is damaged (%s); moved to %s and trained again', path,
                    (str(e).strip().splitlines() or [type(e).__name__])[0][:200], aside)
    train_and_evaluate(teacher_lib.teacher_run_config(cfg), path)
    return teacher_lib.load(cfg, ds, mesh, path)


def prepare_teachers(cfg, ds, mesh):
  """`prepare_teacher` for `config.teacher` and then each of `config.teachers` (each loaded, or trained first and
  cached, as a teacher of its own): (a `step.TeacherGroup`, the tuple of their variables) when there are several,
  else `prepare_teacher`'s (module, variables)."""
  first = prepare_teacher(cfg, ds, mesh)
  extra = list(cfg.get('teachers', None) or [])
  if not extra or first[0] is None:
    return first
  pairs = [first] + [prepare_teacher(teacher_lib.with_teacher(cfg, i + 1), ds, mesh) for i in range(len(extra))]
  return step_lib.TeacherGroup([m for m, _ in pairs]), tuple(v for _, v in pairs)


def _check_memory(exp: Experiment, memory: dict | None):
  """Refuses a run whose memory per device (XLA's analysis of the compiled program, or `memory_lib.estimate`'s
  estimate before compiling it, whose 'basis' says how it was made) exceeds memory_lib.MEMORY_FRACTION of the
  device's."""
  if memory is None:
    return
  gib = lambda b: b / 2**30
  basis = memory.get('basis')
  logging.info('%s: about %.2f GiB per device (train state %.2f GiB, XLA temporaries %.2f GiB)%s',
               f'estimated from {basis}' if basis else 'compiled', gib(memory['total']), gib(memory['state']),
               gib(memory['temp']), f"; {gib(memory['available']):.1f} GiB available" if memory['available'] else '')
  if memory['available'] and memory['total'] > memory_lib.MEMORY_FRACTION * memory['available']:
    what = f'the sweep of {exp.num_students} students' if exp.num_students > 1 else 'this run'
    how = f'; estimated from {basis}' if basis else ''
    raise ConfigError(f"{what} needs about {gib(memory['total']):.2f} GiB per device (train state "
                      f"{gib(memory['state']):.2f} GiB, XLA temporaries {gib(memory['temp']):.2f} GiB{how}) but "
                      f"{gib(memory['available']):.2f} GiB are available; sweep fewer students, use more devices "
                      'or a smaller batch_size')


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str, restart: bool = False) -> dict:
  """Trains every student of `cfg`'s sweep (one for a single run), distilling from `cfg.teacher` when the losses
  need one; returns the run summary (per student under 'students'; a single run's also at the top level)."""
  reporting.quiet_library_logs()
  compile_cache.enable(cfg.get('compilation_cache', ''))  # before anything compiles
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
                     'compilation_cache', 'steps_loop', 'data.workers', 'data.prefetch')


def check_resume(cfg, workdir: str):
  """A workdir that holds checkpoints resumes only the run that wrote them: the saved config.json and `cfg` may
  differ in RESUMABLE_CHANGES alone (logged); anything else is refused, naming each field with both values."""
  saved_path = os.path.join(workdir, 'config.json')
  if not (os.path.isfile(saved_path) and os.path.isdir(ckpt_lib.directory(workdir))):
    return
  with open(saved_path) as f:
    saved = sweep_lib.flatten(json.load(f))
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


def _train(cfg, sweep: sweep_lib.Sweep, workdir: str, restart: bool = False) -> dict:
  t_start = time.time()
  base = sweep.base
  if restart and dist.is_primary():
    set_aside(workdir)
  dist.barrier('kdjax-set-aside')
  check_resume(cfg, workdir)
  dist.barrier('kdjax-resume-checked')  # every process has read the saved config before process 0 rewrites it
  if dist.is_primary():
    write_config(cfg, workdir, sweep)
  pipeline = stream_data.choose(base.data)
  if pipeline == 'stream':
    stream_data.check_config(base, pipeline)  # 'auto' chose it from the folder's size
  ds = stream_data.load(base.data) if pipeline == 'stream' else data_lib.load(base.data)
  if pipeline == 'stream':
    logging.info("data.pipeline='stream': %s read by %d Grain worker process(es) (data.workers), decoded and "
                 'augmented on the host, %d batch(es) prefetched', ds.name, ds.workers, ds.prefetch)
  logging.info('data %s: %d train, %s val, %d test, %d classes, images %s, augment %s', ds.name, len(ds.train),
               len(ds.val) if ds.val is not None else 0, len(ds.test), ds.num_classes, ds.image_shape, ds.augment)
  mesh = sharding.make_mesh(base.get('num_devices', 0), sweep.size, base.get('mesh_students', 0), base.batch_size)
  teacher, teacher_vars = prepare_teachers(base, ds, mesh)
  exp = Experiment(cfg, ds, mesh, teacher, teacher_vars, sweep)
  if sweep.size > 1:
    logging.info('sweep: %d students (%s%s), one program on a %s mesh (students x data)', sweep.size,
                 ', '.join(f'{k}: {len(v)} values' for k, v in sweep.axes.items()) or 'no axes',
                 f', {len(sweep.seeds)} seeds' if len(sweep.seeds) > 1 else '',
                 'x'.join(str(n) for n in mesh.devices.shape))
  ckpt = ckpt_lib.Checkpointer(workdir, keep=base.get('keep_checkpoints', 2))
  select = 'val' if ds.val is not None else 'test'
  if select == 'test':
    logging.info('no validation split (data.val_fraction = 0): the best checkpoint is chosen by test accuracy')

  abstract = exp.init_state(abstract=True)
  # A sweep too large for memory is refused before its whole program compiles (unrolled: minutes, or an hour).
  _check_memory(exp, memory_lib.estimate(exp, abstract, step_lib.available_memory(mesh.devices.size)))
  if not ckpt.manager.all_steps():  # a fresh run: the initial state's program compiles beside the step's
    exp.start_init_compile()
  _check_memory(exp, exp.compile(abstract))
  n_params = sum(x.size for x in jax.tree.leaves(abstract.params['student'])) // sweep.size
  logging.info('student %s: %s parameters; %d steps/epoch, %d epochs, %d steps per dispatch, %d device(s)',
               base.student.model, f'{n_params:,}', exp.steps_per_epoch, base.epochs, exp.k, mesh.devices.size)
  latest, ts, meta = _restore_newest_intact(ckpt, abstract)
  partial = None  # the train metrics' sums of an epoch that a preemption cut
  if latest is not None:
    partial = meta.get('partial_sums')
    logging.info('resuming from the checkpoint at step %d (epoch %d)', latest, latest // exp.steps_per_epoch)
  else:
    ts = exp.init_state()
    if base.student.get('init_checkpoint'):
      ts = teacher_lib.init_from_checkpoint(base, ds, exp, ts)

  if teacher is not None and latest is None:
    logging.info('teacher %s test accuracy %.4f', base.teacher.model, teacher_lib.evaluate_teacher(exp))

  loader = None
  if exp.streaming:  # the input stream restarts where the checkpoint's batches ended (closed in the finally below)
    data_state = ckpt.read_data(latest) if latest is not None else None
    position = stream_data.resume_position(data_state, int(ts.step), base.batch_size)
    loader = stream_data.TrainLoader(ds, base.batch_size, exp.data_seed, position, exp.chunk_sharded)

  # Records past the restored step (an earlier attempt's, lost with its process) are dropped: one per epoch.
  reporter = reporting.Reporter(workdir, base.epochs, exp.steps_per_epoch, [s.name for s in sweep.students],
                                base.get('tensorboard', True), resume_step=int(ts.step), write=dist.is_primary())
  diverged = {}  # student index -> the step its first non-finite update was skipped at
  stop = {'signal': None}  # set by the handler; on many hosts read through `stopped`, the same on every process
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
  agreed = {'signal': None}

  def stopped(check: bool = False):
    """The signal that stops the run: on one host the handler's; on many, the one any process got, agreed at
    each dispatch (`check`), so that every process stops after the same step."""
    if not dist.multi():
      return stop['signal']
    if check:
      agreed['signal'] = dist.agree_signal(stop['signal'])
    return agreed['signal']

  def data_state():
    if loader is None:
      return None
    positions = [loader.position]
    if dist.multi():
      from jax.experimental import multihost_utils
      positions = np.asarray(multihost_utils.process_allgather(np.int64(loader.position))).reshape(-1).tolist()
    return {'positions': [int(p) for p in positions]}

  last_eval = []
  try:
    step = int(ts.step)
    while step < exp.total_steps:
      epoch, start = divmod(step, exp.steps_per_epoch)
      t0 = time.time()
      pending, sums = [], None
      if start and partial is not None:
        sums = {k: np.asarray(v, np.float64) for k, v in partial.items()}
      pos = start
      while pos < exp.steps_per_epoch:
        ts, chunk = exp.train_chunk(ts, epoch, pos, loader) if loader is not None else exp.train_chunk(ts, epoch, pos)
        pending.append((epoch * exp.steps_per_epoch + pos, chunk))
        pos = min(pos + exp.k, exp.steps_per_epoch)
        if len(pending) > 1:  # fetch the previous dispatch's metrics while this one runs
          sums = _accumulate(sums, _fetch(pending.pop(0), exp, ckpt, diverged))
          reporter.progress(epoch, pos - exp.k, float(np.mean(sums['loss'] / sums['steps'])))
        if stopped(check=True) is not None:
          break
      for item in pending:
        sums = _accumulate(sums, _fetch(item, exp, ckpt, diverged))
      step = epoch * exp.steps_per_epoch + pos
      if stopped() is not None and pos < exp.steps_per_epoch:  # stopped mid-epoch
        ckpt.save(step, ts, dict(_meta(base, ds, exp, step, False),
                                 partial_sums={k: v.tolist() for k, v in sums.items()}), data=data_state())
        ckpt.wait()
        raise _preempted(stopped(), step)
      partial = None
      if loader is not None and loader.skipped:
        logging.warning('epoch %d: %d corrupt image(s) skipped (data.on_corrupt=skip)', epoch + 1, len(loader.skipped))
        loader.skipped = []
      reporter.progress(epoch, exp.steps_per_epoch)
      epoch_seconds = time.time() - t0
      records = [{'train_loss': float(sums['loss'][i] / sums['steps']),
                  'train_accuracy': float(sums['correct'][i] / sums['count'][i]),
                  **{k: float(sums[k][i] / sums['steps']) for k in sums if k.startswith('loss_')}}
                 for i in range(sweep.size)]
      done = epoch + 1
      is_last = step >= exp.total_steps
      metrics = None
      if done % base.get('eval_every_epochs', 1) == 0 or is_last:
        last_eval = exp.evaluate(ts)
        for r, e in zip(records, last_eval):
          r.update({k: v for k, v in e.items() if not k.endswith(('class_accuracy', '_count'))})
        metrics = {ckpt_lib.SELECT_METRIC: float(np.mean([e[f'{select}_accuracy'] for e in last_eval]))}
      reporter.epoch(epoch, step, records, epoch_seconds, int(sums['count'][0]))
      if done % base.get('checkpoint_every_epochs', 1) == 0 or is_last or stopped() is not None:
        ckpt.save(step, ts, _meta(base, ds, exp, step, is_last), metrics, data=data_state())
      if stopped() is not None and not is_last:
        ckpt.wait()
        raise _preempted(stopped(), step)
    ckpt.wait()
    if not last_eval:  # the run was already complete: report from the final state
      last_eval = exp.evaluate(ts)
    summary = _summary(workdir, exp, ts, select, last_eval, time.time() - t_start, ckpt)
    reporter.write({'summary': {k: v for k, v in summary.items() if k != 'students'}})
    table = None
    if not dist.is_primary():
      pass  # process 0 writes the results
    elif base.get('figures', True):
      table = results.finish(workdir)
    else:
      run = results.load_run(workdir)
      results.write_csv(run)
      table = results.grid_table(run)
    if sweep.size > 1:
      if table is not None:
        print(table, flush=True)
    else:
      logging.info('done: last %s acc %.4f, best %s acc %.4f (step %s), test acc %.4f, wall time %.1fs',
                   select, summary['last_select_accuracy'], select, summary['best_select_accuracy'],
                   summary['best_step'], summary['test_accuracy'], summary['wall_seconds'])
    if ds.omitted >= 0:
      for s in summary['students']:
        logging.info('omitted class %d%s: test acc %.4f; with its bias raised by %g: %.4f (overall %.4f)',
                     ds.omitted, f" ({s['name']})" if sweep.size > 1 else '', s['test_omitted_accuracy'],
                     base.distill.omitted.bias, s.get('test_omitted_accuracy_adjusted', float('nan')),
                     s.get('test_accuracy_adjusted', float('nan')))
    summary['state'] = ts
    summary['experiment'] = exp
    return summary
  finally:
    signal.signal(signal.SIGTERM, previous)
    if loader is not None:
      loader.close()
    reporter.close()
    ckpt.close()


def _restore_newest_intact(ckpt, abstract):
  """(step, state, meta) of the newest checkpoint that restores, or (None, None, None) without any: a step
  damaged on disk (a truncated file, a half-written save) is skipped with one warning naming it, and moved aside to
  `checkpoints/damaged-<step>` (kept, not deleted) so that the step can be saved again."""
  found, damaged = (None, None, None), []
  for step in sorted(ckpt.manager.all_steps(), reverse=True):
    try:
      found = step, ckpt.restore(step, abstract), ckpt.read_meta(step)
      break
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


def _fetch(item, exp: Experiment, ckpt, diverged: dict) -> dict:
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
    where = f'steps {first_step}-{first_step + exp.k - 1}' if exp.k > 1 else f'step {first_step}'
    good = ckpt.latest_step()
    if exp.num_students == 1:
      raise NonFiniteError(f'training diverged: {what} at {where} (epoch {first_step // exp.steps_per_epoch + 1}); '
                           f'nothing was saved after the last good checkpoint (step {good}); lower the learning '
                           'rate or check the inputs')
    logging.warning('student %r diverged: %s at %s; its parameters stay those of its last finite step and it '
                    'trains no further', exp.sweep.students[i].name, what, where)
  return m


def _accumulate(sums, new):
  new = {k: np.asarray(v, np.float64) for k, v in new.items()}
  return new if sums is None else {k: sums[k] + new[k] for k in sums}


def _summary(workdir, exp: Experiment, ts, select, last_eval, wall, ckpt) -> dict:
  """summary.json: per student its best (over the evaluated epochs in metrics.jsonl) and last accuracy, its last
  evaluation and its exported artefacts; a single run's student also at the top level."""
  rows = {r['index']: r for r in results.student_rows(results.load_run(workdir))}
  students = []
  for s, e in zip(exp.sweep.students, last_eval):
    row = rows.get(s.index, {})
    best = row.get(f'best_{select}_accuracy')
    entry = {'index': s.index, 'name': s.name, 'values': s.values, 'seed': s.seed,
             'last_select_accuracy': e[f'{select}_accuracy'],
             'best_select_accuracy': best if best is not None else e[f'{select}_accuracy'],
             'best_epoch': row.get('best_epoch'), **{k: v for k, v in e.items() if k.startswith('test_')}}
    for export in exp.distiller.exports:
      path = os.path.join(workdir, 'deploy') if exp.num_students == 1 else \
          os.path.join(workdir, 'deploy', f'student_{s.index}')
      entry.update(export(exp, step_lib.student(ts, s.index), path))
    students.append(entry)
  summary = {'select_split': select, 'num_students': exp.num_students, 'best_step': ckpt.best_step(),
             'wall_seconds': wall, 'students': students}
  if exp.num_students == 1:
    summary.update({k: v for k, v in students[0].items() if k not in ('index', 'name', 'values')})
  if dist.is_primary():
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=2)
  return summary
