"""The frozen teacher: restore it from a checkpoint (checking it is the configured network), or train and cache it.

The teacher's variables are passed to the jitted step as an argument: never donated, never in the optimizer, used
in eval mode under stop_gradient.
"""

from __future__ import annotations

import os

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from kdjax import checkpoint as ckpt_lib
from kdjax import models
from kdjax.config_lib import as_dict
from kdjax.errors import CheckpointMismatchError, CheckpointNotFoundError


def teacher_num_classes(cfg, num_classes: int) -> int:
  return num_classes * cfg.teacher.get('subclasses', 1)


def cache_dir(cfg, dataset: str) -> str:
  root = os.path.expanduser(cfg.teacher.get('cache_dir') or '~/.cache/kdjax/teachers')
  return os.path.join(root, f"{dataset}-{cfg.teacher.model}-seed{cfg.teacher.get('seed', 0)}")


def teacher_run_config(cfg) -> ml_collections.ConfigDict:
  """The config that trains the teacher: the run's own config, overridden by `cfg.teacher.recipe`."""
  t = ml_collections.ConfigDict(cfg.to_dict())
  for key, value in as_dict(cfg.teacher.get('recipe')).items():
    if isinstance(value, dict) and key in t and isinstance(t[key], ml_collections.ConfigDict):
      t[key].update(value)
    else:
      t[key] = value
  t.seed = cfg.teacher.get('seed', 0)
  t.student = ml_collections.ConfigDict({'model': cfg.teacher.model, 'kwargs': as_dict(cfg.teacher.get('kwargs')),
                                         'init_checkpoint': cfg.teacher.get('init_checkpoint', '')})
  t.teacher = ml_collections.ConfigDict({'model': ''})
  t.distill.losses = ml_collections.ConfigDict(as_dict(cfg.teacher.get('losses')) or {'ce': 1.0})
  if 'omit_class' in t.data:
    t.data.omit_class = -1  # the omitted-class experiment hides a class from the student's transfer set only
  return t


def check_meta(meta: dict, path: str, model: str, num_classes: int):
  if meta.get('model') != model:
    raise CheckpointMismatchError(f"teacher checkpoint {path} holds a {meta.get('model')!r} network, but "
                               f'config.teacher.model is {model!r}')
  if meta.get('num_classes') != num_classes:
    raise CheckpointMismatchError(f"teacher checkpoint {path} has {meta.get('num_classes')} classes, but the "
                               f'dataset and config need {num_classes}')


def prepare(cfg, ds, mesh):
  """Returns (teacher module, replicated teacher variables), or (None, None) when the config has no teacher."""
  if not cfg.teacher.get('model'):
    return None, None
  from kdjax import sharding, train  # train imports this module
  num_classes = teacher_num_classes(cfg, ds.num_classes)
  teacher = models.create(cfg.teacher.model, num_classes=num_classes, dtype=train.compute_dtype(cfg),
                          **as_dict(cfg.teacher.get('kwargs')))
  path = cfg.teacher.get('checkpoint') or ''
  if not path:
    path = cache_dir(cfg, ds.name)
    done = False
    try:
      done = ckpt_lib.read_meta(path).get('complete', False)
    except CheckpointNotFoundError:
      pass
    if done:
      logging.info('teacher: reusing the cached %s at %s', cfg.teacher.model, path)
    else:
      logging.info('teacher: config.teacher.checkpoint is empty; training %s first, cached at %s',
                   cfg.teacher.model, path)
      train.train_and_evaluate(teacher_run_config(cfg), path)
  meta = ckpt_lib.read_meta(path)
  check_meta(meta, path, cfg.teacher.model, num_classes)
  x = jnp.zeros((1,) + tuple(ds.image_shape), jnp.float32)
  shapes = jax.eval_shape(lambda: teacher.init(jax.random.key(0), x))
  rep = sharding.replicated(mesh)
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), shapes)
  variables, _ = ckpt_lib.load_model(path, target, cfg.teacher.get('which', 'latest'))
  logging.info('teacher: %s restored from %s (step %s)', cfg.teacher.model, path, meta.get('step'))
  return teacher, variables


def init_from_checkpoint(cfg, ds, exp, ts):
  """Fine-tuning: start the student from a run's checkpoint. The head is kept when the class counts agree, else
  re-initialised; `student.freeze_backbone` is applied by the optimizer."""
  path = cfg.student.init_checkpoint
  meta = ckpt_lib.read_meta(path)
  if meta.get('model') != cfg.student.model:
    raise CheckpointMismatchError(f"init checkpoint {path} holds a {meta.get('model')!r} network, but "
                               f'config.student.model is {cfg.student.model!r}')
  target = {'params': ts.params['student'], **ts.state['student']}
  if meta.get('num_classes') != ds.num_classes:
    target['params'] = {k: v for k, v in target['params'].items() if k != 'head'}
  restored, _ = ckpt_lib.load_model(path, ckpt_lib.abstract(target))
  params = dict(ts.params, student=dict(ts.params['student'], **restored['params']))
  state = dict(ts.state, student={k: restored[k] for k in ts.state['student']})
  logging.info('student initialised from %s (%s)', path,
               'all weights' if 'head' in restored['params'] else 'backbone; new head')
  return ts.replace(params=params, state=state, opt_state=exp.tx.init(params))


def evaluate_teacher(exp) -> float:
  """The teacher's own test accuracy, a check that the right network was restored."""
  from kdjax.data import device as device_data

  @jax.jit
  def run(teacher_vars, arrays):
    def body(correct, batch):
      x = device_data.normalize(batch['images'], exp.ds.mean, exp.ds.std, exp.dtype)
      logits = exp.teacher.apply(teacher_vars, x, train=False).logits
      per_class = exp.cfg.teacher.get('subclasses', 1)
      if per_class > 1:
        logits = jax.nn.logsumexp(logits.reshape(logits.shape[0], -1, per_class), -1)
      hit = (jnp.argmax(logits, -1) == batch['labels']) & batch['mask']
      return correct + jnp.sum(hit), None
    return jax.lax.scan(body, jnp.int32(0), arrays)[0]

  arrays = exp.eval_sets['test']
  return float(run(exp.teacher_vars, arrays)) / float(arrays['mask'].sum())
