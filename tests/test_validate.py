"""Every bad field is refused with one line naming it, before anything is written (no data read, nothing compiled)."""

import os

import pytest

from kdjax import config_lib
from kdjax import errors
from kdjax import train
from tests.util import digits_config


def _kd(**overrides):
  cfg = digits_config('mlp', {'ce': 0.1, 'kd': 0.9}, **overrides)
  cfg.teacher.model = 'cnn_small'
  return cfg


def _with(cfg, path, value):
  *parents, leaf = path.split('.')
  node = cfg
  for p in parents:
    node = node[p]
  node[leaf] = value
  return cfg


def _alpha(value):
  cfg = _kd()
  config_lib.alpha_losses(cfg, value)
  return cfg


CASES = [
    (lambda: digits_config(batch_size=0), 'config.batch_size must be >= 1, got 0'),
    (lambda: digits_config(batch_size=-8), 'config.batch_size must be >= 1, got -8'),
    (lambda: digits_config(dtype='float16'), "config.dtype must be one of 'float32', 'bfloat16', got 'float16'"),
    (lambda: digits_config(eval_every_epochs=0), 'config.eval_every_epochs must be >= 1, got 0'),
    (lambda: digits_config(checkpoint_every_epochs=0), 'config.checkpoint_every_epochs must be >= 1, got 0'),
    (lambda: digits_config(epochs=0), 'config.epochs must be >= 1, got 0'),
    (lambda: digits_config(keep_checkpoints=0), 'config.keep_checkpoints must be >= 1, got 0'),
    (lambda: _alpha(1.5), 'config.distill.losses.ce must be >= 0, got -0.5 (alpha above 1 makes the CE weight'),
    (lambda: _kd(distill__temperature=0.0), 'config.distill.temperature must be > 0.0, got 0.0'),
    (lambda: _kd(distill__temperature=-2.0), 'config.distill.temperature must be > 0.0, got -2.0'),
    (lambda: digits_config(data__augment='crop_flipp'),
     "config.data.augment must be one of 'auto', 'crop_flip', 'none', got 'crop_flipp'"),
    (lambda: digits_config(data__val_fraction=1.0), 'config.data.val_fraction must be < 1.0, got 1.0'),
    (lambda: digits_config(optimizer__lr=0.0), 'config.optimizer.lr must be > 0.0, got 0.0'),
    (lambda: digits_config(optimizer__momentum=1.0), 'config.optimizer.momentum must be < 1.0, got 1.0'),
    (lambda: digits_config(optimizer__weight_decay=-1e-4), 'config.optimizer.weight_decay must be >= 0.0'),
    (lambda: digits_config(optimizer__name='lamb'), "config.optimizer.name must be one of 'sgd', 'adam', 'adamw'"),
    (lambda: digits_config(schedule__name='poly'), "config.schedule.name must be one of 'step', 'cosine'"),
    (lambda: digits_config(schedule__name='step', schedule__decay_epochs=(5, 2)),
     'config.schedule.decay_epochs must be increasing positive epochs, got (5, 2)'),
    (lambda: digits_config(schedule__warmup_epochs=5, epochs=3), 'config.schedule.warmup_epochs=5 leaves no epoch'),
    (lambda: digits_config(distill__label_smoothing=1.0), 'config.distill.label_smoothing must be < 1.0'),
    (lambda: digits_config(distill__kd_scale='T^2'), "config.distill.kd_scale must be one of 'T2', '1'"),
    (lambda: digits_config(distill__cache_teacher='yes'), "config.distill.cache_teacher must be one of 'auto'"),
    (lambda: digits_config(teacher__which='first'), "config.teacher.which must be one of 'latest', 'best'"),
    (lambda: digits_config(students_loop='pmap'), "config.students_loop must be one of 'auto', 'vmap', 'unroll'"),
    (lambda: digits_config(seed=-1), 'config.seed must be >= 0, got -1'),
    (lambda: digits_config(num_devices=-1), 'config.num_devices must be >= 0, got -1'),
    (lambda: digits_config(data__omit_class=-2), 'config.data.omit_class must be >= -1, got -2'),
    (lambda: digits_config(student__subclasses=0), 'config.student.subclasses must be >= 1, got 0'),
    (lambda: digits_config(model='resnet9'), "config.student.model: unknown model 'resnet9'; registered models:"),
    (lambda: _with(_kd(), 'teacher.model', 'resnet99'), "config.teacher.model: unknown model 'resnet99'"),
    (lambda: digits_config(losses={'ce': 0.0}), 'config.distill.losses: every weight is 0'),
    (lambda: digits_config(losses={'ce': 1.0, 'kd': 1.0}), 'config.distill.losses: kd need(s) a teacher'),
    (lambda: digits_config(losses={'kdd': 1.0}), "config.distill.losses: unknown loss term 'kdd'"),
    (lambda: _with(_kd(), 'distill.dkd.beta', -1.0), 'config.distill.dkd.beta must be >= 0.0, got -1.0'),
    (lambda: _with(_kd(), 'distill.crd.nce_m', 1.5), 'config.distill.crd.nce_m must be <= 1.0, got 1.5'),
    (lambda: _with(_kd(), 'distill.simkd.factor', 0), 'config.distill.simkd.factor must be >= 1, got 0'),
]


@pytest.mark.parametrize('make, message', CASES, ids=[m.split(' ')[0] for _, m in CASES])
def test_bad_field_is_refused_before_anything_is_written(make, message, tmp_path):
  with pytest.raises(errors.ConfigError) as e:
    train.run(make(), str(tmp_path / 'run'))
  assert str(e.value).startswith(message) and '\n' not in str(e.value)
  assert not os.path.exists(tmp_path / 'run' / 'config.json')
