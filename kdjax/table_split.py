"""A table too large for one device's memory, split into the fewest programs that fit, run one after another.

A table (kdjax/sweep.py: `method=` / `student.model=` axes) trains its groups in one program against one teachers'
pass a step. When XLA's estimate of that program (or its train state alone, before compiling:
`memory.estimate_before_compile`) exceeds what a device offers (`config.memory_budget_gb`, 0 = the device's), `plan`
estimates each group alone and packs the groups into programs:

- each group alone is compiled (the program of that group and the teachers) and XLA's analysis of it is its cost;
  the teachers' variables, which every program holds once, are counted once per program and the rest of each
  group's cost is added up. XLA reuses buffers across the students of a program, so the sum errs high: a planned
  program may have room to spare, and each program's own compiled estimate is checked again before it trains;
- the groups are packed first-fit decreasing (largest first, each into the first program with room): a heuristic
  for the fewest programs (bin packing is NP-hard), within 11/9 of the optimum plus one;
- a group that alone does not fit is refused in one line naming it, before anything is written.

The plan is saved in the workdir (`split.json`) before the first program trains, and each program is a run of its
own in `programs/<p>/` (its checkpoints, records and summary): a run stopped in the second program resumes there,
the first program's final checkpoint restored and not trained again. `gather` writes the workdir's metrics.jsonl
from the programs' records, numbered as the whole table's students, so results.csv and table.md show every group.
"""

from __future__ import annotations

import json
import os

from absl import logging

from kdjax import atomic
from kdjax import memory
from kdjax import sharding
from kdjax import sweep as sweep_lib
from kdjax.errors import ConfigError

PLAN_FILE = 'split.json'


class Split(Exception):
  """Raised by the run's setup when its table is to be split: `sweep` (the groups that apply) and `plan`."""

  def __init__(self, sweep, plan: dict):
    super().__init__('the table is split into programs')
    self.sweep, self.plan = sweep, plan


def program_dir(workdir: str, p: int) -> str:
  return os.path.join(workdir, 'programs', str(p))


def plan(trainer, build) -> dict:
  """The programs that fit: {'programs': [{'groups': [name, ...], 'students': [index, ...], 'bytes': n}, ...],
  'available': bytes, 'shared': the teachers' bytes, 'groups': {name: its own bytes}}, each program's groups and
  students in the table's order, the programs in the order of their first group. `build(sub_sweep, mesh)` makes the
  Trainer of a program of one group."""
  sweep, base = trainer.sweep, trainer.cfg
  shared = memory.tree_bytes(trainer.teacher_vars) if trainer.teacher_vars is not None else 0
  own, free = {}, None
  for g in sweep.groups:
    sub = sweep_lib.subset(sweep, [g.name])
    mesh = sharding.make_mesh(base.num_devices, g.size, base.mesh_students, base.batch_size)
    alone = build(sub, mesh)
    try:
      est = alone.compile(alone.init_state(abstract=True))
    finally:
      alone.source.close()
    free = est['available']
    if not memory.fits(est):
      raise ConfigError(f'config.sweep: the group {g.name} alone {memory.needs(est)} (config.memory_budget_gb = '
                        f'{base.memory_budget_gb:g}): the table does not fit even split into programs; use more '
                        'devices, fewer seeds or a smaller batch_size')
    own[g.index] = max(est['total'] - shared, 0)
  groups = {g.index: g for g in sweep.groups}
  return {'available': int(free), 'shared': int(shared), 'groups': {groups[i].name: int(b) for i, b in own.items()},
          'programs': [
      {'groups': [groups[i].name for i in p], 'bytes': int(shared + sum(own[i] for i in p)),
       'students': [s for i in p for s in range(groups[i].offset, groups[i].offset + groups[i].size)]}
      for p in pack(own, memory.MEMORY_FRACTION * free - shared)]}


def pack(sizes: dict, room: float) -> list:
  """`sizes` ({item: size}, each <= `room`) packed first-fit decreasing into lists of items of total <= `room`:
  each item, largest first, into the first list with room for it, else a new one. Each list sorted, the lists in
  the order of their first item."""
  bins = []  # [[item, ...], used]
  for i in sorted(sizes, key=lambda i: (-sizes[i], i)):
    target = next((b for b in bins if b[1] + sizes[i] <= room), None)
    if target is None:
      bins.append([[], 0])
      target = bins[-1]
    target[0].append(i)
    target[1] += sizes[i]
  return sorted((sorted(b[0]) for b in bins), key=lambda b: b[0])


def describe(plan: dict) -> str:
  """The one line saying how the table was split."""
  return (f"table split into {len(plan['programs'])} programs to fit memory: " +
          ' '.join('[' + ', '.join(p['groups']) + ']' for p in plan['programs']))


def save(workdir: str, plan: dict):
  os.makedirs(workdir, exist_ok=True)
  with atomic.writing(os.path.join(workdir, PLAN_FILE)) as f:
    json.dump(plan, f, indent=2)


def load(workdir: str) -> dict | None:
  """The saved plan of a split run in `workdir`, or None."""
  path = os.path.join(workdir, PLAN_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      plan = json.load(f)
    ok = isinstance(plan, dict) and isinstance(plan.get('programs'), list) and plan['programs'] and all(
        isinstance(p, dict) and isinstance(p.get('groups'), list) and isinstance(p.get('students'), list)
        and all(isinstance(g, str) for g in p['groups']) and all(isinstance(i, int) for i in p['students'])
        for p in plan['programs'])
    why = '' if ok else 'not a plan of programs with their groups and students'
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    why = str(e).splitlines()[0] if str(e) else type(e).__name__
  if why:
    raise ConfigError(f'{path} is damaged ({why}): the split table cannot resume from it; restore it, or start the '
                      'table again in a new workdir')
  return plan


def gather(workdir: str, plan: dict):
  """The workdir's metrics.jsonl from its programs' epoch records (up to where each program got), each student
  numbered as in the whole table."""
  lines = []
  for p, program in enumerate(plan['programs']):
    path = os.path.join(program_dir(workdir, p), 'metrics.jsonl')
    if not os.path.exists(path):
      break
    with open(path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut short by a crash mid-write
        if isinstance(record, dict) and 'epoch' in record:
          record['student'] = program['students'][record.get('student', 0)]
          lines.append(json.dumps(record))
  with atomic.writing(os.path.join(workdir, 'metrics.jsonl')) as f:
    f.write(''.join(l + '\n' for l in lines))
  logging.info('%s: the records of %d program(s) gathered', workdir, len(plan['programs']))
