"""Small configs shared by the tests: one student shape and few distinct programs, so compilations are shared."""

import importlib.util
import os

import ml_collections
import numpy as np

from kdjax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# LLVM at -O0 for every test program, in this process (conftest.py) and in the launch.py subprocesses: the programs
# are tiny and compiled once each, so compiling them, not running them, is the tests' cost (tests/test_sweep.py +
# test_methods_nst_cc_fsp_ab_ft_kdsvd.py: 191 s -> 121 s). Code generation only: every comparison a test makes is
# between runs at the same level, or against NumPy at a tolerance.
FAST_COMPILE = '--xla_backend_optimization_level=0'

FASHION_MNIST = '/usr/share/datasets/fashion-mnist'  # Debian's dataset-fashion-mnist


def real_data(path: str = FASHION_MNIST, package: str = 'dataset-fashion-mnist') -> str:
  """`path` when it exists; else the calling test skips, saying which Debian package provides it. Under CI=true
  (.ci/run sets it) a missing real data set fails the test instead: CI must run every real-data test."""
  import os
  import pytest
  if os.path.isdir(path):
    return path
  reason = f'{path} is missing: `apt-get install {package}` provides it'
  if os.environ.get('CI', '').lower() == 'true':
    pytest.fail(f'{reason}; CI=true, where a real-data test may not skip')
  pytest.skip(reason)


def digits_config(model='cnn_small', losses=None, epochs=3, **overrides) -> ml_collections.ConfigDict:
  c = config_lib.base()
  c.data.name = 'digits'
  c.student.model = model
  if model == 'mlp':
    c.student.kwargs = {'hidden': (32,)}
  c.distill.losses = losses or {'ce': 1.0}
  c.epochs = epochs
  c.batch_size = 64
  c.eval_batch_size = 100  # 360 test images: the last batch is padded and masked
  c.optimizer.lr = 0.05
  c.schedule.name = 'cosine'
  c.num_devices = 1
  c.tensorboard = False
  for key, value in overrides.items():
    section, _, field = key.rpartition('__')
    target = c[section] if section else c
    target[field] = value
  return c


def random_teacher(workdir: str, model: str, num_classes: int = 10, image_shape=(8, 8, 1), seed: int = 0, **kw):
  """A randomly initialised teacher checkpoint: enough to test the mechanics of a method, at no training cost."""
  import jax
  import jax.numpy as jnp
  from kdjax import checkpoint as ckpt_lib
  from kdjax import models
  m = models.create(model, num_classes=num_classes, **kw)
  variables = m.init(jax.random.key(seed), jnp.zeros((1,) + tuple(image_shape)))
  meta = {'model': model, 'num_classes': num_classes, 'subclasses': kw.get('subclasses', 1),
          'image_shape': list(image_shape)}
  ckpt_lib.save_model(workdir, variables, meta)
  return workdir


def load_digits_model(workdir: str, model: str, **kw):
  """A host copy (NumPy) of the variables of a 10-class digits network saved in `workdir`."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from kdjax import checkpoint as ckpt_lib
  from kdjax import models
  m = models.create(model, num_classes=10, **kw)
  target = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1))))
  return jax.tree.map(np.array, ckpt_lib.load_model(workdir, target)[0])


def config_module(name: str):
  """A config file of configs/ ('cifar100.py') loaded as a module (its `get_config`, its tables)."""
  spec = importlib.util.spec_from_file_location(f'kdjax_test_configs_{name[:-3]}', os.path.join(ROOT, 'configs', name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def np_softmax(z, axis=-1):
  z = z - z.max(axis=axis, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=axis, keepdims=True)


def np_log_softmax(z, axis=-1):
  z = z - z.max(axis=axis, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))
