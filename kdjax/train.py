"""Train state, the one jitted train step (K steps per dispatch), evaluation and the epoch loop.

Data path, all inside jit: gather the batch from the device-resident uint8 arrays by the epoch's permutation,
augment, normalise -> teacher forward (eval mode, stop_gradient; its variables are an argument, never donated,
never in the optimizer) -> student forward (+ the methods' extra modules) -> every loss term -> value_and_grad over
the trainable tree -> optax update. The step is a pure function of (state, teacher_vars, data, rng, epoch, start).
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kdjax import checkpoint as ckpt_lib
from kdjax import config_lib
from kdjax import data as data_lib
from kdjax import distill
from kdjax import models
from kdjax import optim
from kdjax import reporting
from kdjax import sharding
from kdjax import teacher as teacher_lib
from kdjax.data import device as device_data
from kdjax.errors import ConfigError, Preempted


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any     # {'student': ..., 'extras': ...}: everything the optimizer updates
  state: Any      # {'student': {'batch_stats': ...}, 'extras': {...}}: non-trained collections
  opt_state: Any


def compute_dtype(cfg):
  return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[cfg.get('dtype', 'float32')]


def build_student(cfg, num_classes: int):
  return models.create(cfg.student.model, num_classes=num_classes, dtype=compute_dtype(cfg),
                       subclasses=cfg.student.get('subclasses', 1), **config_lib.as_dict(cfg.student.get('kwargs')))


class Experiment:
  """Everything a run compiles: models, distiller, optimizer and the jitted functions, bound to one dataset."""

  def __init__(self, cfg, ds: data_lib.Dataset, mesh, teacher=None, teacher_vars=None):
    self.cfg, self.ds, self.mesh = cfg, ds, mesh
    self.batch_size = cfg.batch_size
    n_dev = mesh.devices.size
    if self.batch_size % n_dev:
      raise ConfigError(f'batch_size {self.batch_size} is not divisible by the {n_dev} devices in use')
    self.steps_per_epoch = len(ds.train) // self.batch_size
    if self.steps_per_epoch == 0:
      raise ConfigError(f'batch_size {self.batch_size} exceeds the {len(ds.train)} training examples')
    self.total_steps = cfg.epochs * self.steps_per_epoch
    self.k = min(cfg.get('steps_per_dispatch', 0) or self._auto_steps_per_dispatch(), self.steps_per_epoch)
    self.dtype = compute_dtype(cfg)
    self.replicated = sharding.replicated(mesh)
    self.batch_sharded = sharding.batch_sharded(mesh)

    self.student = build_student(cfg, ds.num_classes)
    self.teacher, self.teacher_vars = teacher, teacher_vars
    self.distiller = distill.Distiller(cfg.distill, self.student, teacher)
    if not self.distiller.needs_teacher:
      self.teacher = self.teacher_vars = None
    self.tx = optim.optimizer(cfg, self.steps_per_epoch)

    self.rng = jax.random.key(cfg.seed)
    self.data_rng, self.init_rng, self.step_rng = jax.random.split(self.rng, 3)
    self.train_data = device_data.put_replicated(ds.train, self.replicated)
    self.eval_sets = {name: jax.device_put(device_data.padded_eval_arrays(split, cfg.eval_batch_size),
                                           self.replicated)
                      for name, split in (('val', ds.val), ('test', ds.test)) if split is not None}
    # Outputs pinned replicated so the donated state keeps its layout (a memory bank too) step after step.
    self._train_chunk = jax.jit(self._train_chunk_fn, donate_argnums=(0,), out_shardings=self.replicated)
    self._evaluate = jax.jit(self._evaluate_fn)

  def _auto_steps_per_dispatch(self) -> int:
    # XLA:CPU runs a step inside a while loop ~10x slower than the same step dispatched alone (measured on the
    # digits CNN), so the CPU dispatches single steps; accelerators amortise dispatch over up to 32 steps, a
    # divisor of the epoch so that no step is masked.
    if jax.default_backend() == 'cpu':
      return 1
    return max(d for d in range(1, 33) if self.steps_per_epoch % d == 0)

  # ----------------------------------------------------------------------------------------------------------- init
  def _dummy_input(self):
    return jnp.zeros((self.batch_size,) + self.ds.image_shape, self.dtype)

  def init_state(self, abstract: bool = False) -> TrainState:
    """The initial train state; `abstract=True` gives its shapes only (nothing is computed or compiled)."""
    x = self._dummy_input()
    s_shapes = jax.eval_shape(lambda: self.student.apply(
        self.student.init(self.init_rng, x), x))
    t_shapes = None
    if self.teacher is not None:
      t_shapes = jax.eval_shape(lambda v: self.teacher.apply(v, x), self.teacher_vars)
    extras = self.distiller.build_extras(s_shapes, t_shapes,
                                         distill.DataInfo(len(self.ds.train), self.ds.num_classes,
                                                          self.student, self.teacher))

    def init(rng, teacher_vars):
      k_s, k_e = jax.random.split(rng)
      s_vars = self.student.init(k_s, x)
      params = {'student': s_vars['params'], 'extras': {}}
      state = {'student': {k: v for k, v in s_vars.items() if k != 'params'}, 'extras': {}}
      if extras is not None:
        s_out = self.student.apply(s_vars, x)
        t_out = self.teacher.apply(teacher_vars, x) if self.teacher is not None else None
        e_vars = extras.init({'params': k_e, 'memory': k_e}, s_out, t_out,
                             labels=jnp.zeros((x.shape[0],), jnp.int32),
                             indices=jnp.zeros((x.shape[0],), jnp.int32), train=False,
                             teacher_classify=self._teacher_classify(teacher_vars))
        params['extras'] = e_vars.get('params', {})
        state['extras'] = {k: v for k, v in e_vars.items() if k != 'params'}
      return TrainState(step=jnp.zeros((), jnp.int32), params=params, state=state,
                        opt_state=self.tx.init(params))

    if abstract:
      return jax.eval_shape(init, self.init_rng, self.teacher_vars)
    return jax.jit(init, out_shardings=self.replicated)(self.init_rng, self.teacher_vars)

  def trace_train_step(self):
    """Traces one dispatch of the train step on abstract values: a cheap check that a config builds and lowers."""
    return jax.eval_shape(self._train_chunk_fn, self.init_state(abstract=True), self.teacher_vars, jnp.int32(0),
                          jnp.int32(0))

  def _teacher_classify(self, teacher_vars):
    if self.teacher is None:
      return None
    return lambda emb: self.teacher.apply(teacher_vars, emb, method='classify')

  # ---------------------------------------------------------------------------------------------------- forward
  def _forward(self, params, state, teacher_vars, x, y, idx, rng, train: bool, epoch):
    """Student (+ extras) forward; returns (Context, new non-trained state)."""
    t_out = None
    if self.teacher is not None:
      t_out = jax.lax.stop_gradient(self.teacher.apply(teacher_vars, x, train=False))
    drop_rng, extra_drop_rng, sample_rng = jax.random.split(rng, 3)
    mutable = list(state['student']) if train else False
    s_res = self.student.apply({'params': params['student'], **state['student']}, x, train=train,
                               mutable=mutable, rngs={'dropout': drop_rng})
    s_out, s_new = s_res if train else (s_res, state['student'])
    extras_out, e_new = {}, state['extras']
    if self.distiller.extras is not None:
      e_mutable = list(state['extras']) if train else False
      res = self.distiller.extras.apply(
          {'params': params['extras'], **state['extras']}, s_out, t_out, labels=y, indices=idx, train=train,
          teacher_classify=self._teacher_classify(teacher_vars), mutable=e_mutable,
          rngs={'dropout': extra_drop_rng, 'sample': sample_rng})
      extras_out, e_new = res if train else (res, state['extras'])
    ctx = distill.Context(student=s_out, teacher=t_out, labels=y, extras=extras_out, epoch=epoch)
    return ctx, {'student': dict(s_new), 'extras': dict(e_new)}

  # ------------------------------------------------------------------------------------------------------ train
  def _train_step(self, ts: TrainState, teacher_vars, perm, step_in_epoch, epoch):
    rng = jax.random.fold_in(self.step_rng, ts.step)
    aug_rng, fwd_rng = jax.random.split(rng)
    x, y, idx = device_data.train_batch(self.train_data, perm, step_in_epoch, self.batch_size, aug_rng, self.ds,
                                        self.dtype)
    x = jax.lax.with_sharding_constraint(x, self.batch_sharded)
    progress = epoch + step_in_epoch.astype(jnp.float32) / self.steps_per_epoch

    def loss_fn(params):
      ctx, new_state = self._forward(params, ts.state, teacher_vars, x, y, idx, fwd_rng, True, progress)
      total, terms = self.distiller.losses(ctx)
      return total, (terms, self.distiller.logits(ctx), new_state)

    (total, (terms, logits, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(ts.params)
    updates, opt_state = self.tx.update(grads, ts.opt_state, ts.params)
    params = optax.apply_updates(ts.params, updates)
    metrics = {'loss': total, 'correct': jnp.sum(jnp.argmax(logits, -1) == y).astype(jnp.float32),
               'count': jnp.float32(y.shape[0]), **{f'loss_{k}': v for k, v in terms.items()}}
    # Per-step sums over a dispatch; loss terms are batch means, so they are weighted per step, not per example.
    return TrainState(ts.step + 1, params, new_state, opt_state), metrics

  def _train_chunk_fn(self, ts: TrainState, teacher_vars, epoch, start):
    """`self.k` steps from step `start` of `epoch`; steps past the epoch's end are skipped (one compilation)."""
    perm = device_data.epoch_permutation(self.data_rng, epoch, len(self.ds.train))
    if self.k == 1:  # no loop and no mask: `start` is always inside the epoch
      ts, m = self._train_step(ts, teacher_vars, perm, start, epoch)
      return ts, dict(jax.tree.map(lambda a: a.astype(jnp.float32), m), steps=jnp.float32(1))
    zeros = jax.eval_shape(lambda: self._train_step(ts, teacher_vars, perm, jnp.int32(0), epoch)[1])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), zeros)
    zeros['steps'] = jnp.float32(0)

    def body(carry, i):
      s = start + i

      def run(c):
        ts, sums = c
        ts, m = self._train_step(ts, teacher_vars, perm, s, epoch)
        m = dict(m, steps=jnp.float32(1))
        return ts, jax.tree.map(lambda a, b: a + b.astype(jnp.float32), sums, m)

      return jax.lax.cond(s < self.steps_per_epoch, run, lambda c: c, carry), None

    (ts, sums), _ = jax.lax.scan(body, (ts, zeros), jnp.arange(self.k))
    return ts, sums

  def train_chunk(self, ts, epoch: int, start: int):
    return self._train_chunk(ts, self.teacher_vars, jnp.int32(epoch), jnp.int32(start))

  # ------------------------------------------------------------------------------------------------------- eval
  def _evaluate_fn(self, ts: TrainState, teacher_vars, arrays):
    num_classes = self.ds.num_classes
    top_k = min(5, num_classes)

    def body(sums, batch):
      x = device_data.normalize(batch['images'], self.ds.mean, self.ds.std, self.dtype)
      x = jax.lax.with_sharding_constraint(x, self.batch_sharded)
      y, mask = batch['labels'], batch['mask'].astype(jnp.float32)
      ctx, _ = self._forward(ts.params, ts.state, teacher_vars, x, y, y, jax.random.key(0), False, 0.0)
      logits = self.distiller.logits(ctx)
      nll = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      top1 = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
      top5 = jnp.any(jax.lax.top_k(logits, top_k)[1] == y[:, None], axis=-1).astype(jnp.float32)
      onehot = jax.nn.one_hot(y, num_classes) * mask[:, None]
      new = {'loss': jnp.sum(nll * mask), 'top1': jnp.sum(top1 * mask), 'top5': jnp.sum(top5 * mask),
             'count': jnp.sum(mask), 'class_correct': onehot.T @ top1, 'class_count': jnp.sum(onehot, 0)}
      if adjust:
        adjusted = logits.at[:, self.ds.omitted].add(adjust)
        top1_adj = (jnp.argmax(adjusted, -1) == y).astype(jnp.float32)
        new.update(top1_adj=jnp.sum(top1_adj * mask), class_correct_adj=onehot.T @ top1_adj)
      return jax.tree.map(jnp.add, sums, new), None

    adjust = self.cfg.distill.omitted.bias if self.ds.omitted >= 0 else 0.0
    zeros = {k: jnp.float32(0) for k in ('loss', 'top1', 'top5', 'count') + (('top1_adj',) if adjust else ())}
    zeros.update(class_correct=jnp.zeros(num_classes), class_count=jnp.zeros(num_classes))
    if adjust:
      zeros['class_correct_adj'] = jnp.zeros(num_classes)
    sums, _ = jax.lax.scan(body, zeros, arrays)
    return sums

  def evaluate(self, ts: TrainState) -> dict:
    """{split}_loss, {split}_accuracy, {split}_top5, {split}_count, per-class accuracy, for val (if any) and
    test; omitted-class runs add {split}_omitted_accuracy and the bias-adjusted {split}_*_adjusted."""
    out = {}
    for name, arrays in self.eval_sets.items():
      s = jax.device_get(self._evaluate(ts, self.teacher_vars, arrays))
      n = float(s['count'])
      out.update({f'{name}_loss': float(s['loss']) / n, f'{name}_accuracy': float(s['top1']) / n,
                  f'{name}_top5': float(s['top5']) / n,
                  f'{name}_count': int(n),
                  f'{name}_class_accuracy': (s['class_correct'] / np.maximum(s['class_count'], 1)).tolist()})
      k = self.ds.omitted
      if k >= 0:
        out[f'{name}_omitted_accuracy'] = float(s['class_correct'][k] / max(s['class_count'][k], 1))
        if 'top1_adj' in s:
          out[f'{name}_accuracy_adjusted'] = float(s['top1_adj']) / n
          out[f'{name}_omitted_accuracy_adjusted'] = float(s['class_correct_adj'][k] / max(s['class_count'][k], 1))
    return out


# -------------------------------------------------------------------------------------------------- the run loop
def _meta(cfg, ds, exp: Experiment, step: int, complete: bool) -> dict:
  return {'model': cfg.student.model, 'model_kwargs': config_lib.as_dict(cfg.student.get('kwargs')),
          'num_classes': ds.num_classes, 'subclasses': cfg.student.get('subclasses', 1), 'dataset': ds.name,
          'image_shape': list(ds.image_shape), 'step': int(step), 'epoch': int(step) // exp.steps_per_epoch,
          'total_steps': exp.total_steps, 'complete': bool(complete)}


def _preempted(signum, step) -> Preempted:
  return Preempted(f'stopped by signal {signum} at step {step}; the checkpoint is saved, rerun the same command '
                   'to resume')


def write_config(cfg, workdir: str):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(cfg.to_json_best_effort(indent=2, sort_keys=True))


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `cfg.student` (distilling from `cfg.teacher` when the losses need one); returns the run summary."""
  t_start = time.time()
  reporting.quiet_library_logs()
  workdir = os.path.abspath(os.path.expanduser(workdir))
  write_config(cfg, workdir)
  ds = data_lib.load(cfg.data)
  logging.info('data %s: %d train, %s val, %d test, %d classes, images %s, augment %s', ds.name, len(ds.train),
               len(ds.val) if ds.val is not None else 0, len(ds.test), ds.num_classes, ds.image_shape, ds.augment)
  mesh = sharding.make_mesh(cfg.get('num_devices', 0))
  teacher, teacher_vars = teacher_lib.prepare(cfg, ds, mesh)
  exp = Experiment(cfg, ds, mesh, teacher, teacher_vars)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=cfg.get('keep_checkpoints', 2))
  select = 'val' if ds.val is not None else 'test'
  if select == 'test':
    logging.info('no validation split (data.val_fraction = 0): the best checkpoint is chosen by test accuracy')

  ts = exp.init_state()
  n_params = sum(x.size for x in jax.tree.leaves(ts.params['student']))
  logging.info('student %s: %s parameters; %d steps/epoch, %d epochs, %d steps per dispatch, %d device(s)',
               cfg.student.model, f'{n_params:,}', exp.steps_per_epoch, cfg.epochs, exp.k, mesh.devices.size)
  latest = ckpt.latest_step()
  if latest is not None:
    ts = ckpt.restore(latest, ckpt_lib.abstract(ts))
    logging.info('resuming from the checkpoint at step %d (epoch %d)', latest, latest // exp.steps_per_epoch)
  elif cfg.student.get('init_checkpoint'):
    ts = teacher_lib.init_from_checkpoint(cfg, ds, exp, ts)

  if teacher is not None and latest is None:
    t_acc = teacher_lib.evaluate_teacher(exp)
    logging.info('teacher %s test accuracy %.4f', cfg.teacher.model, t_acc)

  reporter = reporting.Reporter(workdir, cfg.epochs, exp.steps_per_epoch, cfg.get('tensorboard', True))
  stop = {'signal': None}
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
  last_eval = {}
  try:
    step = int(ts.step)
    while step < exp.total_steps:
      epoch, start = divmod(step, exp.steps_per_epoch)
      t0 = time.time()
      pending, sums = [], None
      pos = start
      while pos < exp.steps_per_epoch:
        ts, chunk = exp.train_chunk(ts, epoch, pos)
        pending.append(chunk)
        pos = min(pos + exp.k, exp.steps_per_epoch)
        if len(pending) > 1:  # fetch the previous dispatch's metrics while this one runs
          sums = _accumulate(sums, jax.device_get(pending.pop(0)))
          reporter.progress(epoch, pos - exp.k, sums['loss'] / sums['steps'])
        if stop['signal'] is not None:
          break
      for chunk in pending:
        sums = _accumulate(sums, jax.device_get(chunk))
      step = epoch * exp.steps_per_epoch + pos
      if stop['signal'] is not None and pos < exp.steps_per_epoch:  # stopped mid-epoch
        ckpt.save(step, ts, _meta(cfg, ds, exp, step, False))
        ckpt.wait()
        raise _preempted(stop['signal'], step)
      reporter.progress(epoch, exp.steps_per_epoch)
      epoch_seconds = time.time() - t0
      record = {'train_loss': sums['loss'] / sums['steps'], 'train_accuracy': sums['correct'] / sums['count']}
      record.update({k: sums[k] / sums['steps'] for k in sums if k.startswith('loss_')})
      done = epoch + 1
      is_last = step >= exp.total_steps
      metrics = None
      if done % cfg.get('eval_every_epochs', 1) == 0 or is_last:
        last_eval = exp.evaluate(ts)
        record.update({k: v for k, v in last_eval.items() if not k.endswith(('class_accuracy', '_count'))})
        metrics = {ckpt_lib.SELECT_METRIC: last_eval[f'{select}_accuracy']}
      reporter.epoch(epoch, step, record, epoch_seconds, int(sums['count']))
      if done % cfg.get('checkpoint_every_epochs', 1) == 0 or is_last or stop['signal'] is not None:
        ckpt.save(step, ts, _meta(cfg, ds, exp, step, is_last), metrics)
      if stop['signal'] is not None and not is_last:
        ckpt.wait()
        raise _preempted(stop['signal'], step)
    ckpt.wait()
    if not last_eval:  # the run was already complete: report from the final state
      last_eval = exp.evaluate(ts)
    exported = {}
    for export in exp.distiller.exports:
      exported.update(export(exp, ts, workdir))
    summary = _summary(workdir, select, last_eval, time.time() - t_start, ckpt, exported)
    reporter.write({'summary': summary})
    logging.info('done: last %s acc %.4f, best %s acc %.4f (step %s), test acc %.4f, wall time %.1fs',
                 select, summary['last_select_accuracy'], select, summary['best_select_accuracy'],
                 summary['best_step'], summary['test_accuracy'], summary['wall_seconds'])
    if 'test_omitted_accuracy' in summary:
      logging.info('omitted class %d: test acc %.4f; with its bias raised by %g: %.4f (overall %.4f)', ds.omitted,
                   summary['test_omitted_accuracy'], cfg.distill.omitted.bias,
                   summary.get('test_omitted_accuracy_adjusted', float('nan')),
                   summary.get('test_accuracy_adjusted', float('nan')))
    summary['state'] = ts
    summary['experiment'] = exp
    return summary
  finally:
    signal.signal(signal.SIGTERM, previous)
    reporter.close()
    ckpt.close()


def _accumulate(sums, new):
  new = {k: float(v) for k, v in new.items()}
  return new if sums is None else {k: sums[k] + new[k] for k in sums}


def _summary(workdir, select, last_eval, wall, ckpt, extra) -> dict:
  best_step = ckpt.best_step()
  best = ckpt.manager.metrics(best_step)[ckpt_lib.SELECT_METRIC] if best_step is not None else None
  summary = {'select_split': select, 'last_select_accuracy': last_eval[f'{select}_accuracy'],
             'best_select_accuracy': best if best is not None else last_eval[f'{select}_accuracy'],
             'best_step': best_step, **{k: v for k, v in last_eval.items() if k.startswith('test_')},
             'wall_seconds': wall, **extra}
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  return summary
