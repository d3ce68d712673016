"""Function matching (configs/funmatch.py): gradient clipping, a cosine whose length a sweep may vary, the teacher's
own run without the consistent views, and the digits recipe run end to end for a few epochs."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import config_lib
from kdjax import optim
from kdjax import sweep as sweep_lib
from kdjax import teacher as teacher_lib
from kdjax import train
from kdjax.errors import ConfigError
from tests.util import config_module, digits_config



def _funmatch(arg):
  return config_module('funmatch.py').get_config(arg)


def test_clip_norm_rescales_the_gradient_to_its_global_norm():
  # SGD: Adam's first step is blind to the gradient's scale
  cfg = digits_config('mlp', optimizer__name='sgd', optimizer__weight_decay=0.0, optimizer__clip_norm=1.0)
  params = {'student': {'w': jnp.ones((3, 2))}, 'extras': {}}
  grads = {'student': {'w': jnp.arange(6.0).reshape(3, 2)}, 'extras': {}}  # norm sqrt(55) > 1
  clipped = optim.optimizer(cfg, 10)
  cfg.optimizer.clip_norm = 0.0
  plain = optim.optimizer(cfg, 10)
  g = np.arange(6.0).reshape(3, 2)
  by_hand = {'student': {'w': jnp.asarray(g / np.sqrt(np.sum(g ** 2)))}, 'extras': {}}
  got = clipped.update(grads, clipped.init(params), params)[0]
  want = plain.update(by_hand, plain.init(params), params)[0]
  np.testing.assert_allclose(got['student']['w'], want['student']['w'], rtol=1e-6)
  assert not np.allclose(plain.update(grads, plain.init(params), params)[0]['student']['w'], want['student']['w'])


def test_a_swept_cosine_length_is_optax_cosine():
  """The traced cosine (a swept schedule.length_epochs) gives optax.cosine_decay_schedule's rates step by step."""
  cfg = digits_config('mlp', epochs=30)
  cfg.schedule.update(warmup_epochs=2, length_epochs=10, final_fraction=0.1)
  fixed = optim.schedule(cfg, 7)
  traced = optim.schedule(sweep_lib.view(cfg, {'schedule.length_epochs': jnp.asarray(10)}), 7)  # as the step
  steps = jnp.arange(0, 30 * 7)
  np.testing.assert_allclose(jax.vmap(traced)(steps), jax.vmap(fixed)(steps), rtol=1e-5, atol=1e-9)
  want = optax.cosine_decay_schedule(0.05, 10 * 7 - 14, alpha=0.1)(steps[14:] - 14)
  np.testing.assert_allclose(jax.vmap(fixed)(steps)[14:], want, rtol=1e-6)


def test_the_schedule_length_sweeps_and_epochs_does_not():
  cfg = _funmatch('digits,sweep')
  sweep = sweep_lib.expand(cfg)
  assert sweep.size == 6 and set(sweep.traced) == {'optimizer.lr', 'schedule.length_epochs'}
  cfg = _funmatch('digits')
  cfg.sweep = 'epochs=10,30'
  with pytest.raises(ConfigError, match="'epochs' changes shapes or code and cannot be swept"):
    sweep_lib.expand(cfg)


def test_the_teachers_own_run_has_no_views_and_keeps_its_cache_key():
  cfg = _funmatch('digits')
  run = teacher_lib.teacher_run_config(cfg)
  assert run.data.mixup.alpha == 0.0 and run.optimizer.name == 'sgd' and run.optimizer.clip_norm == 0.0
  plain = cfg.copy_and_resolve_references()
  plain.data.mixup = config_lib.base().data.mixup
  assert teacher_lib.cache_dir(plain, 'digits') == teacher_lib.cache_dir(cfg, 'digits')


@pytest.mark.slow
def test_funmatch_digits_runs(digits_teacher, tmp_path, caplog):
  """configs/funmatch.py:digits for 3 epochs against the shared trained digits teacher: kd alone, mixup on every
  batch, the teacher run every step (not cached), and the student learns (well above the 10 % of chance)."""
  cfg = _funmatch('digits')
  cfg.epochs, cfg.schedule.warmup_epochs = 3, 1
  cfg.teacher.checkpoint = digits_teacher[0]
  caplog.set_level('INFO')
  outcome = train.run(cfg, str(tmp_path / 'run'))
  assert 'teacher outputs not cached' in caplog.text and 'consistent views' in caplog.text
  assert outcome['test_accuracy'] > 0.5
