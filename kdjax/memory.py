"""How much memory a device offers, and whether a compiled program fits in it (checked before anything trains)."""

from __future__ import annotations

import math

from absl import logging
import jax
import jax.numpy as jnp

from kdjax.errors import ConfigError


def available(num_devices: int) -> int | None:
  """Bytes one device may use: the accelerator's limit, or on the CPU the host's available memory shared by the
  CPU devices. None when unknown."""
  dev = jax.devices()[0]
  try:
    stats = dev.memory_stats()
  except Exception:  # not every backend reports
    stats = None
  if stats and 'bytes_limit' in stats:
    return int(stats['bytes_limit'])
  try:
    with open('/proc/meminfo') as f:
      info = dict(line.split(':', 1) for line in f)
    return int(info['MemAvailable'].split()[0]) * 1024 // max(num_devices, 1)
  except (OSError, KeyError, ValueError):
    return None


def tree_bytes(tree) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def estimate(compiled, state_bytes: int, num_devices: int) -> dict:
  """XLA's memory estimate per device of a compiled train dispatch: {'state', 'temp', 'total', 'available'} in
  bytes (`state_bytes`: one device's share of the train state)."""
  out = {'state': state_bytes, 'temp': 0, 'total': state_bytes, 'available': available(num_devices)}
  analysis = compiled.memory_analysis()
  if analysis is not None:
    out['temp'] = int(analysis.temp_size_in_bytes)
    out['total'] = int(analysis.argument_size_in_bytes + analysis.temp_size_in_bytes +
                       max(analysis.output_size_in_bytes - analysis.alias_size_in_bytes, 0))
  return out


def check(memory: dict, num_students: int):
  """Logs the estimate; refuses (one line) a program that needs more than 90 % of what a device offers."""
  gib = lambda b: b / 2**30
  logging.info('compiled: about %.2f GiB per device (train state %.2f GiB, XLA temporaries %.2f GiB)%s',
               gib(memory['total']), gib(memory['state']), gib(memory['temp']),
               f"; {gib(memory['available']):.1f} GiB available" if memory['available'] else '')
  if memory['available'] and memory['total'] > 0.9 * memory['available']:
    what = f'the sweep of {num_students} students' if num_students > 1 else 'this run'
    raise ConfigError(f"{what} needs about {gib(memory['total']):.2f} GiB per device (train state "
                      f"{gib(memory['state']):.2f} GiB, XLA temporaries {gib(memory['temp']):.2f} GiB) but "
                      f"{gib(memory['available']):.2f} GiB are available; sweep fewer students, use more devices "
                      'or a smaller batch_size')
