r"""What the CPU cannot measure, in one script for a GPU or TPU machine (under 8 minutes): kdjax against PyTorch eager
on the same device, vmap against unroll for a 45-student sweep and for a table, K steps in a rolled scan against
single steps, bfloat16 against float32, the teacher-output cache on against off. It prints one table and says which
of kdjax's `auto` settings the figures would change.

Every contender trains the same step on CIFAR-shaped synthetic data (random 32x32x3 uint8 images, batch 64,
resnet32x4 -> resnet8x4 unless said otherwise; the cache rows without augmentation, as the cache needs); throughput
is the median of timed blocks after the first dispatch (compilation excluded), in this one process, interleaved.

  python benchmarks/accelerator.py            # on the accelerator
  python benchmarks/accelerator.py --smoke    # the same code path on the CPU, tiny models and steps (a test)
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

FULL = dict(teacher='resnet32x4', student='resnet8x4', shape=(32, 32, 3), classes=100, batch=64, blocks=5, block=8,
            sweep='alpha=0.1,0.3,0.5,0.7,0.9; distill.temperature=1,2,3,4,5,6,8,10,20',
            table='method=kd,dkd,crd,fitnet,at,sp,vid,rkd,pkt,nst,cc,dist', k=32)
SMOKE = dict(teacher='cnn_small', student='cnn2', shape=(8, 8, 3), classes=10, batch=16, blocks=2, block=2,
             sweep='distill.temperature=2,4; optimizer.lr=0.01,0.05', table='method=kd,dkd', k=4)


def _trainer(spec, **settings):
  """A Trainer of the pair on synthetic data with `settings` (config fields, dotted) applied."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from kdjax import config_lib, data as data_lib, models, sweep as sweep_lib, trainer as trainer_lib
  c = config_lib.base()
  c.student.model, c.teacher.model = spec['student'], spec['teacher']
  config_lib.alpha_losses(c, 0.9)
  c.batch_size, c.epochs, c.tensorboard, c.num_devices = spec['batch'], 240, False, 1
  augment = settings.pop('augment', 'crop_flip')
  for path, value in settings.items():
    sweep_lib._set(c, path, value)
  rng = np.random.default_rng(0)
  n = 20 * spec['batch']
  shape, classes = spec['shape'], spec['classes']
  split = data_lib.Split(rng.integers(0, 256, (n,) + shape, np.uint8), rng.integers(0, classes, n, np.int32))
  ds = data_lib.Dataset('synthetic', classes, split, data_lib.Split(split.images[:64], split.labels[:64]), None,
                        (0.5,) * 3, (0.25,) * 3, augment)
  teacher = models.create(spec['teacher'], num_classes=classes)
  teacher_vars = teacher.init(jax.random.key(0), jnp.zeros((1,) + shape))
  sweep = trainer_lib.applicable(sweep_lib.expand(c), ds)
  return trainer_lib.build(c, ds, None, teacher, teacher_vars, sweep)


def kdjax_rate(spec, **settings) -> dict:
  """Student-images per second of the trainer with `settings` (all students), and its resolved settings."""
  import jax
  t = _trainer(spec, **settings)
  t.compile(t.init_state(abstract=True))
  ts = t.init_state()
  ts, m = t.train_chunk(ts, 0, 0)
  jax.block_until_ready(m)
  pos, rates = 0, []
  for _ in range(spec['blocks']):
    t0 = time.perf_counter()
    for _ in range(max(1, spec['block'] // t.k)):
      pos = (pos + t.k) % (t.steps_per_epoch - t.k + 1)
      ts, m = t.train_chunk(ts, 0, pos)
    jax.block_until_ready(m)
    rates.append(max(1, spec['block'] // t.k) * t.k * spec['batch'] * t.num_students / (time.perf_counter() - t0))
  return {'rate': statistics.median(rates), 'k': t.k, 'loop': t.parts.students_loop, 'steps_loop': t.steps_loop,
          'cached': t.teacher_table is not None}


def torch_rate(spec, smoke: bool) -> float | None:
  """PyTorch eager's images per second for the same KD step (on CUDA when there is one), in its own process."""
  code = f'''
import json, statistics, sys, time
sys.path.insert(0, {ROOT!r})
import torch
from torch.nn import functional as F
from benchmarks.step_speed import torch_net
spec = {json.dumps({k: v for k, v in spec.items() if k in ('teacher', 'student', 'shape', 'classes', 'batch', 'blocks',
                                                            'block')})}
dev = 'cuda' if torch.cuda.is_available() else 'cpu'
torch.manual_seed(0)
t, s = (torch_net(spec[n], tuple(spec['shape']), spec['classes']).to(dev) for n in ('teacher', 'student'))
t.eval(); s.train()
opt = torch.optim.SGD(s.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
h, w, c = spec['shape']
x = torch.randn(spec['batch'], c, h, w, device=dev); y = torch.randint(0, spec['classes'], (spec['batch'],), device=dev)
def step():
  with torch.no_grad():
    to = t(x)
  so = s(x)
  loss = 0.1 * F.cross_entropy(so, y) + 0.9 * 16 * F.kl_div(F.log_softmax(so / 4, -1), F.softmax(to / 4, -1),
                                                          reduction='batchmean')
  opt.zero_grad(); loss.backward(); opt.step()
step()
rates = []
for _ in range(spec['blocks']):
  if dev == 'cuda': torch.cuda.synchronize()
  t0 = time.perf_counter()
  for _ in range(spec['block']): step()
  if dev == 'cuda': torch.cuda.synchronize()
  rates.append(spec['block'] * spec['batch'] / (time.perf_counter() - t0))
print(json.dumps({{'rate': statistics.median(rates), 'device': dev}}))
'''
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=False)
  if out.returncode:
    print(f'PyTorch eager not measured: {(out.stderr.strip().splitlines() or ["failed"])[-1]}', flush=True)
    return None
  return json.loads(out.stdout.strip().splitlines()[-1])['rate']


def rows(spec, smoke: bool) -> list:
  """(setting, contender A, its rate, contender B, its rate, what a faster B would change)."""
  base = kdjax_rate(spec)
  out = []
  torch = torch_rate(spec, smoke)
  out.append(('kdjax vs PyTorch eager (KD pair)', 'kdjax', base['rate'], 'PyTorch eager', torch, None))
  for what, sweep in (('sweep', spec['sweep']), ('table', spec['table'])):
    vm = kdjax_rate(spec, sweep=sweep, students_loop='vmap')
    un = kdjax_rate(spec, sweep=sweep, students_loop='unroll')
    out.append((f'{what}: students vmapped vs unrolled', 'vmap', vm['rate'], 'unroll', un['rate'],
                'students_loop auto (vmap off the CPU) -> unroll'))
  scan = kdjax_rate(spec, steps_per_dispatch=spec['k'], steps_loop='scan')
  single = kdjax_rate(spec, steps_per_dispatch=1)
  out.append((f'{spec["k"]} steps in a rolled scan vs single steps', 'scan', scan['rate'], 'single', single['rate'],
              'steps_per_dispatch auto (up to 32, scan) -> 1'))
  f32 = kdjax_rate(spec, dtype='float32')
  bf16 = kdjax_rate(spec, dtype='bfloat16')
  out.append(('float32 vs bfloat16 activations', 'float32', f32['rate'], 'bfloat16', bf16['rate'],
              "dtype 'float32' (the default) -> 'bfloat16' for speed"))
  on = kdjax_rate(spec, augment='none', **{'distill.cache_teacher': 'on'})
  off = kdjax_rate(spec, augment='none', **{'distill.cache_teacher': 'off'})
  out.append(('teacher-output cache on vs off (no augmentation)', 'on', on['rate'], 'off', off['rate'],
              'distill.cache_teacher auto (on when it fits) -> off'))
  return out


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--smoke', action='store_true', help='tiny models and steps: the code path, on the CPU')
  args = parser.parse_args(argv)
  if args.smoke:
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  import kdjax.platform  # noqa: F401
  import jax
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  spec = SMOKE if args.smoke else FULL
  t0 = time.perf_counter()
  print(f"{jax.default_backend()} ({jax.devices()[0].device_kind}), {spec['teacher']} -> {spec['student']}, batch "
        f"{spec['batch']}{' (smoke: tiny shapes, the figures mean nothing)' if args.smoke else ''}", flush=True)
  table = rows(spec, args.smoke)
  header = ('setting', 'A', 'A img/s', 'B', 'B img/s', 'B / A')
  lines = [header]
  changes = []
  for setting, a, ra, b, rb, change in table:
    ratio = rb / ra if rb and ra else None
    lines.append((setting, a, f'{ra:.0f}', b, '-' if rb is None else f'{rb:.0f}',
                  '-' if ratio is None else f'{ratio:.2f}'))
    if change and ratio is not None and ratio > 1.05:
      changes.append(f'{change}: B is {ratio:.2f}x A ({setting})')
  widths = [max(len(str(r[i])) for r in lines) for i in range(len(header))]
  for i, line in enumerate(lines):
    print('  '.join(str(c).ljust(w) for c, w in zip(line, widths)))
    if i == 0:
      print('  '.join('-' * w for w in widths))
  print('auto settings these figures would change: ' + ('; '.join(changes) if changes else 'none (every auto choice '
                                                                                            'was at least as fast)'))
  print(f'{time.perf_counter() - t0:.0f} s in all')


if __name__ == '__main__':
  main(sys.argv[1:])
