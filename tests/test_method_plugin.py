"""A method in one file: a toy method registered from a module outside kdjax is in the schema, validated, sweepable,
a configs/cifar100.py row and trainable; and every numeric field of the schema has a range that validate enforces."""

import importlib.util
import numbers
import sys

import pytest

from kdjax import config_lib
from kdjax import distill
from kdjax import errors
from kdjax import sweep
from kdjax import train
from kdjax import validate
from tests.test_configs import load_config
from tests.util import digits_config, random_teacher

# The whole method, as a user would write it: one file, nothing in kdjax edited.
TOY = '''"""Toy KD: the student's logits pulled toward the teacher's by their mean squared difference, times
`toy.scale`."""
import jax.numpy as jnp

from kdjax import distill


def toy_loss(student_logits, teacher_logits, scale):
  return scale * jnp.mean(jnp.square(student_logits - teacher_logits))


distill.register('toy', distill.Method(
    lambda ctx, cfg: toy_loss(ctx.student.logits, ctx.teacher.logits, cfg.toy.scale),
    hparams=('toy.scale',),
    options=distill.Options(dict(scale=1.0), ranges=dict(scale=distill.Range(0.0))),
    recipe=distill.Recipe(weights={'ce': 1.0, 'toy': 2.0})))
'''


@pytest.fixture
def toy(tmp_path, monkeypatch):
  """Imports the toy method's file from tmp_path into copies of the registry, restored afterwards (the other tests'
  schema stays kdjax's own)."""
  distill.load_methods()
  monkeypatch.setattr(distill, 'METHODS', dict(distill.METHODS))
  monkeypatch.setattr(distill, 'SECTIONS', dict(distill.SECTIONS))
  path = tmp_path / 'toy_method.py'
  path.write_text(TOY)
  spec = importlib.util.spec_from_file_location('toy_method', path)
  module = importlib.util.module_from_spec(spec)
  monkeypatch.setitem(sys.modules, 'toy_method', module)
  spec.loader.exec_module(module)
  return module


def test_a_method_registered_from_outside_is_in_the_schema_validated_and_a_recipe_config(toy):
  cfg = config_lib.base()
  assert dict(cfg.distill.toy) == {'scale': 1.0}
  assert validate.ranges()['distill.toy.scale'] == distill.Range(0.0)
  assert 'distill.toy.scale' in sweep.sweepable(digits_config(losses={'ce': 1.0, 'toy': 1.0}))
  c = load_config('cifar100.py', 'toy,digits')
  assert dict(c.distill.losses) == {'ce': 1.0, 'toy': 2.0} and c.distill.toy.scale == 1.0
  validate.check(c)
  assert dict(load_config('cifar100.py', 'toy,vgg13,vgg8').distill.losses) == {'ce': 1.0, 'toy': 2.0}
  bad = digits_config(losses={'ce': 1.0, 'toy': 1.0})
  bad.teacher.model = 'cnn_small'
  bad.distill.toy.scale = -0.5
  with pytest.raises(errors.ConfigError) as e:
    validate.check(bad)
  assert str(e.value) == 'config.distill.toy.scale must be >= 0.0, got -0.5'


@pytest.mark.slow
def test_a_method_registered_from_outside_sweeps_and_trains(toy, tmp_path):
  """Two students of one program: scale 0 (CE alone) and scale 20 (pulled to a random teacher's logits). The pulled
  student agrees with the teacher more and learns the labels less; a negative scale is refused by name first."""
  teacher = random_teacher(str(tmp_path / 'teacher'), 'cnn_small', image_shape=(8, 8, 1))
  cfg = digits_config('mlp', {'ce': 1.0, 'toy': 1.0}, epochs=2)
  cfg.teacher.update(model='cnn_small', checkpoint=teacher)
  cfg.sweep = 'distill.toy.scale=0,-1'
  with pytest.raises(errors.ConfigError) as e:
    train.run(cfg, str(tmp_path / 'refused'))
  assert str(e.value) == 'config.distill.toy.scale must be >= 0.0, got -1.0'
  cfg.sweep = 'distill.toy.scale=0,20'
  summary = train.run(cfg, str(tmp_path / 'run')).summary
  free, pulled = summary['students']
  assert (free['values'], pulled['values']) == ({'distill.toy.scale': 0}, {'distill.toy.scale': 20})
  # Measured: agreement 0.09 (free) and 0.95 (pulled), test accuracy 0.91 and 0.10.
  assert pulled['test_agreement'] > 0.5 > free['test_agreement'], (free, pulled)
  assert free['test_accuracy'] > pulled['test_accuracy'] + 0.3, (free, pulled)


def _numeric(v) -> bool:
  number = lambda x: isinstance(x, numbers.Real) and not isinstance(x, bool)
  return number(v) or (isinstance(v, (tuple, list)) and bool(v) and all(number(x) for x in v))


def _outside(limits: distill.Range, current):
  """A value just below `limits`, of the type of the field's `current` value."""
  value = limits.low - 1 if limits.low_ok else limits.low
  return int(value) if isinstance(current, int) else float(value)


def _above(limits: distill.Range, current):
  """A value just above `limits` (None when the range has no upper bound), of the type of `current`."""
  if limits.high is None:
    return None
  value = limits.high if not limits.high_ok else limits.high + 1
  return int(value) if isinstance(current, int) else float(value)


def _refused(cfg, path):
  with pytest.raises(errors.ConfigError) as e:
    validate.check(cfg)
  message = str(e.value)
  assert message.startswith(f'config.{path}') and '\n' not in message, (path, message)


def test_every_bound_of_every_range_is_enforced():
  """Both ends: a value past the upper bound of each bounded field (a fraction of 1, momentum 1) is refused too."""
  schema = sweep.flatten(config_lib.base().to_dict())
  bounded = {p: r for p, r in validate.ranges().items() if r.high is not None}
  assert 'data.val_fraction' in bounded and 'optimizer.momentum' in bounded
  for path, limits in bounded.items():
    cfg = digits_config()
    *parents, leaf = path.split('.')
    node = cfg
    for p in parents:
      node = node[p]
    current = node[leaf]
    first = current[0] if isinstance(current, tuple) else schema[path]
    bad = _above(limits, first)
    node[leaf] = (bad,) + current[1:] if isinstance(current, tuple) else bad
    _refused(cfg, path)


def test_every_numeric_teacher_field_is_checked_in_each_entry_of_teachers():
  """`config.teachers` entries are teacher sections: their numeric fields have the teacher section's ranges."""
  teacher = config_lib.base().teacher.to_dict()
  numeric = sorted(f for f, v in teacher.items() if _numeric(v))
  assert {'index', 'seed', 'subclasses'} <= set(numeric)
  for field in numeric:
    cfg = digits_config('mlp', {'ce': 0.5, 'kd': 0.5})
    cfg.teacher.model = 'mlp'
    cfg.teachers = [{'model': 'mlp', field: _outside(validate.ranges()[f'teacher.{field}'], teacher[field])}]
    _refused(cfg, f'teachers[0].{field}')


def test_every_numeric_field_of_the_schema_has_a_range_that_validate_enforces():
  schema = sweep.flatten(config_lib.base().to_dict())
  ranges = validate.ranges()
  assert not sorted(set(ranges) - set(schema)), 'ranges of fields that do not exist'
  assert not sorted(set(validate.choices()) - set(schema)), 'choices of fields that do not exist'
  numeric = sorted(p for p, v in schema.items() if _numeric(v))
  # The loss weights are checked by their own rule (kdjax/validate.py _check_losses: >= 0, not all 0).
  missing = [p for p in numeric if p not in ranges and not p.startswith('distill.losses.')]
  assert not missing, f'numeric fields without a range in kdjax/validate.py: {missing}'
  for path in numeric:
    cfg = digits_config()
    *parents, leaf = path.split('.')
    node = cfg
    for p in parents:
      node = node[p]
    current = node[leaf]
    first = current[0] if isinstance(current, tuple) else current
    bad = -1.0 if path.startswith('distill.losses.') else _outside(ranges[path], first)
    node[leaf] = (bad,) + current[1:] if isinstance(current, tuple) else bad
    with pytest.raises(errors.ConfigError) as e:
      validate.check(cfg)
    message = str(e.value)
    assert message.startswith(f'config.{path}') and '\n' not in message, (path, message)
