"""Test setup: CPU only, 4 fake devices (the data-parallel tests use them; the rest run on one)."""

import os

os.environ['JAX_PLATFORMS'] = 'cpu'
from tests.util import FAST_COMPILE  # noqa: E402  (LLVM at -O0: see tests/util.py)

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           f' --xla_force_host_platform_device_count=4 {FAST_COMPILE}').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import kdjax.platform  # noqa: E402,F401  (kdjax's XLA:CPU setting, as launch.py applies it)
import jax  # noqa: E402  (after the environment is set)
import pytest  # noqa: E402

# Many tests build the same small train step; the persistent cache compiles each distinct program once per session.
jax.config.update('jax_compilation_cache_dir', os.path.join(os.environ.get('TMPDIR', '/tmp'), 'kdjax_test_jax_cache'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


@pytest.fixture(scope='session')
def digits_teacher(tmp_path_factory):
  """A cnn_small teacher trained on digits (15 epochs), shared by the tests that need a real teacher."""
  from kdjax import train
  from tests.util import digits_config
  workdir = str(tmp_path_factory.mktemp('digits_teacher'))
  summary = train.run(digits_config('cnn_small', epochs=15), workdir)
  return workdir, summary
