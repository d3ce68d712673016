r"""A paper's table in one program against its methods run one after another, side by side in one run.

CIFAR-100-shaped synthetic data (random 32x32x3 uint8 images, 100 classes, pad-4 crop + flip in the step, so the
teacher runs every step), a randomly initialised resnet32x4 teacher (speed does not depend on its weights), batch 64.

  sequential   each method in its own process, one after another: start-up (imports), build, compile, N steps
  one program  the whole table (`config.sweep = 'method=...; student.model=...'`) in one process: the same N steps
               of every student, one teacher pass per step

Both sides are whole process wall times (start-up and compile included), measured in this run; the sequential side
runs first, then the program (a machine shared with other work slows both; the figures say under what load they
were taken). Also printed: the teacher's share of one method's step (its forward pass timed alone), XLA's memory
estimate and the peak RSS of each process.

  python benchmarks/table.py                          # 12 methods on resnet8x4, 10 steps
  python benchmarks/table.py --table=3x4 --steps=10   # 3 students x 4 methods
  python benchmarks/table.py --steps=2 --methods=kd,dkd   # a quick look
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

TABLES = {
    '12': (('kd', 'fitnet', 'at', 'sp', 'cc', 'vid', 'rkd', 'pkt', 'nst', 'crd', 'dkd', 'ft'), ('resnet8x4',)),
    '3x4': (('kd', 'dkd', 'crd', 'fitnet'), ('resnet8x4', 'ShuffleV1', 'ShuffleV2')),
}
TEACHER, BATCH, CLASSES = 'resnet32x4', 64, 100


def measure(methods: list, students: list, steps: int) -> dict:
  """In its own process: build, compile, one dispatch, then `steps` timed steps; the teacher pass timed alone."""
  import kdjax.platform  # noqa: F401
  import jax
  import jax.numpy as jnp
  import numpy as np
  from absl import logging
  from kdjax import config_lib, data as data_lib, distill, models, sweep as sweep_lib, trainer as trainer_lib
  logging.set_verbosity(logging.WARNING)
  c = config_lib.base()
  c.student.model, c.teacher.model = students[0], TEACHER
  # One step a dispatch on both sides (the CPU's auto setting unrolls 4 for a lone convolutional student of a long run,
  # compiling it longer): the same N steps timed everywhere.
  c.batch_size, c.epochs, c.tensorboard, c.steps_per_dispatch = BATCH, 240, False, 1
  c.distill.cache_teacher = 'off'
  c.data.name = 'cifar100'
  if len(methods) * len(students) > 1:
    c.sweep = f"method={','.join(methods)}" + (f"; student.model={','.join(students)}" if len(students) > 1 else '')
    c.sweep_skip_inapplicable = True
  else:
    distill.method_config(c, methods[0])
  rng = np.random.default_rng(0)
  n = 20 * BATCH  # the step's cost does not depend on the training set's size
  split = data_lib.Split(rng.integers(0, 256, (n, 32, 32, 3), np.uint8), rng.integers(0, CLASSES, n, np.int32))
  test = data_lib.Split(split.images[:256], split.labels[:256])
  ds = data_lib.Dataset('synthetic_cifar100', CLASSES, split, test, None, (0.5,) * 3, (0.25,) * 3, 'crop_flip')
  teacher = models.create(TEACHER, num_classes=CLASSES)
  teacher_vars = teacher.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  sweep = trainer_lib.applicable(sweep_lib.expand(c), ds)
  t = trainer_lib.build(c, ds, None, teacher, teacher_vars, sweep)
  memory = t.compile(t.init_state(abstract=True))
  ts = t.init_state()
  ts, m = t.train_chunk(ts, 0, 0)
  jax.block_until_ready(m)
  t1 = time.perf_counter()
  for i in range(steps):
    ts, m = t.train_chunk(ts, 0, (1 + i) % t.steps_per_epoch)
  jax.block_until_ready(m)
  step_s = (time.perf_counter() - t1) / steps
  forward = jax.jit(lambda v, x: teacher.apply(v, x, train=False))
  x = jnp.zeros((BATCH, 32, 32, 3))
  jax.block_until_ready(forward(teacher_vars, x))
  t2 = time.perf_counter()
  for _ in range(max(steps, 3)):
    out = forward(teacher_vars, x)
  jax.block_until_ready(out)
  teacher_s = (time.perf_counter() - t2) / max(steps, 3)
  return {'students': t.num_students, 'step_s': step_s, 'teacher_s': teacher_s, 'xla_bytes': memory['total'],
          'peak_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
          'skipped': [v for v, _ in sweep.skipped], 'backend': jax.default_backend()}


def child(methods: list, students: list, steps: int) -> tuple[dict, float]:
  """(measure's figures, the process's wall time: start-up, imports, build, compile and the steps)."""
  t0 = time.perf_counter()
  out = subprocess.run([sys.executable, __file__, '--child', ','.join(methods), ','.join(students), str(steps)],
                       capture_output=True, text=True, check=False)
  wall = time.perf_counter() - t0
  if out.returncode:
    sys.exit(f'error: the run of {methods} on {students} failed:\n{out.stderr[-3000:]}')
  return json.loads(out.stdout.strip().splitlines()[-1]), wall


def main(argv):
  import argparse
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--table', choices=sorted(TABLES), default='12')
  parser.add_argument('--methods', help='comma-separated methods instead of the table\'s')
  parser.add_argument('--steps', type=int, default=10)
  args = parser.parse_args(argv)
  methods, students = TABLES[args.table]
  methods = args.methods.split(',') if args.methods else list(methods)
  load = os.getloadavg()[0]
  print(f'{TEACHER} -> {", ".join(students)}: {len(methods)} methods ({", ".join(methods)}), batch {BATCH}, '
        f'{args.steps} timed steps; {os.cpu_count()} cores, load average {load:.1f} at the start', flush=True)
  seq, seq_wall = [], 0.0
  for s in students:
    for m in methods:
      r, wall = child([m], [s], args.steps)
      seq.append((m, s, r, wall))
      seq_wall += wall
      print(f'  sequential {m:>7} on {s:<10} {wall:7.1f} s  (step {r["step_s"] * 1e3:7.1f} ms, teacher pass '
            f'{r["teacher_s"] * 1e3:6.1f} ms, XLA {r["xla_bytes"] / 2**20:6.0f} MiB, RSS '
            f'{r["peak_rss_bytes"] / 2**20:5.0f} MiB)', flush=True)
  table, wall = child(methods, students, args.steps)
  share = sum(r['teacher_s'] / r['step_s'] for _, _, r, _ in seq) / len(seq)
  print(f'  one program: {table["students"]} students {wall:7.1f} s  (step {table["step_s"] * 1e3:.1f} ms for all, '
        f'XLA {table["xla_bytes"] / 2**20:.0f} MiB, RSS {table["peak_rss_bytes"] / 2**20:.0f} MiB)'
        + (f'; left out as inapplicable: {table["skipped"]}' if table['skipped'] else ''))
  steps_seq = sum(r['step_s'] for _, _, r, _ in seq)
  print(f'\nsequential (each in its own process) {seq_wall:.1f} s; one program {wall:.1f} s: '
        f'{wall / seq_wall:.2f}x the sequential wall time (goal <= 0.5x)')
  print(f'steps alone: {steps_seq * 1e3:.0f} ms for the {len(seq)} runs\' steps one after another, '
        f'{table["step_s"] * 1e3:.0f} ms for the program\'s one step of all ({table["step_s"] / steps_seq:.2f}x); '
        f"the teacher's forward pass is {100 * share:.0f} % of one method's step (mean over the runs); "
        f'load average {os.getloadavg()[0]:.1f} at the end')


if __name__ == '__main__':
  if len(sys.argv) > 1 and sys.argv[1] == '--child':
    ms, ss, n = sys.argv[2].split(','), sys.argv[3].split(','), int(sys.argv[4])
    print(json.dumps(measure(ms, ss, n)))
  else:
    main(sys.argv[1:])
