"""Every experiment config builds and its train step traces (abstract values: no compilation, no teacher training)."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import data as data_lib
from kdjax import trainer as trainer_lib
from kdjax import models
from kdjax import sharding
from kdjax import sweep as sweep_lib
from kdjax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = [
    ('quickstart.py', None),
    ('teacher.py', 'resnet8,cifar100'), ('teacher.py', 'ShuffleV2,cifar100'), ('teacher.py', 'cnn_small,digits'),
    ('simkd_cifar100.py', None), ('simkd_cifar100.py', 'wrn_40_2,wrn_16_2,multi'),
    ('simkd_cifar100.py', 'vgg13,MobileNetV2,all'), ('simkd_cifar100.py', 'digits,kl'),
    ('simkd_cifar100.py', 'digits,labels'),
    ('kd_cifar10.py', None), ('kd_cifar10.py', 'digits'), ('kd_cifar10.py', 'grid'), ('kd_cifar10.py', 'grid,digits'),
    ('simkd_cifar100.py', 'digits,lrs'), ('mnist.py', 'mlp,mnist,grid'), ('mnist.py', 'mlp,digits,temperature'),
    ('alexnet_cifar10.py', None), ('alexnet_cifar10.py', 'digits'),
    ('mnist.py', 'mlp'), ('mnist.py', 'cnn'), ('mnist.py', 'mlp,digits'), ('mnist.py', 'cnn,digits'),
    ('subclass_mnist.py', None), ('subclass_mnist.py', 'digits'),
    ('omitted_mnist.py', None), ('omitted_mnist.py', 'digits'),
    ('mnist.py', 'mlp,fashion'), ('omitted_mnist.py', 'fashion'), ('subclass_mnist.py', 'fashion'),
    ('reverse_self_cifar10.py', 'reverse'), ('reverse_self_cifar10.py', 'self'),
    ('reverse_self_cifar10.py', 'self,digits'),
    ('cifar100.py', 'digits'), ('cifar100.py', 'crd,digits'), ('cifar100.py', 'dkd,resnet56,resnet20,digits'),
    ('transfer.py', None), ('transfer.py', 'digits'), ('transfer.py', 'digits,temperature'),
    ('fashion_scarce.py', None), ('fashion_scarce.py', '1,logit,digits'), ('fashion_scarce.py', '20,feature,digits'),
    ('funmatch.py', None), ('funmatch.py', 'fashion'), ('funmatch.py', 'digits,sweep'),
]

_SHAPES = {'cifar10': ((32, 32, 3), 10), 'cifar100': ((32, 32, 3), 100), 'mnist': ((28, 28, 1), 10),
           'fashion_mnist': ((28, 28, 1), 10),
           'folder': ((224, 224, 3), 2)}


def load_config(name, arg):
  spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(ROOT, 'configs', name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def synthetic_dataset(cfg, n=64):
  """Random uint8 images shaped like the config's dataset (digits is real and cheap, so it is loaded)."""
  if cfg.data.name == 'digits':
    return data_lib.load(cfg.data)
  shape, classes = _SHAPES[cfg.data.name]
  rng = np.random.default_rng(0)
  split = lambda: data_lib.Split(rng.integers(0, 256, (n,) + shape, dtype=np.uint8),
                                 rng.integers(0, classes, n).astype(np.int32))
  return data_lib.Dataset(cfg.data.name, classes, split(), split(), None, (0.5,) * shape[-1], (0.25,) * shape[-1],
                          'none', cfg.data.omit_class)


def trace(cfg):
  cfg.batch_size = min(cfg.batch_size, 32)
  ds = synthetic_dataset(cfg)
  teacher = teacher_vars = None
  if cfg.teacher.model:
    teacher = models.create(cfg.teacher.model, ds.num_classes, subclasses=cfg.teacher.subclasses,
                            **dict(cfg.teacher.kwargs))
    x = jnp.zeros((1,) + ds.image_shape)
    teacher_vars = jax.eval_shape(lambda: teacher.init(jax.random.key(0), x))
  exp = trainer_lib.build(cfg, ds, sharding.make_mesh(1), teacher, teacher_vars)
  return exp.trace_train_step()


@pytest.mark.slow
@pytest.mark.parametrize('name,arg', CONFIGS, ids=[f'{n}:{a}' for n, a in CONFIGS])
def test_config_builds_and_traces(name, arg):
  cfg = load_config(name, arg)
  runs = [cfg.suite[k] for k in cfg.suite_order] if 'suite' in cfg else [cfg]
  for run in runs:
    if arg and 'digits' in arg:
      assert run.data.name == 'digits'
    if arg and 'fashion' in arg:
      assert run.data.name == 'fashion_mnist'
    ts, metrics = trace(run)
    assert metrics['loss'].shape == (sweep_lib.expand(run).size,)  # per student
    for term in run.distill.losses:
      assert f'loss_{term}' in metrics


def test_fashion_scarce_students_and_budget():
  """configs/fashion_scarce.py: each student of the zipped sweep runs exactly one method's weights, the teacher
  trains on every training image, every fraction gets about the same number of steps, a bad item is refused."""
  spec = importlib.util.spec_from_file_location('fashion_scarce', os.path.join(ROOT, 'configs', 'fashion_scarce.py'))
  fs = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(fs)
  for group, methods, terms in (('logit', fs.LOGIT_METHODS, fs.LOGIT_TERMS),
                                ('feature', fs.FEATURE_METHODS, fs.FEATURE_TERMS)):
    sweep = sweep_lib.expand(fs.get_config(f'2,{group}'))
    assert sweep.size == 3 * len(methods)
    got = [fs.method_of(s.values, methods, terms) for s in sweep.students]
    assert got == [m for m in methods for _ in range(3)]
    for s in sweep.students:
      assert dict(s.cfg.distill.losses) == dict(zip(terms, methods[got[s.index]]))
      assert s.cfg.data.train_examples == 1200 and s.cfg.teacher.recipe.data.train_examples == 0
  for fraction in fs.FRACTIONS:
    cfg = fs.get_config(f'{fraction},ls')
    n = cfg.data.train_examples or 60000
    assert cfg.distill.logit_standardize and 0.9 * fs.STEPS['fashion_mnist'] <= cfg.epochs * (n // cfg.batch_size) \
        <= 1.2 * fs.STEPS['fashion_mnist']
  with pytest.raises(ValueError, match='fraction must be one of'):
    fs.get_config('3,logit')
  with pytest.raises(ValueError, match='group must be one of'):
    fs.get_config('5,fitnet')
