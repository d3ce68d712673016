"""kdjax.platform: the XLA:CPU setting it adds, and when it leaves XLA_FLAGS alone."""

import os

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
