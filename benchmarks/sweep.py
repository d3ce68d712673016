r"""The 45-student Hinton-KD grid (alpha 5 x T 9) as one program against the same students run one after another.

Each contender runs in a fresh process (its own compilation and its own peak memory): the sweep, one program of 45
students sharing one teacher pass; and one student alone, whose time is multiplied by 45 for the sequential
baseline (every sequential run pays its own start-up, compilation and teacher forward; the students are identical
in cost, so one is timed and the total extrapolated, as the table says). Timed: building the experiment and
compiling its step, then `--steps` train steps after one warm-up step; the wall time of a run of `--epochs` epochs
is extrapolated from those.

Scenarios: digits (sklearn's real 8x8 digits, resnet20 -> cnn2, batch 64, the teacher's outputs cached since the
images are not augmented) and CIFAR-shaped synthetic data (random 32x32x3 uint8 images, 10 classes, ResNet18 ->
cnn2, batch 128, pad-4 crop + flip on the device: the teacher runs every step).

  python benchmarks/sweep.py                       # both scenarios, 2 CPU cores: about 10 minutes
  python benchmarks/sweep.py --scenarios digits --steps 20
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID = 'alpha=0.1,0.25,0.5,0.75,0.9; distill.temperature=1,2.5,5,7.5,10,20,30,40,50'
SCENARIOS = {
    'digits': dict(teacher='resnet20', student='cnn2', batch=64, train=1437, image=(8, 8, 1), epochs=10),
    'cifar': dict(teacher='ResNet18', student='cnn2', batch=128, train=50000, image=(32, 32, 3), epochs=100),
}


def measure(scenario: str, students: int, steps: int) -> dict:
  """Runs in its own process: build + compile, one warm-up step, then `steps` timed steps."""
  sys.path.insert(0, ROOT)
  import kdjax.platform  # noqa: F401
  import jax
  import jax.numpy as jnp
  import numpy as np
  from kdjax import config_lib, data as data_lib, models, sharding, trainer as trainer_lib
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  spec = SCENARIOS[scenario]
  t0 = time.perf_counter()
  c = config_lib.base()
  c.student.model, c.teacher.model = spec['student'], spec['teacher']
  config_lib.alpha_losses(c, 0.9)
  c.distill.kd_scale = '1'
  c.batch_size = spec['batch']
  c.epochs = spec['epochs']
  c.schedule.name = 'cosine'
  c.tensorboard = False
  if students > 1:
    c.sweep = GRID
  if scenario == 'digits':
    ds = data_lib.load(c.data)
  else:
    rng = np.random.default_rng(0)
    # 20 batches' worth of images: the step's cost does not depend on the training set's size.
    n = 20 * spec['batch']
    split = data_lib.Split(rng.integers(0, 256, (n,) + spec['image'], np.uint8), rng.integers(0, 10, n, np.int32))
    test = data_lib.Split(split.images[:500], split.labels[:500])
    ds = data_lib.Dataset('synthetic_cifar', 10, split, test, None, (0.5,) * 3, (0.25,) * 3, 'crop_flip')
  teacher = models.create(spec['teacher'], num_classes=10)
  teacher_vars = teacher.init(jax.random.key(0), jnp.zeros((1,) + ds.image_shape))
  exp = trainer_lib.build(c, ds, None, teacher, teacher_vars)
  memory = exp.compile(exp.init_state(abstract=True))
  ts = exp.init_state()
  ts, m = exp.train_chunk(ts, 0, 0)
  jax.block_until_ready(m)
  t_first = time.perf_counter() - t0
  t1 = time.perf_counter()
  for i in range(steps):
    ts, m = exp.train_chunk(ts, 0, (1 + i) % exp.steps_per_epoch)
  jax.block_until_ready(m)
  per_step = (time.perf_counter() - t1) / steps
  return {'students': exp.num_students, 'first_step_s': t_first, 'step_s': per_step,
          'steps_per_epoch': spec['train'] // spec['batch'], 'epochs': spec['epochs'], 'batch': spec['batch'],
          'xla_bytes': memory['total'], 'peak_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
          'teacher_cached': exp.teacher_table is not None, 'devices': jax.device_count(),
          'backend': jax.default_backend()}


def run_child(scenario: str, students: int, steps: int) -> dict:
  out = subprocess.run([sys.executable, __file__, '--child', scenario, str(students), str(steps)],
                       capture_output=True, text=True, check=False)
  if out.returncode:
    sys.exit(f'error: the {scenario} run with {students} student(s) failed:\n{out.stderr[-3000:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def report(scenario: str, steps: int):
  sweep = run_child(scenario, 45, steps)
  one = run_child(scenario, 1, steps)
  spec = SCENARIOS[scenario]
  total = lambda r: r['first_step_s'] + r['step_s'] * (r['steps_per_epoch'] * r['epochs'] - 1)
  seq = 45 * total(one)
  rows = [
      ('contender', 'start-up+compile+1st step', 'step (all students)', 'img/s per student',
       'student-img/s, all', f"{spec['epochs']} epochs (est.)", 'peak RSS', 'XLA estimate'),
      ('1 student alone', f"{one['first_step_s']:.1f} s", f"{one['step_s'] * 1e3:.1f} ms",
       f"{one['batch'] / one['step_s']:.0f}", f"{one['batch'] / one['step_s']:.0f}", f'{total(one) / 60:.1f} min',
       f"{one['peak_rss_bytes'] / 2**20:.0f} MiB", f"{one['xla_bytes'] / 2**20:.0f} MiB"),
      ('45 students, one after another (45 x the above)', f"{45 * one['first_step_s']:.1f} s",
       f"{45 * one['step_s'] * 1e3:.1f} ms", f"{one['batch'] / one['step_s']:.0f} (one at a time)",
       f"{one['batch'] / one['step_s']:.0f}", f'{seq / 60:.1f} min', f"{one['peak_rss_bytes'] / 2**20:.0f} MiB", '-'),
      ('45 students, one program', f"{sweep['first_step_s']:.1f} s", f"{sweep['step_s'] * 1e3:.1f} ms",
       f"{sweep['batch'] / sweep['step_s']:.0f}", f"{45 * sweep['batch'] / sweep['step_s']:.0f}",
       f'{total(sweep) / 60:.1f} min', f"{sweep['peak_rss_bytes'] / 2**20:.0f} MiB",
       f"{sweep['xla_bytes'] / 2**20:.0f} MiB"),
  ]
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  print(f"\n{scenario}: {spec['teacher']} -> {spec['student']}, batch {spec['batch']}, "
        f"{one['steps_per_epoch']} steps/epoch, teacher outputs cached: {sweep['teacher_cached']}; "
        f"{one['backend']}, {os.cpu_count()} cores; {steps} timed steps each")
  for i, r in enumerate(rows):
    print('  '.join(c.ljust(w) for c, w in zip(r, widths)))
    if i == 0:
      print('  '.join('-' * w for w in widths))
  print(f'one program / one student: {total(sweep) / total(one):.2f}x the wall time of one student '
        f'(goal <= 5x); sequential / one program: {seq / total(sweep):.1f}x faster')


def main():
  if len(sys.argv) > 1 and sys.argv[1] == '--child':
    print(json.dumps(measure(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
    return
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--scenarios', default='digits,cifar')
  parser.add_argument('--steps', type=int, default=10)
  args = parser.parse_args()
  for scenario in args.scenarios.split(','):
    report(scenario, args.steps)


if __name__ == '__main__':
  main()
