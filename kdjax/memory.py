"""A sweep's memory, estimated before its program is compiled.

`Experiment.compile` compiles the whole program of the S students and XLA's memory analysis of it is what
`train._check_memory` compares with the device's memory. Unrolled (`students_loop='unroll'`, the CPU's default) that
program holds one copy of the step per student and compiles for longer the more there are (kdjax/sweep.py,
MAX_UNROLLED_STUDENTS), so a sweep too large for memory would compile for many minutes before being refused.
`estimate` refuses it first, from what costs little:

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

# The part of a device's memory a run may plan to use (XLA's estimate is not exact; the rest is headroom).
MEMORY_FRACTION = 0.9
# Above this many unrolled students the programs of 1 and 2 students per device are compiled first (about 4 s for
# the digits step, where 16 students compile in 30 s and 128 in 11 minutes).
PRE_ESTIMATE_STUDENTS = 16


def _bytes(tree) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def estimate(exp, abstract, available: int | None) -> dict | None:
  """The memory per device that `exp`'s whole program will need, estimated without compiling it, in
  `Experiment.compile`'s form ({'state', 'temp', 'total', 'available'} in bytes, plus 'basis': how it was
  estimated); None when the run is small enough to compile at once, or the device's memory is unknown.
  `abstract` is `exp.init_state(abstract=True)`."""
  if not available:
    return None
  per_axis = exp.mesh.shape['students']
  per_device = exp.num_students // per_axis
  state = _bytes(abstract) // per_axis
  if state > MEMORY_FRACTION * available:
    return {'state': state, 'temp': 0, 'total': state, 'available': available,
            'basis': 'its train state alone, before compiling anything'}
  if exp.students_loop != 'unroll' or exp.num_students <= PRE_ESTIMATE_STUDENTS or per_device < 2:
    return None
  logging.info('%d unrolled students: estimating the memory from the programs of 1 and 2 students per device '
               'before compiling the whole sweep', exp.num_students)
  one, two = (e.compile(e.init_state(abstract=True)) for e in (exp.with_students(per_axis),
                                                                exp.with_students(2 * per_axis)))
  student_temp = max(two['temp'] - one['temp'], 0)
  temp = one['temp'] + (per_device - 1) * student_temp
  total = state + (one['total'] - one['state']) + (per_device - 1) * student_temp
  return {'state': state, 'temp': temp, 'total': total, 'available': available,
          'basis': 'the programs of 1 and 2 students per device, before compiling the whole sweep'}
