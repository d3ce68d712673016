"""Data parallelism: a 1-D 'data' mesh; parameters and datasets replicated, each batch split over devices.

Under `jax.jit` the batch-axis reductions (BatchNorm statistics, loss means) are global, so N devices compute the
same step as one device. Multi-host runs are the same code after `jax.distributed.initialize()`.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kdjax.errors import ConfigError


def make_mesh(num_devices: int = 0) -> Mesh:
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ConfigError(f'num_devices={num_devices} but only {len(devices)} device(s) are available')
    devices = devices[:num_devices]
  return Mesh(np.array(devices), ('data',))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))
