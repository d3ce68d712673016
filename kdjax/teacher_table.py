"""The teachers' outputs cached for the whole training set (`distill.cache_teacher`): when the training images are
not augmented, the teacher sees the same image every epoch, so its outputs are computed once and each step gathers
its rows by the examples' indices instead of running the teacher. Only the output arrays the losses read are kept.
"""

from __future__ import annotations

import dataclasses
import functools

from absl import logging
import jax
import jax.numpy as jnp

from kdjax import memory
from kdjax import step as step_lib
from kdjax import teacher as teacher_lib
from kdjax import views as views_lib
from kdjax.errors import ConfigError

# Teacher outputs cached on the device for the whole training set only below this size ('auto').
LIMIT_BYTES = 2 << 30


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
  """The table's structure: the teachers' output tree, each leaf's per-example shape, and which leaves are kept."""
  treedef: object
  shapes: tuple   # jax.ShapeDtypeStruct per leaf, without the examples axis
  read: tuple     # bool per leaf: kept (a loss reads it)

  def gather(self, table, idx, step=None):
    """The teachers' outputs for the examples `idx` (`step`: unused); the arrays no loss reads are zeros of their
    shape (dropped by XLA)."""
    del step
    leaves = [jnp.zeros((idx.shape[0],) + s.shape, s.dtype) if a is None else a[idx]
              for a, s in zip(table, self.shapes)]
    return jax.tree.unflatten(self.treedef, leaves)


def _trace_losses(parts: step_lib.Parts, teacher_vars, hparams):
  """(the jaxpr of one step's loss terms {term: value} as a function of the teachers' output leaves first, the number
  of those leaves): traced once on abstract values."""
  x = step_lib.dummy_input(parts)
  hp = {k: jax.ShapeDtypeStruct((), jnp.asarray(v).dtype) for k, v in hparams.items()}
  t_out = jax.eval_shape(lambda v: parts.teacher.apply(v, step_lib.teacher_input(parts, x)), teacher_vars)
  t_leaves, treedef = jax.tree.flatten(t_out)
  init_keys = jax.ShapeDtypeStruct((1,), jax.eval_shape(lambda: jax.random.key(0)).dtype)
  ts = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), jax.eval_shape(
      functools.partial(step_lib.init_state, parts), init_keys,
      {k: jax.ShapeDtypeStruct((1,), v.dtype) for k, v in hp.items()}, teacher_vars))
  y = jnp.zeros((x.shape[0],), jnp.int32)
  views = parts.distiller.views

  def loss(t_leaves, params, state, hp, teacher_vars):
    t_out = jax.tree.unflatten(treedef, t_leaves)
    ctx, _ = step_lib.forward(parts, params, state, teacher_vars, x, y, y, jax.random.key(0), True, 0.0, t_out,
                              parts.view(hp), {v: x for v in views}, {v: t_out for v in views})
    return parts.distiller.losses(ctx, parts.view(hp).distill)

  return jax.make_jaxpr(loss)(t_leaves, ts.params, ts.state, hp, teacher_vars).jaxpr, len(t_leaves)


def leaves_read(parts: step_lib.Parts, teacher_vars, hparams) -> list[bool]:
  """Which arrays of the teachers' output (their ModelOutputs' leaves) one training step reads: traced once on
  abstract values, an input the step's computation never uses is not read (features that no loss taps)."""
  jaxpr, n = _trace_losses(parts, teacher_vars, hparams)
  used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars} | {id(v) for v in jaxpr.outvars}
  return [id(v) in used for v in jaxpr.invars[:n]]


def leaves_read_by_term(parts: step_lib.Parts, teacher_vars, hparams) -> dict[str, list[bool]]:
  """`leaves_read` per loss term: the teachers' output leaves each term's value depends on (followed back through
  the traced step; a nested call counts all its inputs)."""
  jaxpr, n = _trace_losses(parts, teacher_vars, hparams)
  names = sorted(parts.distiller.terms)  # the terms dict's leaves, in jax's (sorted) order
  out = {}
  for name, var in zip(names, jaxpr.outvars[-len(names):]):
    live = {id(var)}
    for eqn in reversed(jaxpr.eqns):
      if any(id(o) in live for o in eqn.outvars):
        live |= {id(v) for v in eqn.invars}
    out[name] = [id(v) in live for v in jaxpr.invars[:n]]
  return out


def plan(parts: step_lib.Parts, teacher_vars, hparams, augment: str, streaming: bool) -> Layout | None:
  """The table's layout when the teachers' outputs can stand in for their forward pass (a teacher, un-augmented
  training images on the device, `distill.cache_teacher` not 'off', the table small enough under 'auto'); None
  otherwise."""
  mode = parts.cfg.distill.cache_teacher
  if parts.teacher is None or mode == 'off':
    return None
  if streaming:
    logging.info("teacher outputs not cached (distill.cache_teacher): data.pipeline='stream' gives no example "
                 'indices to a fixed table; the teacher runs every step')
    return None
  if views_lib.enabled(parts.cfg.data):  # validate.py refuses cache_teacher='on' with them
    logging.info('teacher outputs not cached (distill.cache_teacher): the consistent views (data.mixup, cutmix, '
                 'erasing, inception_crop, randaugment) change every batch; the teacher runs every step')
    return None
  if augment != 'none':
    if mode == 'on':
      raise ConfigError(f'distill.cache_teacher=on needs un-augmented training images, but data.augment is '
                        f'{augment!r}')
    return None
  n = parts.data.num_train
  shape = teacher_lib.input_shape(parts.cfg, parts.data.image_shape)
  one = jax.eval_shape(lambda v: parts.teacher.apply(v, jnp.zeros((1,) + shape, parts.dtype)), teacher_vars)
  leaves, treedef = jax.tree.flatten(one)
  read = leaves_read(parts, teacher_vars, hparams)
  size = sum(memory.tree_bytes(l) for l, r in zip(leaves, read) if r) * n
  if mode == 'auto' and size > LIMIT_BYTES:
    logging.info('the teacher outputs the losses read would take %.1f MiB for the %d training images: not cached '
                 '(limit %.0f MiB)', size / 2**20, n, LIMIT_BYTES / 2**20)
    return None
  logging.info('teacher outputs cached for the %d training images (%s: %.1f MiB): one teacher pass for the run',
               n, f'{sum(read)} of {len(read)} output arrays, the ones the losses read', size / 2**20)
  return Layout(treedef, tuple(jax.ShapeDtypeStruct(l.shape[1:], l.dtype) for l in leaves), tuple(read))


def compute(parts: step_lib.Parts, layout: Layout, teacher_vars, arrays):
  """The table: the teachers' kept outputs for every training example, [N, ...] per leaf (None where not kept),
  from the padded training arrays [batches, B, ...] (`data.device.padded_eval_arrays`). Abstract in, abstract out
  (tracing a config)."""
  n = parts.data.num_train

  def table(teacher_vars, arrays):
    def body(_, batch):
      x = step_lib.normalize(batch['images'], parts.data, parts.dtype)
      out = jax.tree.leaves(parts.teacher.apply(teacher_vars, step_lib.teacher_input(parts, x), train=False))
      return None, [l if r else None for l, r in zip(out, layout.read)]
    out = jax.lax.scan(body, None, arrays)[1]
    return [None if a is None else a.reshape((-1,) + a.shape[2:])[:n] for a in out]

  if any(isinstance(v, jax.ShapeDtypeStruct) for v in jax.tree.leaves(teacher_vars)):
    return jax.eval_shape(table, teacher_vars, arrays)
  return jax.jit(table)(teacher_vars, arrays)
