"""Devices: a 2-D ('students', 'data') mesh. The students of a sweep split over the first axis, each batch over the
second; the datasets, the teacher and everything the students share are replicated.

Under `jax.jit` the batch-axis reductions (BatchNorm statistics, loss means) are global, so N devices compute the
same step as one device. A single run is one student: the mesh is then (1, N), plain data parallelism.
Multi-host runs are the same code after `jax.distributed.initialize()`.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kdjax.errors import ConfigError


def make_mesh(num_devices: int = 0, num_students: int = 1, students_axis: int = 0, batch_size: int = 0) -> Mesh:
  """`students_axis` devices along the students axis (0 = auto: the most that divide both the device count and the
  number of students, keeping the batch divisible over the rest)."""
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ConfigError(f'num_devices={num_devices} but only {len(devices)} device(s) are available')
    devices = devices[:num_devices]
  n = len(devices)
  if students_axis:
    if n % students_axis or num_students % students_axis:
      raise ConfigError(f'mesh_students={students_axis} must divide both the {n} devices and the {num_students} '
                        'students')
  else:
    students_axis = math.gcd(n, num_students)
    while batch_size and students_axis > 1 and batch_size % (n // students_axis):
      students_axis -= 1
      while n % students_axis or num_students % students_axis:
        students_axis -= 1
  return Mesh(np.array(devices).reshape(students_axis, n // students_axis), ('students', 'data'))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def students_sharded(mesh: Mesh) -> NamedSharding:
  """Arrays with a leading students axis (the train state, the swept hyperparameters)."""
  return NamedSharding(mesh, P('students'))


def data_size(mesh: Mesh) -> int:
  return mesh.shape['data']
