"""The pure train and eval steps of the S students of a sweep (a single run is S = 1), as functions of arrays.

`train_step(parts, state, teacher_vars, batch, hparams, keys)` is one step: normalise the batch (uint8 images, or
images already normalised), run the teacher once (eval mode, stop_gradient; its variables are an argument, never
donated, never in the optimizer; or read its outputs from a table computed once), then for every student (vmapped
or unrolled): the student forward (+ the methods' extra modules), every loss term, value_and_grad over the trainable
tree, the optax update, the non-finite guard. It is a pure function of (state, teacher variables, batch, hyper-
parameters, keys): the batch may come from anywhere (the device-resident training set, the streamed loader,
a notebook, another framework's loader: kdjax/api.py). `Parts` holds what is static: the modules, the distiller,
the config, the dataset's shape and statistics.

Several teachers (`config.teachers`) are a `teacher.TeacherGroup`: their variables a tuple, their outputs a tuple,
combined into the terms' teacher by `teacher.combine`. A method may read extra views of the batch (MLKD's strong
view: `distill.View`): the batch carries them under 'views', made by whoever made the batch. With
`optimizer.name = 'dot'` the step takes the task and distillation gradients from one forward pass (`jax.vjp`, two
cotangents) and DOT's two momentum buffers combine them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from kdjax import distill
from kdjax import optim
from kdjax import stages
from kdjax import sweep as sweep_lib
from kdjax import teacher as teacher_lib
from kdjax import views as views_lib
from kdjax.data import device as device_data


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # shared by every student
  params: Any      # [S, ...] {'student': ..., 'extras': ...}: everything the optimizer updates
  state: Any       # [S, ...] {'student': {'batch_stats': ...}, 'extras': {...}}: non-trained collections
  opt_state: Any   # [S, ...]


@flax.struct.dataclass
class TableState:
  """The train state of a program of several student groups (a table: methods x student architectures,
  kdjax/sweep.py `Group`): one TrainState per group, their step counters advancing together."""
  groups: tuple

  @property
  def step(self):
    return self.groups[0].step


def student(ts: TrainState, i: int) -> TrainState:
  """Student `i` of a (stacked) train state, without the students axis."""
  return ts.replace(params=jax.tree.map(lambda a: a[i], ts.params), state=jax.tree.map(lambda a: a[i], ts.state),
                    opt_state=jax.tree.map(lambda a: a[i], ts.opt_state))


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What the step needs to know of a dataset (not its examples)."""
  num_classes: int
  image_shape: tuple
  mean: tuple
  std: tuple
  num_train: int      # CRD's memory banks hold a row per training example
  omitted: int = -1   # the class the omitted-class experiment leaves out, or -1

  @classmethod
  def of(cls, ds) -> 'DataSpec':
    return cls(ds.num_classes, tuple(ds.image_shape), tuple(ds.mean), tuple(ds.std), len(ds.train), ds.omitted)


@dataclasses.dataclass(frozen=True, eq=False)
class Parts:
  """The static half of the step: everything but arrays. Built once per program (kdjax/trainer.py, kdjax/api.py)."""
  cfg: Any                  # the sweep's base config (a student's swept fields are read through `view`)
  student: Any              # the student's Linen module
  teacher: Any              # the teacher's module, a teacher.TeacherGroup, or None
  distiller: distill.Distiller
  data: DataSpec
  batch_size: int
  steps_per_epoch: int
  students_loop: str = 'vmap'   # 'vmap' | 'unroll' (map_students)
  batch_sharding: Any = None    # the batch's sharding inside jit (None: left to XLA)
  table: Any = None             # teacher_table.Layout of the cached teacher outputs, replay.StoreLayout, or None

  @property
  def dtype(self):
    from kdjax import models
    return models.compute_dtype(self.cfg)

  @property
  def init_steps(self) -> int:  # the pre-training stage (kdjax/stages.py), if any
    return stages.steps(self.cfg, self.steps_per_epoch)

  def view(self, hp) -> sweep_lib.View:
    """The config as one student reads it inside the step: its swept fields are the arrays in `hp`."""
    return sweep_lib.view(self.cfg, hp)

  def optimizer(self, hp) -> optax.GradientTransformation:
    return optim.optimizer(self.view(hp), self.steps_per_epoch)


def seed_key(seed, stream: int):
  """Separate streams of one seed: 0 the data order, 1 the augmentation, 2 the initialisation, 3 the per-step
  randomness (dropout, sampling), 4 and up the extra views' augmentation."""
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


def normalize(images, data: DataSpec, dtype):
  """uint8 images scaled to [0, 1] and standardised by the dataset's statistics; other images are taken as already
  normalised (a user's batch) and only cast."""
  if images.dtype != jnp.uint8:
    return images.astype(dtype)
  return device_data.normalize(images, data.mean, data.std, dtype)


def teacher_input(parts: Parts, x):
  """The batch as the teachers read it: resized on the device to `teacher.image_size` (bilinear, antialiased when
  shrinking) when that is set, else `x` itself."""
  size = parts.cfg.teacher.image_size
  if not size or tuple(x.shape[1:3]) == (size, size):
    return x
  return jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), 'linear', antialias=True).astype(x.dtype)


def views_rng(parts: Parts, step):
  """The key of step `step`'s consistent views (kdjax/views.py): the data seed's stream `views.STREAM`, shared by
  every student."""
  seed = parts.cfg.data.seed if parts.cfg.data.seed >= 0 else parts.cfg.seed
  return jax.random.fold_in(seed_key(seed, views_lib.STREAM), step)


def _constrain(parts: Parts, x):
  return x if parts.batch_sharding is None else jax.lax.with_sharding_constraint(x, parts.batch_sharding)


# ------------------------------------------------------------------------------------------------------------ init
def dummy_input(parts: Parts):
  return jnp.zeros((parts.batch_size,) + tuple(parts.data.image_shape), parts.dtype)


def build_extras(parts: Parts, teacher_vars):
  """The methods' extra modules, sized by the networks' output shapes (traced, not computed)."""
  x = dummy_input(parts)
  s_shapes = jax.eval_shape(lambda: parts.student.apply(parts.student.init(jax.random.key(0), x), x))
  t_shapes = None
  if parts.teacher is not None:
    t_shapes = jax.eval_shape(lambda v: parts.distiller.term_teachers(
        *teacher_lib.combine(parts.cfg, parts.teacher, parts.teacher.apply(v, teacher_input(parts, x)))),
        teacher_vars)
  info = distill.DataInfo(parts.data.num_train, parts.data.num_classes, parts.student,
                          teacher_lib.module0(parts.teacher), parts.cfg.student.model, parts.cfg.teacher.model)
  return parts.distiller.build_extras(s_shapes, t_shapes, info)


def init_state(parts: Parts, init_keys, hparams, teacher_vars) -> TrainState:
  """The initial state of every student: `init_keys` [S] (from each student's seed), `hparams` {path: [S]}."""
  extras = build_extras(parts, teacher_vars)
  x = dummy_input(parts)

  def one(key, hp):
    k_s, k_e = jax.random.split(key)
    s_vars = parts.student.init(k_s, x)
    params = {'student': s_vars['params'], 'extras': {}}
    state = {'student': {k: v for k, v in s_vars.items() if k != 'params'}, 'extras': {}}
    if extras is not None:
      s_out = parts.student.apply(s_vars, x)
      t_out = parts.teacher.apply(teacher_vars, teacher_input(parts, x)) if parts.teacher is not None else None
      t_out = parts.distiller.term_teachers(*teacher_lib.combine(parts.cfg, parts.teacher, t_out))
      e_vars = extras.init({'params': k_e, 'memory': k_e}, s_out, t_out,
                           labels=jnp.zeros((x.shape[0],), jnp.int32), indices=jnp.zeros((x.shape[0],), jnp.int32),
                           train=False, **extras_inputs(parts, teacher_vars, s_vars['params']))
      params['extras'] = e_vars.get('params', {})
      state['extras'] = {k: v for k, v in e_vars.items() if k != 'params'}
    return params, state, parts.optimizer(hp).init(params)

  params, state, opt_state = jax.vmap(one)(init_keys, hparams)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, state=state, opt_state=opt_state)


# --------------------------------------------------------------------------------------------------------- forward
def extras_inputs(parts: Parts, teacher_vars, student_params) -> dict:
  """The networks the extra modules may call: the teacher's head, teacher 0's variables (methods that read them
  keep teacher 0: `Method.teacher0_network`) and the student's head."""
  classify = None
  if parts.teacher is not None:
    classify = lambda emb: parts.teacher.apply(teacher_vars, emb, method='classify')
  teacher0 = teacher_vars[0] if isinstance(parts.teacher, teacher_lib.TeacherGroup) else teacher_vars
  return {'teacher_classify': classify, 'teacher_variables': teacher0,
          'student_classify': lambda emb: parts.student.apply({'params': student_params}, emb, method='classify')}


def forward(parts: Parts, params, state, teacher_vars, x, y, idx, rng, train: bool, epoch, t_out=None, cfg=None,
            views=None, t_views=None, targets=None):
  """One student's forward (+ extras): (Context, new non-trained state). `t_out`: the teacher's outputs (shared
  by the students; None: computed here); `cfg`: the config as this student reads it; `views` / `t_views`: the batch's extra views
  and the teacher's outputs on them ({'strong': ...} for MLKD), or None; `targets`: the mixed soft targets of a
  mixup/cutmix batch (kdjax/views.py), or None."""
  cfg = parts.cfg if cfg is None else cfg
  if t_out is None:
    t_out = teacher_outputs(parts, teacher_vars, x)
  t_default, t_all = teacher_lib.combine(parts.cfg, parts.teacher, t_out)
  drop_rng, extra_drop_rng, sample_rng = jax.random.split(rng, 3)
  mutable = list(state['student']) if train else False
  s_res = parts.student.apply({'params': params['student'], **state['student']}, x, train=train,
                              mutable=mutable, rngs={'dropout': drop_rng})
  s_out, s_new = s_res if train else (s_res, state['student'])
  view_outs = {}
  for i, name in enumerate(sorted(views or {})):  # after the batch itself, BatchNorm statistics updated by each
    s_res = parts.student.apply({'params': params['student'], **s_new}, views[name], train=train,
                                mutable=mutable, rngs={'dropout': jax.random.fold_in(drop_rng, i + 1)})
    s_view, s_new = s_res if train else (s_res, s_new)
    view_outs[name] = (s_view, teacher_lib.combine(parts.cfg, parts.teacher, t_views[name])[0])
  extras_out, e_new = {}, state['extras']
  if parts.distiller.extras is not None:
    e_mutable = list(state['extras']) if train else False
    res = parts.distiller.extras.apply(
        {'params': params['extras'], **state['extras']}, s_out, parts.distiller.term_teachers(t_default, t_all),
        labels=y, indices=idx, train=train, **extras_inputs(parts, teacher_vars, params['student']),
        mutable=e_mutable, rngs={'dropout': extra_drop_rng, 'sample': sample_rng})
    extras_out, e_new = res if train else (res, state['extras'])
  ctx = distill.Context(student=s_out, teacher=t_default, labels=y, extras=extras_out, epoch=epoch,
                        teachers=t_all, views=view_outs or None, targets=targets)
  return ctx, {'student': dict(s_new), 'extras': dict(e_new)}


def teacher_outputs(parts: Parts, teacher_vars, x, idx=None, table=None, step=None):
  """The teachers' outputs on `x`, once for every student: their forward pass in eval mode under stop_gradient,
  the rows `idx` of the cached `table` (kdjax/teacher_table.py) or row `step` of the replay store
  (kdjax/replay.py)."""
  if parts.teacher is None:
    return None
  if table is not None:
    return parts.table.gather(table, idx, step)
  return jax.lax.stop_gradient(parts.teacher.apply(teacher_vars, teacher_input(parts, x), train=False))


# ----------------------------------------------------------------------------------------------------------- train
def _progress(parts: Parts, step):
  """Fractional epochs done at `step`, for the methods' warmups (Context.epoch)."""
  epoch, step_in_epoch = step // parts.steps_per_epoch, step % parts.steps_per_epoch
  return epoch + step_in_epoch.astype(jnp.float32) / parts.steps_per_epoch


def batch_teacher_outputs(parts: Parts, teacher_vars, batch: dict, step, table=None):
  """(normalised images, mixed soft targets or None, the teachers' outputs on the images, {view: (normalised view,
  the teachers' outputs)}) of step `step`'s batch: the batch's part of a step, with its consistent views
  (kdjax/views.py), computed once for every student (of every group of a table)."""
  x = _constrain(parts, normalize(batch['images'], parts.data, parts.dtype))
  y = batch['labels'].astype(jnp.int32)
  targets = None
  if views_lib.enabled(parts.cfg.data):
    x, targets = views_lib.apply(parts.cfg.data, views_rng(parts, step), x, y, parts.data.num_classes,
                                 parts.data.mean, parts.data.std)
    x = _constrain(parts, x)
  idx = batch['indices'].astype(jnp.int32) if batch.get('indices') is not None else y
  t_out = teacher_outputs(parts, teacher_vars, x, idx, table, step)
  views = {}
  for name, v in (batch.get('views') or {}).items():
    v = _constrain(parts, normalize(v, parts.data, parts.dtype))
    views[name] = (v, teacher_outputs(parts, teacher_vars, v))
  return x, targets, t_out, views


def train_step(parts: Parts, ts: TrainState, teacher_vars, batch: dict, hparams: dict, keys, table=None,
               teacher_out=None):
  """One step of every student on `batch` = {'images' [B, H, W, C] uint8 (normalised here) or float (already
  normalised), 'labels' [B] int, 'indices' [B] int (the examples' rows in the training set: CRD's memory banks, the
  teacher table), 'views' {name: images} (the extra views the methods read)}. `hparams`: {path: [S]} the swept
  numbers; `keys`: [S] per-student keys (folded with the step); `teacher_out`: `batch_teacher_outputs` of the
  batch when computed already (a table's groups share it; its views those of this group's methods). Returns
  (state, metrics [S]). The consistent views (`config.data.mixup`, ...: kdjax/views.py) are made once, from the
  data seed and the step: the teacher and every student read the same pixels."""
  y = batch['labels'].astype(jnp.int32)
  idx = batch['indices'].astype(jnp.int32) if batch.get('indices') is not None else y
  # Once, shared by every student.
  x, targets, t_out, both = (batch_teacher_outputs(parts, teacher_vars, batch, ts.step, table) if teacher_out is None
                             else teacher_out)
  views = {name: v for name, (v, _) in both.items()}
  t_views = {name: t for name, (_, t) in both.items()}
  progress = _progress(parts, ts.step)

  def one(params, state, opt_state, hp, key):
    return _student_step(parts, ts.step, params, state, opt_state, hp, jax.random.fold_in(key, ts.step),
                         teacher_vars, x, y, idx, t_out, views, t_views, progress, targets)

  params, state, opt_state, metrics = map_students(one, parts.students_loop, ts.params, ts.state, ts.opt_state,
                                                   hparams, keys)
  # Per-step sums over a dispatch; loss terms are batch means, so they are weighted per step, not per example.
  return TrainState(ts.step + 1, params, state, opt_state), metrics


def _student_step(parts, step, params, state, opt_state, hp, rng, teacher_vars, x, y, idx, t_out, views, t_views,
                  progress, targets=None):
  cfg = parts.view(hp)
  in_stage = step < parts.init_steps
  dot = parts.cfg.optimizer.name == 'dot'
  if parts.init_steps:  # the main stage starts with fresh moments, as the reference's fresh optimizer
    opt_state = stages.restart_moments(opt_state, parts.optimizer(hp).init(params), step == parts.init_steps)

  def loss_fn(params):
    ctx, new_state = forward(parts, params, state, teacher_vars, x, y, idx, rng, True, progress, t_out, cfg,
                             views, t_views, targets)
    weights = stages.loss_weights(cfg.distill, parts.distiller.terms, in_stage) if parts.init_steps else None
    total, terms = parts.distiller.losses(ctx, cfg.distill, weights)
    if dot:  # DOT: the task and the distillation parts of the loss, differentiated separately
      w = cfg.distill.losses if weights is None else weights
      task = sum((w.get(n, 0.0) * terms[n] for n in terms if n in optim.DOT_TASK_TERMS), jnp.float32(0))
      total = jnp.stack([task, total - task])
    return total, (terms, parts.distiller.logits(ctx), new_state)

  if dot:  # one forward pass, two backward passes through its linearisation
    parts_, vjp, (terms, logits, new_state) = jax.vjp(loss_fn, params, has_aux=True)
    grads = tuple(vjp(jnp.eye(2, dtype=parts_.dtype)[i])[0] for i in range(2))
    total = jnp.sum(parts_)
  else:
    (total, (terms, logits, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, new_opt_state = parts.optimizer(hp).update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  if stages.needed(parts.cfg):  # what the current stage does not train keeps its parameters and statistics
    masks = stages.Masks(parts.cfg, params, tuple(parts.distiller.terms))
    new_params, new_state = masks.params(new_params, params, in_stage), masks.state(new_state, state, in_stage)
  # The non-finite guard, in the step (no extra host sync): a step whose loss or gradient is not finite changes
  # nothing, and says so in its metrics, which the host reads a dispatch later.
  grads_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
  finite = jnp.isfinite(total) & grads_finite
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  metrics = {'loss': total, 'correct': jnp.sum(jnp.argmax(logits, -1) == y).astype(jnp.float32),
             'count': jnp.float32(y.shape[0]), 'nonfinite': 1.0 - finite.astype(jnp.float32),
             'grad_nonfinite': 1.0 - grads_finite.astype(jnp.float32),
             **{f'loss_{k}': v for k, v in terms.items()}}
  return keep(new_params, params), keep(new_state, state), keep(new_opt_state, opt_state), metrics


# ------------------------------------------------------------------------------------------------------------ eval
def eval_step(parts: Parts, ts: TrainState, teacher_vars, batch: dict, hparams: dict) -> dict:
  """Per student [S], the sums over `batch` = {'images', 'labels', 'mask' (optional: padding rows 0)}: 'loss'
  (cross-entropy), 'top1', 'top5', 'count', 'class_correct' and 'class_count' [S, classes]; with a teacher
  `teacher_agreement`'s sums; with a distillation token 'top1_cls' and 'top1_dist' (each head alone); in an
  omitted-class run the bias-adjusted 'top1_adj', 'class_correct_adj'."""
  num_classes = parts.data.num_classes
  top_k = min(5, num_classes)
  omitted = parts.data.omitted
  adjust = parts.cfg.distill.omitted.bias if omitted >= 0 else 0.0
  x = _constrain(parts, normalize(batch['images'], parts.data, parts.dtype))
  y = batch['labels'].astype(jnp.int32)
  mask = batch['mask'].astype(jnp.float32) if batch.get('mask') is not None else jnp.ones(y.shape, jnp.float32)
  t_out = teacher_outputs(parts, teacher_vars, x)  # once, shared by every student

  def one(params, state, hp):
    ctx, _ = forward(parts, params, state, teacher_vars, x, y, y, jax.random.key(0), False, 0.0, t_out,
                     parts.view(hp))
    logits = parts.distiller.logits(ctx)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    top1 = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    top5 = jnp.any(jax.lax.top_k(logits, top_k)[1] == y[:, None], axis=-1).astype(jnp.float32)
    onehot = jax.nn.one_hot(y, num_classes) * mask[:, None]
    sums = {'loss': jnp.sum(nll * mask), 'top1': jnp.sum(top1 * mask), 'top5': jnp.sum(top5 * mask),
            'count': jnp.sum(mask), 'class_correct': onehot.T @ top1, 'class_count': jnp.sum(onehot, 0)}
    if t_out is not None:  # agreement with the teacher (the ensemble's, with several teachers)
      sums.update(teacher_agreement(logits, teacher_lib.combine(parts.cfg, parts.teacher, t_out)[0].logits, mask,
                                    top_k))
    if ctx.student.dist_logits is not None:  # DeiT: each head alone (`logits` is their average)
      for name, head in (('top1_cls', ctx.student.cls_logits), ('top1_dist', ctx.student.dist_logits)):
        sums[name] = jnp.sum((jnp.argmax(head, -1) == y).astype(jnp.float32) * mask)
    if adjust:
      adjusted = logits.at[:, omitted].add(adjust)
      top1_adj = (jnp.argmax(adjusted, -1) == y).astype(jnp.float32)
      sums.update(top1_adj=jnp.sum(top1_adj * mask), class_correct_adj=onehot.T @ top1_adj)
    return sums

  return map_students(one, parts.students_loop, ts.params, ts.state, hparams)


def teacher_agreement(logits, t_logits, mask, top_k: int = 5) -> dict:
  """Sums over the rows of `mask` of how the student follows its teacher: 'agree' (the same top-1 class),
  'agree5' (the teacher's top-1 class among the student's top `top_k`) and 'kl' (KL(p_teacher || p_student) at
  temperature 1, in nats)."""
  t_top1 = jnp.argmax(t_logits, -1)
  agree = (jnp.argmax(logits, -1) == t_top1).astype(jnp.float32)
  agree5 = jnp.any(jax.lax.top_k(logits, top_k)[1] == t_top1[:, None], axis=-1).astype(jnp.float32)
  log_t = jax.nn.log_softmax(t_logits.astype(jnp.float32), -1)
  kl = jnp.sum(jnp.exp(log_t) * (log_t - jax.nn.log_softmax(logits.astype(jnp.float32), -1)), -1)
  return {'agree': jnp.sum(agree * mask), 'agree5': jnp.sum(agree5 * mask), 'kl': jnp.sum(kl * mask)}


def eval_scan(parts: Parts, ts: TrainState, teacher_vars, batches: dict, hparams: dict) -> dict:
  """`eval_step`'s sums over batches stacked on a leading axis ([N, B, ...]), in one program."""
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
      lambda b: eval_step(parts, ts, teacher_vars, b, hparams), jax.tree.map(lambda a: a[0], batches)))
  return jax.lax.scan(lambda sums, b: (jax.tree.map(jnp.add, sums, eval_step(parts, ts, teacher_vars, b, hparams)),
                                       None), zeros, batches)[0]
