"""kdjax.platform: the XLA:CPU setting it adds, and when it leaves XLA_FLAGS alone; its malloc settings."""

import os
import platform as platform_module

import pytest

from kdjax import platform

FLAG = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'


@pytest.mark.parametrize('before, env, after', [
    ('', {}, FLAG),
    ('--xla_force_host_platform_device_count=2', {}, f'--xla_force_host_platform_device_count=2 {FLAG}'),
    # the user's own setting of the list wins, whatever it is
    ('--xla_cpu_experimental_ynn_fusion_type=', {}, '--xla_cpu_experimental_ynn_fusion_type='),
    ('', {'KDJAX_CPU_CONV': 'ynn'}, ''),
    ('', {'KDJAX_CPU_CONV': ' YNN '}, ''),
])
def test_cpu_flags(monkeypatch, before, env, after):
  monkeypatch.setenv('XLA_FLAGS', before)
  monkeypatch.delenv('KDJAX_CPU_CONV', raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  platform.cpu_flags()
  assert os.environ['XLA_FLAGS'] == after
  platform.cpu_flags()  # idempotent
  assert os.environ['XLA_FLAGS'] == after


def test_the_test_session_runs_with_the_setting():
  # conftest imports kdjax.platform before JAX starts, as launch.py does: the tests run what users run
  import jax
  jax.devices()
  assert FLAG in os.environ['XLA_FLAGS'].split()
  if platform_module.libc_ver()[0] == 'glibc':  # the heap settings: programs run on the calling thread
    assert jax.config.values['jax_cpu_enable_async_dispatch'] is False


_FAULTS_PER_CALL = '''
import resource
import kdjax.platform
import jax, jax.numpy as jnp
f = jax.jit(lambda a, b: jnp.sum(a @ b))  # the dot's [4096, 4096] result: a 64 MB temporary a call
a, b = jnp.ones((4096, 16)), jnp.ones((16, 4096))
f(a, b).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
  f(a, b).block_until_ready()
print(kdjax.platform.malloc_settings(), (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 4)
'''


def _faults_per_call(**env):
  import subprocess
  import sys
  out = subprocess.run([sys.executable, '-c', _FAULTS_PER_CALL], capture_output=True, text=True, timeout=120,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '', **env}, check=True)  # one device
  applied, faults = out.stdout.split()
  return applied == 'True', int(faults)


def test_malloc_settings_keep_a_programs_temporaries_mapped():
  """kdjax.platform's heap settings: a jitted program's large temporary buffer is reused from call to call instead
  of being mapped and faulted in again (16,384 pages of 4 KiB a call for this one with glibc's and JAX's defaults)."""
  if platform_module.libc_ver()[0] != 'glibc':
    pytest.skip('glibc only')
  applied, faults = _faults_per_call()
  assert applied and faults < 4096, faults  # a quarter of the temporary's pages (measured: 1 to 2,065, by load)
  applied, faults = _faults_per_call(KDJAX_MALLOC='default')
  assert not applied
  thp = '/sys/kernel/mm/transparent_hugepage/enabled'
  if os.path.exists(thp) and '[always]' not in open(thp).read():  # with 2 MiB pages the defaults fault far less
    assert faults > 8000, faults
