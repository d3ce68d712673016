"""A sweep's memory, estimated before its program is compiled.

`Trainer.compile` compiles the whole program of the S students and XLA's memory analysis of it (`estimate`) is
what `check` compares with the device's memory. Unrolled (`students_loop='unroll'`, the CPU's default) that
program holds one copy of the step per student and compiles for longer the more there are (kdjax/sweep.py,
MAX_UNROLLED_STUDENTS), so a sweep too large for memory would compile for many minutes before being refused.
`estimate_before_compile` refuses it first, from what costs little:

- the train state of the S students (parameters, optimizer state, statistics), known exactly from the abstract
  state's shapes: when it alone does not fit, nothing is compiled;
- unrolled, above `PRE_ESTIMATE_STUDENTS` students: the programs of 1 and 2 students per device, compiled and
  analysed by XLA. Their difference is one student's temporaries (its activations and gradients), which grow
  linearly with the students, and the rest does not grow (XLA's analysis of the digits step, cnn_small, batch 64:
  2.3-2.6 MiB of temporaries a student from 1 to 128 students unrolled, 3.1-3.4 MiB from 1 to 64 vmapped).

Vmapped (accelerators), the whole program compiles in the time of one student's (the digits step: 5.2 s for 1
student, 4.8 s for 8, 5.5 s for 64), so only the state is checked first: XLA's analysis of the whole program follows
at once. A teacher whose forward pass needs more temporaries than the students' can make the difference of the two
small programs smaller than a student's share: the estimate is then low, never high, and the whole program's
analysis still refuses what does not fit. A run of one student, or a few, compiles nothing more.
"""

from __future__ import annotations

import math

from absl import logging
import jax
import jax.numpy as jnp

from kdjax.errors import ConfigError

# The part of a device's memory a run may plan to use (XLA's estimate is not exact; the rest is headroom).
MEMORY_FRACTION = 0.9
# Above this many unrolled students the programs of 1 and 2 students per device are compiled first (about 4 s for
# the digits step, where 16 students compile in 30 s and 128 in 11 minutes).
PRE_ESTIMATE_STUDENTS = 16


def available(num_devices: int, budget_gb: float = 0.0) -> int | None:
  """Bytes one device may use: `budget_gb` when > 0 (config.memory_budget_gb), else the accelerator's limit, or on
  the CPU the host's available memory shared by the CPU devices. None when unknown."""
  if budget_gb and budget_gb > 0:
    return int(budget_gb * 2**30)
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


def estimate(compiled, state_bytes: int, num_devices: int, budget_gb: float = 0.0) -> dict:
  """XLA's memory estimate per device of a compiled train dispatch: {'state', 'temp', 'total', 'available'} in
  bytes (`state_bytes`: one device's share of the train state; `budget_gb`: `available`'s)."""
  out = {'state': state_bytes, 'temp': 0, 'total': state_bytes, 'available': available(num_devices, budget_gb)}
  analysis = compiled.memory_analysis()
  if analysis is not None:
    out['temp'] = int(analysis.temp_size_in_bytes)
    out['total'] = int(analysis.argument_size_in_bytes + analysis.temp_size_in_bytes +
                       max(analysis.output_size_in_bytes - analysis.alias_size_in_bytes, 0))
  return out


def estimate_before_compile(trainer, abstract) -> dict | None:
  """The memory per device that `trainer`'s whole program will need, estimated without compiling it, in
  `estimate`'s form plus 'basis' (how it was estimated); None when the run is small enough to compile at once, or
  the device's memory is unknown. `abstract` is `trainer.init_state(abstract=True)`."""
  mesh = trainer.mesh
  free = available(mesh.devices.size, trainer.cfg.get('memory_budget_gb', 0.0))
  if not free:
    return None
  per_axis = mesh.shape['students']
  per_device = trainer.num_students // per_axis
  state = tree_bytes(abstract) // per_axis
  if state > MEMORY_FRACTION * free:
    return {'state': state, 'temp': 0, 'total': state, 'available': free,
            'basis': 'its train state alone, before compiling anything'}
  if (trainer.parts.students_loop != 'unroll' or trainer.num_students <= PRE_ESTIMATE_STUDENTS or per_device < 2 or
      trainer.grouped):  # a table's groups differ: no one student's program to scale
    return None
  logging.info('%d unrolled students: estimating the memory from the programs of 1 and 2 students per device '
               'before compiling the whole sweep', trainer.num_students)
  one, two = (t.compile(t.init_state(abstract=True)) for t in (trainer.with_students(per_axis),
                                                                trainer.with_students(2 * per_axis)))
  student_temp = max(two['temp'] - one['temp'], 0)
  temp = one['temp'] + (per_device - 1) * student_temp
  total = state + (one['total'] - one['state']) + (per_device - 1) * student_temp
  return {'state': state, 'temp': temp, 'total': total, 'available': free,
          'basis': 'the programs of 1 and 2 students per device, before compiling the whole sweep'}


def fits(memory: dict | None) -> bool:
  """Whether `memory` (`estimate`'s or `estimate_before_compile`'s, or None: nothing known) fits a device."""
  return not (memory and memory['available'] and memory['total'] > MEMORY_FRACTION * memory['available'])


def needs(memory: dict, note: str = '') -> str:
  """'needs about X GiB per device (train state S GiB, XLA temporaries T GiB[note]) but A GiB are available': the
  refusals' account of an estimate."""
  gib = lambda b: b / 2**30
  return (f"needs about {gib(memory['total']):.2f} GiB per device (train state {gib(memory['state']):.2f} GiB, XLA "
          f"temporaries {gib(memory['temp']):.2f} GiB{note}) but {gib(memory['available']):.2f} GiB are available")


def check(memory: dict | None, num_students: int):
  """Logs the estimate; refuses (one line) a program that needs more than MEMORY_FRACTION of what a device offers.
  `memory`: `estimate`'s or `estimate_before_compile`'s (whose 'basis' says how it was made), or None."""
  if memory is None:
    return
  gib = lambda b: b / 2**30
  basis = memory.get('basis')
  logging.info('%s: about %.2f GiB per device (train state %.2f GiB, XLA temporaries %.2f GiB)%s',
               f'estimated from {basis}' if basis else 'compiled', gib(memory['total']), gib(memory['state']),
               gib(memory['temp']), f"; {gib(memory['available']):.1f} GiB available" if memory['available'] else '')
  if not fits(memory):
    what = f'the sweep of {num_students} students' if num_students > 1 else 'this run'
    how = f'; estimated from {basis}' if basis else ''
    raise ConfigError(f'{what} {needs(memory, how)}; sweep fewer students, use more devices or a smaller '
                      'batch_size')
