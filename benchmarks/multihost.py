r"""The same digits KD run as 1 process x 4 devices and as 2 processes x 2 devices (jax.distributed on localhost),
side by side: wall time and training images/s. On one CPU host this measures the multi-controller overhead (gloo
collectives between processes, per-dispatch agreement on a stop signal, two JAX start-ups), not a speed-up.

  python benchmarks/multihost.py --epochs=10 --workdir=/tmp/kdjax_multihost

The teacher (configs/mnist.py:cnn,digits, cnn_small) is trained first, once, and cached; both contenders read it.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_integer('epochs', 10, 'Student epochs.')
flags.DEFINE_integer('batch_size', 64, 'Global batch size.')
flags.DEFINE_string('workdir', '/tmp/kdjax_multihost', 'Where the runs go (emptied first).')
FLAGS = flags.FLAGS


def _port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch(workdir: str, processes: int, devices: int) -> float:
  """Runs the config as `processes` x `devices`; returns the wall time (start of the processes to their exit)."""
  args = [sys.executable, 'launch.py', '--config=configs/mnist.py:cnn,digits', f'--workdir={workdir}',
          f'--config.epochs={FLAGS.epochs}', f'--config.batch_size={FLAGS.batch_size}', '--config.num_devices=0',
          '--config.tensorboard=False', '--config.figures=False', '--config.teacher.recipe.epochs=5',
          f'--config.teacher.cache_dir={os.path.join(FLAGS.workdir, "teachers")}']
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  port = _port()
  extra = [[] if processes == 1 else [f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={processes}',
                                      f'--process_id={i}'] for i in range(processes)]
  logs = [open(os.path.join(FLAGS.workdir, f'{os.path.basename(workdir)}.{i}.log'), 'w') for i in range(processes)]
  t0 = time.time()
  procs = [subprocess.Popen(args + e, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
           for e, log in zip(extra, logs)]
  try:
    codes = [p.wait() for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for log in logs:
      log.close()
  if any(codes):
    raise SystemExit(f'{workdir}: exit status {codes}; see {FLAGS.workdir}/*.log')
  return time.time() - t0


def _rates(workdir: str):
  """(img/s over the epochs after the first, which includes compilation; the whole run's test accuracy)."""
  records = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  epochs = [r for r in records if 'epoch' in r]
  later = epochs[1:] or epochs
  images = sum(r['img_per_s'] * r['epoch_seconds'] for r in later)
  return images / sum(r['epoch_seconds'] for r in later), epochs[-1].get('test_accuracy', float('nan'))


def main(argv):
  del argv
  shutil.rmtree(FLAGS.workdir, ignore_errors=True)
  os.makedirs(FLAGS.workdir)
  _launch(os.path.join(FLAGS.workdir, 'warmup'), 1, 4)  # trains and caches the teacher; warms the disk caches
  rows = []
  for processes, devices in ((1, 4), (2, 2)):
    workdir = os.path.join(FLAGS.workdir, f'{processes}x{devices}')
    wall = _launch(workdir, processes, devices)
    rate, acc = _rates(workdir)
    rows.append((f'{processes} process(es) x {devices} devices', f'{wall:.1f}', f'{rate:.0f}', f'{acc:.4f}'))
  head = ('run', 'wall s', 'img/s (epochs 2+)', 'test acc')
  widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
  print(f'digits KD, cnn_small -> cnn_small(8,16), {FLAGS.epochs} epochs, batch {FLAGS.batch_size}, '
        f'{os.cpu_count()} CPU cores')
  for r in [head, tuple('-' * w for w in widths)] + rows:
    print('  '.join(c.ljust(w) for c, w in zip(r, widths)))
  print(f'2x2 / 1x4 wall time: {float(rows[1][1]) / float(rows[0][1]):.2f}x (one host: overhead, not speed-up)')


if __name__ == '__main__':
  app.run(main)
