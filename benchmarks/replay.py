r"""A KD sweep trained from the teacher replay store (kdjax/replay.py) beside the same sweep with the live teacher.

CIFAR-shaped synthetic data (random 32x32x3 uint8 images, 100 classes, pad-4 crop + flip on the device, so the
teacher would run every step), resnet32x4 -> resnet8x4 (random teacher: speed does not depend on its weights),
KD 0.1 CE + 0.9 KD, a sweep over distill.temperature (`--students` values, one program). Three processes, each
timed from its start: making the store (the teacher once over every step, `replay.make`), the sweep from the store,
the sweep with the live teacher. Each sweep: build + compile + one warm-up step, then `--steps` timed steps. Prints
the per-step and total wall times side by side, their ratios, and the store's bytes per example (top `--topk`
logits of 100).

  python benchmarks/replay.py --steps 3            # 10 students, batch 64
  python benchmarks/replay.py --students 2 --batch 16 --teacher resnet20 --student resnet8 --steps 2
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup(args, store: str):
  """(config, dataset, teacher module, teacher variables), the same in every process."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from absl import logging
  from kdjax import config_lib, data as data_lib, models
  logging.set_verbosity(logging.WARNING)
  c = config_lib.base()
  c.student.model, c.teacher.model = args.student, args.teacher
  c.distill.losses = {'ce': 0.1, 'kd': 0.9}
  c.batch_size, c.epochs, c.tensorboard = args.batch, 1, False
  c.schedule.name = 'cosine'
  c.distill.teacher_store, c.distill.store_topk = store, args.topk
  if args.students > 1:
    c.sweep = 'distill.temperature=' + ','.join(str(1 + i) for i in range(args.students))
  rng = np.random.default_rng(0)
  n = (args.steps + 1) * args.batch  # one epoch: the warm-up step and the timed ones
  split = data_lib.Split(rng.integers(0, 256, (n, 32, 32, 3), np.uint8), rng.integers(0, 100, n, np.int32))
  test = data_lib.Split(split.images[:args.batch], split.labels[:args.batch])
  ds = data_lib.Dataset('synthetic_cifar100', 100, split, test, None, (0.5,) * 3, (0.25,) * 3, 'crop_flip')
  teacher = models.create(args.teacher, num_classes=100)
  teacher_vars = teacher.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  return c, ds, teacher, teacher_vars


def child(args) -> dict:
  t0 = time.perf_counter()
  sys.path.insert(0, ROOT)
  import kdjax.platform  # noqa: F401  (before jax)
  import jax
  from kdjax import replay, sharding, trainer as trainer_lib
  store = args.store if args.side != 'live' else ''
  c, ds, teacher, teacher_vars = _setup(args, store)
  if args.side == 'make':
    meta = replay.make(c, ds, sharding.make_mesh(1), teacher, teacher_vars, store, log=lambda _: None)
    return {'total_s': time.perf_counter() - t0, 'bytes_per_example': meta['bytes_per_example'],
            'store_bytes': sum(os.path.getsize(os.path.join(store, f'{n}.npy')) for n in replay.FILES)}
  exp = trainer_lib.build(c, ds, None, teacher, teacher_vars)
  exp.compile(exp.init_state(abstract=True))
  ts = exp.init_state()
  ts, m = exp.train_chunk(ts, 0, 0)
  jax.block_until_ready(m)
  first = time.perf_counter() - t0
  t1 = time.perf_counter()
  for i in range(args.steps):
    ts, m = exp.train_chunk(ts, 0, 1 + i)
  jax.block_until_ready(m)
  return {'first_s': first, 'step_s': (time.perf_counter() - t1) / args.steps, 'total_s': time.perf_counter() - t0,
          'students': exp.num_students, 'replayed': exp.store is not None}


def run_child(argv, side: str, store: str) -> dict:
  out = subprocess.run([sys.executable, __file__, *argv, '--side', side, '--store', store], capture_output=True,
                       text=True, check=False)
  if out.returncode:
    sys.exit(f'error: the {side} process failed:\n{out.stderr[-3000:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--students', type=int, default=10)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--topk', type=int, default=10)
  parser.add_argument('--teacher', default='resnet32x4')
  parser.add_argument('--student', default='resnet8x4')
  parser.add_argument('--side', default='')
  parser.add_argument('--store', default='')
  args = parser.parse_args()
  if args.side:
    print(json.dumps(child(args)))
    return
  argv = sys.argv[1:]
  load = os.getloadavg()[0]
  with tempfile.TemporaryDirectory() as tmp:
    store = os.path.join(tmp, 'store')
    made = run_child(argv, 'make', store)
    replayed = run_child(argv, 'store', store)
    live = run_child(argv, 'live', store)
  assert replayed['replayed'] and not live['replayed']
  print(f'{args.teacher} -> {args.student}, {live["students"]} students (distill.temperature sweep, one program), '
        f'batch {args.batch}, 32x32x3 crop_flip, 100 classes; {args.steps} timed steps; {os.cpu_count()} cores, '
        f'load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end')
  print(f'store: top {args.topk} of 100 logits, {made["bytes_per_example"]} bytes per example (dense float32: 400), '
        f'{made["store_bytes"]} bytes for {args.steps + 1} steps; made in {made["total_s"]:.1f} s (process total)')
  rows = [('contender', 'build+compile+1st step', 'step (all students)', 'process total'),
          ('live teacher', f'{live["first_s"]:.1f} s', f'{live["step_s"]:.2f} s', f'{live["total_s"]:.1f} s'),
          ('from the store', f'{replayed["first_s"]:.1f} s', f'{replayed["step_s"]:.2f} s',
           f'{replayed["total_s"]:.1f} s')]
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  for r in rows:
    print('  '.join(x.ljust(w) for x, w in zip(r, widths)))
  print(f'step speed-up (live / store): {live["step_s"] / replayed["step_s"]:.2f}x (goal >= 1.5x); '
        f'process wall time live / store: {live["total_s"] / replayed["total_s"]:.2f}x, '
        f'live / (store + making it): {live["total_s"] / (replayed["total_s"] + made["total_s"]):.2f}x')


if __name__ == '__main__':
  main()
