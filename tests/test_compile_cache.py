"""Where the persistent compilation cache lives: config field, then $KDJAX_COMPILATION_CACHE, then the default."""

import dataclasses
import os

import jax
import pytest

from kdjax import compile_cache
from kdjax import trainer as trainer_lib


def test_config_field_then_environment_then_default(monkeypatch, tmp_path):
  monkeypatch.delenv(compile_cache.ENV, raising=False)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert compile_cache.resolve('') == str(tmp_path / 'xdg' / 'kdjax' / 'jax')
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / 'env'))
  assert compile_cache.resolve('') == str(tmp_path / 'env')
  assert compile_cache.resolve(str(tmp_path / 'cfg')) == str(tmp_path / 'cfg')  # the config field wins
  assert compile_cache.resolve('off') is None and compile_cache.resolve('OFF') is None
  monkeypatch.setenv(compile_cache.ENV, 'off')
  assert compile_cache.resolve('') is None
  assert compile_cache.resolve('~/c') == os.path.join(os.path.expanduser('~'), 'c')


def test_a_cache_chosen_before_kdjax_is_kept(tmp_path):
  before = jax.config.jax_compilation_cache_dir  # tests/conftest.py's
  assert before
  assert compile_cache.enable(str(tmp_path)) == before
  assert compile_cache.enable('off') == before
  assert jax.config.jax_compilation_cache_dir == before


# ----------------------------------------------------------------------------------- compiled-executable cache
import importlib.util  # noqa: E402
import logging as std_logging  # noqa: E402
import sys  # noqa: E402
import uuid  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from kdjax import data as data_lib  # noqa: E402
from kdjax import sharding  # noqa: E402
from kdjax import step as step_lib  # noqa: E402
from tests.util import digits_config  # noqa: E402


@pytest.fixture
def executables(monkeypatch, tmp_path):
  """A fresh, empty executable cache of this test's own."""
  where = tmp_path / 'executables'
  monkeypatch.setenv(compile_cache.EXECUTABLES_ENV, str(where))
  # Keys no earlier test session has seen: the programs are compiled here, not read from the session's JAX cache.
  fresh = uuid.uuid4().hex
  monkeypatch.setattr(compile_cache, 'kdjax_source_digest', lambda: fresh)
  return where


def _tiny(**overrides):
  return digits_config('mlp', **{'epochs': 1, **overrides})


@pytest.fixture(scope='module')
def digits():
  return data_lib.load(_tiny().data)


def _experiment(cfg, ds, num_devices=1):
  return trainer_lib.build(cfg, ds, sharding.make_mesh(num_devices))


def _train(exp, steps=3):
  exp.compile(exp.init_state(abstract=True))
  ts = exp.init_state()
  for s in range(steps):
    ts, metrics = exp.train_chunk(ts, 0, s)
  return jax.device_get((ts, metrics))


def _untraceable(*args, **kwargs):
  raise AssertionError('traced although the executable is cached')


def test_a_hit_loads_without_tracing_and_trains_bit_identically_to_a_fresh_compile(executables, digits,
                                                                                    monkeypatch):
  fresh = _train(_experiment(_tiny(), digits))  # compiled, and stored
  assert sorted(p.name.split('-')[0] for p in executables.iterdir()) == ['init', 'train_chunk']
  exp = _experiment(_tiny(), digits)
  exp._init_fn = exp._dispatch_fn = _untraceable  # a hit neither traces nor lowers: nothing calls them
  loaded = _train(exp)
  jax.tree.map(np.testing.assert_array_equal, loaded, fresh)
  monkeypatch.setenv(compile_cache.EXECUTABLES_ENV, 'off')  # and against a compile with the cache off
  assert _experiment(_tiny(), digits).program_key('init') is None
  jax.tree.map(np.testing.assert_array_equal, _train(_experiment(_tiny(), digits)), fresh)


def test_every_ingredient_of_the_program_is_in_the_key(executables, digits, monkeypatch, tmp_path):
  base = _experiment(_tiny(), digits)
  keys = {base.program_key('train_chunk'), base.program_key('init')}
  assert len(keys) == 2
  # Fields no program reads share the key; the same experiment built again computes the same key.
  same = _experiment(_tiny(eval_every_epochs=5, keep_checkpoints=7, tensorboard=True, data__dir='/elsewhere',
                           teacher__checkpoint='/tmp/a_teacher'), digits)
  assert same.program_key('train_chunk') == base.program_key('train_chunk')
  variants = {
      'a config field the step reads': _experiment(_tiny(optimizer__lr=0.07), digits),
      'a loss weight': _experiment(_tiny(losses={'ce': 0.5}), digits),
      'the seed (the students\' keys)': _experiment(_tiny(seed=1), digits),
      'the epochs (the schedule)': _experiment(_tiny(epochs=2), digits),
      'the batch size': _experiment(_tiny(batch_size=32), digits),
      'the device count': _experiment(_tiny(num_devices=2), digits, num_devices=2),
      'the image shape': _experiment(_tiny(), digits.__class__(
          **{**digits.__dict__, 'train': data_lib.Split(digits.train.images[:, :6, :6], digits.train.labels),
             'test': data_lib.Split(digits.test.images[:, :6, :6], digits.test.labels),
             'val': None if digits.val is None else data_lib.Split(digits.val.images[:, :6, :6],
                                                                   digits.val.labels)})),
      'the normalisation': _experiment(_tiny(), digits.__class__(**{**digits.__dict__, 'mean': (0.4,)})),
  }
  for what, exp in variants.items():
    assert exp.program_key('train_chunk') not in keys, what
    assert exp.program_key('init') not in keys, what
  # The training images are an argument of the step, not part of the program: other images of the same shapes
  # share its key.
  other_images = _experiment(_tiny(), digits.__class__(
      **{**digits.__dict__, 'train': data_lib.Split(digits.train.images[::-1].copy(), digits.train.labels)}))
  assert other_images.program_key('train_chunk') == base.program_key('train_chunk')
  # A source edit: kdjax's own files, and a file outside kdjax that defines a module the run uses.
  before = base.program_key('train_chunk')
  monkeypatch.setattr(compile_cache, 'kdjax_source_digest', lambda: 'edited')
  assert _experiment(_tiny(), digits).program_key('train_chunk') != before
  pkg = tmp_path / 'pkg'
  pkg.mkdir()
  (pkg / 'a.py').write_text('x = 1\n')
  digest = compile_cache.package_digest(str(pkg))
  (pkg / 'a.py').write_text('x = 2\n')
  assert compile_cache.package_digest(str(pkg)) != digest
  (pkg / 'mine.py').write_text('class Model:\n  pass\n')
  spec = importlib.util.spec_from_file_location('kdjax_test_mine', pkg / 'mine.py')
  mine = importlib.util.module_from_spec(spec)
  monkeypatch.setitem(sys.modules, 'kdjax_test_mine', mine)
  spec.loader.exec_module(mine)
  digest = compile_cache.source_digest(mine.Model())
  assert digest != compile_cache.kdjax_source_digest()
  (pkg / 'mine.py').write_text('class Model:\n  width = 2\n')
  assert compile_cache.source_digest(mine.Model()) != digest
  (pkg / 'mine.py').write_text('class Model:\n  width = 2\n\ndef loss(ctx, cfg):\n  return 0.0\n')
  spec.loader.exec_module(mine)  # a loss registered from outside kdjax: its file is hashed too
  digest = compile_cache.source_digest(functions=[mine.loss])
  (pkg / 'mine.py').write_text('class Model:\n  width = 2\n\ndef loss(ctx, cfg):\n  return 1.0\n')
  assert compile_cache.source_digest(functions=[mine.loss]) != digest
  exec('class Interactive:\n  pass', namespace := {'__name__': 'kdjax_no_file'})  # no file to hash: never the same
  assert compile_cache.source_digest(namespace['Interactive']()) != compile_cache.source_digest(
      namespace['Interactive']())
  # The environment: the library versions, XLA's flags, JAX's options and the devices are hashed in.
  env = compile_cache.environment()
  assert env['versions']['jax'] == jax.__version__ and len(env['devices']) == len(jax.devices())
  k1 = compile_cache.program_key('p', {})
  monkeypatch.setenv('XLA_FLAGS', os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_use_onednn=true')
  assert compile_cache.program_key('p', {}) != k1
  monkeypatch.setenv('XLA_FLAGS', os.environ.get('XLA_FLAGS', '').replace(' --xla_cpu_use_onednn=true', ''))
  assert compile_cache.program_key('p', {}) == k1


@pytest.mark.slow
def test_a_damaged_entry_is_ignored_with_one_warning_and_written_again(executables, digits, caplog):
  fresh = _train(_experiment(_tiny(), digits))
  for p in executables.iterdir():
    p.write_bytes(p.read_bytes()[:100])  # truncated
  compile_cache._warned.clear()
  with caplog.at_level(std_logging.WARNING):
    again = _train(_experiment(_tiny(), digits))
  warnings = [r for r in caplog.records if 'damaged or stale' in r.getMessage()]
  assert len(warnings) == 1
  jax.tree.map(np.testing.assert_array_equal, again, fresh)
  exp = _experiment(_tiny(), digits)  # rewritten: the next one loads them
  assert compile_cache.load(exp.program_key('init'), exp.mesh.devices.flat) is not None


def test_off_with_the_persistent_cache_or_the_environment(monkeypatch):
  monkeypatch.setenv(compile_cache.EXECUTABLES_ENV, 'off')
  assert compile_cache.executables_dir() is None
  monkeypatch.delenv(compile_cache.EXECUTABLES_ENV)
  assert compile_cache.executables_dir() == os.path.join(jax.config.jax_compilation_cache_dir,
                                                         compile_cache.EXECUTABLES)


KEY_IN_A_PROCESS = """
import os, sys
sys.path.insert(0, os.getcwd())
import jax
jax.config.update('jax_compilation_cache_dir', sys.argv[1])
from kdjax import data as data_lib, sharding, trainer as trainer_lib
from tests.util import digits_config
cfg = digits_config('mlp', epochs=1)
print('KEY', trainer_lib.build(cfg, data_lib.load(cfg.data), sharding.make_mesh(1)).program_key('train_chunk'))
"""


@pytest.mark.slow
def test_the_key_is_the_same_in_another_process(digits, tmp_path):
  """Nothing of one process (an object's address in a repr, a temporary path) may enter the key."""
  import subprocess
  here = _experiment(_tiny(), digits).program_key('train_chunk')
  out = subprocess.run([sys.executable, '-c', KEY_IN_A_PROCESS, str(tmp_path)], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), check=True).stdout
  assert f'KEY {here}' in out.splitlines()


def test_the_initial_state_compiled_in_a_thread_is_the_same(digits, monkeypatch):
  monkeypatch.setenv(compile_cache.EXECUTABLES_ENV, 'off')
  exp = _experiment(_tiny(), digits)
  exp.init_state(abstract=True)
  exp.start_init_compile()
  assert exp._init_thread is not None
  threaded = jax.device_get(exp.init_state())
  jax.tree.map(np.testing.assert_array_equal, threaded, jax.device_get(_experiment(_tiny(), digits).init_state()))


@pytest.mark.slow
def test_the_teachers_shapes_and_evaluation_are_cached(executables, digits, tmp_path, monkeypatch):
  from kdjax import teacher as teacher_lib
  from tests.util import random_teacher
  path = random_teacher(str(tmp_path / 'teacher'), 'cnn_small')
  cfg = _tiny(teacher__model='cnn_small', teacher__checkpoint=path, losses={'ce': 0.5, 'kd': 0.5})
  mesh = sharding.make_mesh(1)
  teacher, variables = teacher_lib.load(cfg, digits, mesh, path)
  with monkeypatch.context() as m:  # the second restore reads the shapes: it does not trace the teacher's init
    m.setattr(jax, 'eval_shape', _untraceable)
    _, again = teacher_lib.load(cfg, digits, mesh, path)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(again), jax.device_get(variables))
  exp = trainer_lib.build(cfg, digits, mesh, teacher, variables)
  accuracy = teacher_lib.evaluate_teacher(exp)
  exp = trainer_lib.build(cfg, digits, mesh, teacher, variables)
  exp.program_key('init')  # the key's ingredients, read before the teacher is made untraceable
  exp.parts = dataclasses.replace(exp.parts, teacher=type('Untraceable', (), {'apply': staticmethod(_untraceable)})())
  assert teacher_lib.evaluate_teacher(exp) == accuracy
