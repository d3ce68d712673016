"""Every configuration mistake a user can make stops before training with a message that names it."""

import pytest

from kdjax import data as data_lib
from kdjax import trainer as trainer_lib
from kdjax import errors
from kdjax import models
from kdjax import optim
from kdjax import sharding
from kdjax import train
from tests.util import digits_config


@pytest.fixture(scope='module')
def digits():
  return data_lib.load(digits_config().data)


def test_unknown_model_lists_the_registry():
  with pytest.raises(errors.ConfigError, match=r"unknown model 'resnet9'; registered models: .*resnet8, "):
    models.create('resnet9', num_classes=10)


@pytest.mark.parametrize('overrides,message', [
    (dict(batch_size=30, num_devices=4), 'batch_size 30 is not divisible by the 4 devices'),
    (dict(batch_size=4096), 'batch_size 4096 exceeds the 1437 training examples'),
    (dict(num_devices=64), 'num_devices=64 but only 4 device'),
])
def test_batch_and_device_errors(digits, overrides, message):
  cfg = digits_config(**overrides)
  with pytest.raises(errors.ConfigError, match=message):
    trainer_lib.build(cfg, digits, sharding.make_mesh(cfg.num_devices))


def test_optimizer_and_schedule_names():
  cfg = digits_config(optimizer__name='lamb')
  with pytest.raises(errors.ConfigError, match="unknown optimizer 'lamb'"):
    optim.optimizer(cfg, 10)
  cfg = digits_config(schedule__name='poly')
  with pytest.raises(errors.ConfigError, match="unknown schedule 'poly'"):
    optim.optimizer(cfg, 10)


def test_method_option_errors(digits, tmp_path):
  from tests.util import random_teacher
  teacher = random_teacher(str(tmp_path / 't'), 'resnet8')
  cfg = digits_config('resnet8', {'simkd': 1.0})
  cfg.teacher.update(model='resnet8', checkpoint=teacher)
  cfg.distill.simkd.projectors = 'some'
  with pytest.raises(errors.ConfigError, match="^config.distill.simkd.projectors must be one of 'last', 'multi', 'all', got 'some'$"):
    train.run(cfg, str(tmp_path / 'a'))
  cfg = digits_config('mlp', {'ce': 1.0, 'subclass_aux': 1.0})
  with pytest.raises(errors.ConfigError, match=r'need the student to have subclasses \(config.student.subclasses'):
    train.run(cfg, str(tmp_path / 'b'))
  cfg = digits_config(data__omit_class=12)
  with pytest.raises(errors.ConfigError, match='omit_class=12 but digits has 10 classes'):
    train.run(cfg, str(tmp_path / 'c'))
