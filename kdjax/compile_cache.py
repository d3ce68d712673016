"""JAX's persistent compilation cache, on by default: a rerun, a resume or a relaunched sweep loads the compiled
train step (and the init, evaluation and teacher-table programs) from disk instead of compiling them again.

Where it lives, first match wins:
  `config.compilation_cache`            a directory, or 'off'
  $KDJAX_COMPILATION_CACHE              a directory, or 'off' (for every run of a machine or a job)
  ~/.cache/kdjax/jax                    the default ($XDG_CACHE_HOME/kdjax/jax when that is set)
It is JAX's own cache (`jax_compilation_cache_dir`): entries are keyed by the program, the compiler options, the
JAX/XLA versions and the devices, so a stale entry is never used; deleting the directory only costs compile time.
A cache directory chosen before kdjax (by the user's code or tests/conftest.py) is kept as it is.
"""

from __future__ import annotations

import os

from absl import logging
import jax

OFF = ('off', 'none', 'false', '0', 'no')
ENV = 'KDJAX_COMPILATION_CACHE'
# Programs that compile faster than this are not written (the many tiny eager-op programs); every program of a
# run's start-up that is worth loading takes longer.
MIN_COMPILE_SECS = 0.2


def default_dir() -> str:
  root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(root, 'kdjax', 'jax')


def resolve(setting: str = '') -> str | None:
  """The cache directory a run with `config.compilation_cache = setting` uses; None when switched off."""
  where = setting or os.environ.get(ENV, '') or default_dir()
  if where.strip().lower() in OFF:
    return None
  return os.path.abspath(os.path.expanduser(where))


def enable(setting: str = '') -> str | None:
  """Points JAX's persistent compilation cache at `resolve(setting)` (before anything compiles); returns the
  directory in use, or None."""
  current = jax.config.jax_compilation_cache_dir
  if current:  # chosen before us (the user's code, tests/conftest.py): theirs
    return current
  path = resolve(setting)
  if path is None:
    logging.info('persistent compilation cache: off')
    return None
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:  # an unwritable cache only costs compile time
    logging.warning('persistent compilation cache: cannot use %s (%s); compiling every time', path, e)
    return None
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', MIN_COMPILE_SECS)
  logging.info('persistent compilation cache: %s (config.compilation_cache or $%s; "off" disables)', path, ENV)
  return path
