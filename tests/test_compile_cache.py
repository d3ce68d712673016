"""Where the persistent compilation cache lives: config field, then $KDJAX_COMPILATION_CACHE, then the default."""

import os

import jax

from kdjax import compile_cache


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
