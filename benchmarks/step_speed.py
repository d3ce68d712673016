r"""Train-step speed and time to first step, kdjax beside PyTorch (eager and torch.compile), pair by pair, in one run.

Each contender runs in a fresh process (its own imports, build, compile), several times, interleaved with the
others: pair by pair, repeat by repeat, every contender once, so that a machine shared with other work slows them
alike; the table gives the medians over repeats. Every contender trains the same networks on the same batch size
with the same loss and optimizer (SGD momentum 0.9, wd 5e-4):

  KD     teacher (eval mode, no gradient) forward, student forward, 0.1 CE + 0.9 KD at T = 4, backward, SGD step
  SimKD  the same teacher pass to its last feature map, the student's last map through SimKD's projector
         (conv1x1-BN-ReLU, conv3x3-BN-ReLU, conv1x1-BN-ReLU, factor 2), MSE to the teacher's map, backward, SGD step

kdjax is timed as it trains (one jitted dispatch of K steps: the batch gathered from the device-resident uint8
arrays, pad-4 crop + flip on 32x32 data, normalised, the teacher pass every step: `distill.cache_teacher = off`, so
that both sides do the same work); PyTorch runs the reference codebases' loop body on a ready float tensor (no data
loader, no augmentation). Columns:

  img/s               steady training throughput (the median of timed blocks of steps, after the first dispatch)
  first step          time to first step after the imports: build (teacher variables placed as a checkpoint
                      restore places them, Trainer, initial state) + compile + the first dispatch; PyTorch: the
                      modules, optimizer and the first step (torch.compile compiles there)
  kdjax cold / warm   the persistent compilation cache (kdjax.compile_cache) empty, then filled by the cold process

  python benchmarks/step_speed.py                                  # every pair, 3 repeats
  python benchmarks/step_speed.py --pairs=resnet20-resnet8 --repeats=5 --seconds=20
  python benchmarks/step_speed.py --pairs=resnet20-resnet8 --ks=1,4,8 --loops=unroll,scan   # dispatch settings
  python benchmarks/step_speed.py --trees=before=/tmp/kdjax_before --no-torch --no-torch_compile   # a code change
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

# name -> (teacher, student, image shape (HWC), classes, batch, method)
PAIRS = {
    'cnn_small-mlp': ('cnn_small', 'mlp', (28, 28, 1), 10, 128, 'kd'),
    'ResNet18-cnn2': ('ResNet18', 'cnn2', (32, 32, 3), 10, 64, 'kd'),
    'alexnet-cnn_small': ('alexnet', 'cnn_small', (32, 32, 3), 10, 64, 'kd'),
    'resnet20-resnet8': ('resnet20', 'resnet8', (32, 32, 3), 100, 64, 'kd'),
    'resnet32x4-resnet8x4': ('resnet32x4', 'resnet8x4', (32, 32, 3), 100, 64, 'kd'),
    'resnet32x4-resnet8x4-simkd': ('resnet32x4', 'resnet8x4', (32, 32, 3), 100, 64, 'simkd'),
    # A ViT student of a CNN teacher: DeiT-Ti's width and depth (192, 12 blocks, 3 heads) at 32 px, patch 4 (64
    # tokens); PyTorch side: timm's own deit_tiny_patch16_224 built with the same image and patch size.
    'resnet20-deit_tiny': ('resnet20', 'deit_tiny', (32, 32, 3), 100, 64, 'kd'),
}
# Students built with other than their registered settings (the same on both sides).
STUDENT_KWARGS = {'deit_tiny': {'patch_size': 4}}

flags.DEFINE_list('pairs', list(PAIRS), f'Pairs to time: {", ".join(PAIRS)}.')
flags.DEFINE_integer('repeats', 3, 'Processes per contender (interleaved); the table reports medians.')
flags.DEFINE_float('seconds', 10.0, 'Steady-state seconds timed per process (at least 2 blocks).')
flags.DEFINE_list('ks', ['0'], 'kdjax steps per dispatch to time (0 = the auto setting).')
flags.DEFINE_list('loops', ['auto'], 'kdjax config.steps_loop values to time with K > 1.')
flags.DEFINE_bool('torch', True, 'Time PyTorch eager.')
flags.DEFINE_bool('torch_malloc', True, 'Also time PyTorch eager with the glibc malloc settings kdjax applies to '
                  'itself (kdjax.malloc: freed blocks kept for reuse), so that the comparison '
                  'does not credit kdjax with an allocator setting PyTorch could use too.')
flags.DEFINE_bool('torch_compile', True, 'Time PyTorch with torch.compile (inductor; needs a C++ compiler).')
flags.DEFINE_list('xla_flags', [], 'Extra kdjax contenders: XLA_FLAGS settings (space-separated flags each) to time '
                  'against the default, e.g. --xla_flags="--xla_cpu_use_onednn=true".')
flags.DEFINE_bool('ynn_conv', False, 'Also time kdjax with XLA:CPU\'s default convolutions (YNNPACK), which '
                  'kdjax.platform switches off by default.')
flags.DEFINE_list('trees', [], 'Extra kdjax contenders from other checkouts, NAME=PATH each (e.g. '
                  'before=/tmp/kdjax_main): that tree\'s own benchmarks/step_speed.py times its kdjax at the auto '
                  'setting, interleaved with this one (a change measured before and after in one run).')
flags.DEFINE_bool('first_step_only', False, 'With --worker=kdjax: time the start-up phases only, no steady state.')
flags.DEFINE_bool('warm', True, 'Time kdjax a second time with the compilation cache the first process filled.')
# A worker process: one contender, one JSON line.
flags.DEFINE_string('worker', '', 'internal: kdjax | torch | torch_compile')
flags.DEFINE_string('pair', '', 'internal')
flags.DEFINE_integer('k', 0, 'internal')
flags.DEFINE_string('loop', 'auto', 'internal')
flags.DEFINE_string('cache_dir', 'off', 'internal: the compilation cache of a kdjax worker')
flags.DEFINE_integer('profile', 0, 'With --worker: profile this many steps after the timing and print the ops that '
                     'took the most time (jax.profiler / torch.profiler), e.g. --worker=kdjax --pair=P --profile=4.')
FLAGS = flags.FLAGS


def _timed_blocks(run_block, block_steps: int, batch: int, seconds: float) -> float:
  """Median img/s over blocks of `block_steps` steps run for about `seconds` (at least 2 blocks)."""
  rates, t_end = [], time.perf_counter() + seconds
  while len(rates) < 2 or time.perf_counter() < t_end:
    t0 = time.perf_counter()
    run_block()
    rates.append(block_steps * batch / (time.perf_counter() - t0))
  return statistics.median(rates)


# ------------------------------------------------------------------------------------------------------- kdjax
def kdjax_worker(pair: str) -> dict:
  t_import = time.perf_counter()
  import kdjax.platform  # noqa: F401  (before jax)
  from kdjax import compile_cache
  compile_cache.enable(FLAGS.cache_dir)
  import jax
  import numpy as np
  from kdjax import checkpoint as ckpt_lib
  from kdjax import config_lib
  from kdjax import data as data_lib
  from kdjax import models
  from kdjax import sharding
  from kdjax import teacher as teacher_lib
  from kdjax import trainer as trainer_lib
  t_imported = time.perf_counter()
  teacher_name, student_name, shape, classes, batch, method = PAIRS[pair]
  rng = np.random.default_rng(0)
  split = lambda n: data_lib.Split(rng.integers(0, 256, (n,) + shape, dtype=np.uint8),
                                   rng.integers(0, classes, n).astype(np.int32))
  ds = data_lib.Dataset('synthetic', classes, split(50 * batch), split(2 * batch), None, (0.5,) * shape[-1],
                        (0.25,) * shape[-1], 'crop_flip' if shape[0] == 32 else 'none')
  c = config_lib.base()
  c.student.model, c.teacher.model = student_name, teacher_name
  c.student.kwargs = STUDENT_KWARGS.get(student_name, {})
  c.distill.losses = {'ce': 0.1, 'kd': 0.9} if method == 'kd' else {'simkd': 1.0}
  c.distill.cache_teacher = 'off'
  # A run's length (the CIFAR recipes' 240 epochs) decides the auto dispatch setting; only a few steps are timed.
  c.batch_size, c.steps_per_dispatch, c.steps_loop, c.num_devices, c.epochs = batch, FLAGS.k, FLAGS.loop, 1, 240
  mesh = sharding.make_mesh(1)
  # The teacher restored from a checkpoint as a run restores it (kdjax.teacher.load): the checkpoint, of randomly
  # initialised variables, is written first, untimed.
  teacher_dir = os.path.join(tempfile.mkdtemp(prefix='kdjax_bench_teacher_'), 'teacher')
  teacher = models.create(teacher_name, classes)
  ckpt_lib.save_model(teacher_dir, jax.jit(teacher.init)(jax.random.key(0), np.zeros((1,) + shape, np.float32)),
                      {'model': teacher_name, 'num_classes': classes, 'subclasses': 1, 'image_shape': list(shape)})
  c.teacher.checkpoint = teacher_dir
  t0 = time.perf_counter()
  out = {'import': t_imported - t_import}
  teacher, teacher_vars = teacher_lib.load(c, ds, mesh, teacher_dir)
  jax.block_until_ready(teacher_vars)
  t1 = time.perf_counter()
  exp = trainer_lib.build(c, ds, mesh, teacher, teacher_vars)
  t2 = time.perf_counter()
  abstract = exp.init_state(abstract=True)
  exp.start_init_compile()  # as kdjax.train does on a fresh run: beside the step's compilation
  t3 = time.perf_counter()
  exp.compile(abstract)
  t4 = time.perf_counter()
  ts = exp.init_state()
  jax.block_until_ready(ts)
  t5 = time.perf_counter()
  ts, m = exp.train_chunk(ts, 0, 0)
  jax.block_until_ready((ts, m))
  t6 = time.perf_counter()
  shutil.rmtree(os.path.dirname(teacher_dir), ignore_errors=True)
  out.update(teacher=t1 - t0, experiment=t2 - t1, abstract_state=t3 - t2, compile=t4 - t3, init_state=t5 - t4,
             first_dispatch=t6 - t5, first_step=t6 - t0, setup=(t3 - t0) + (t5 - t4), k=exp.k,
             loop=exp.steps_loop)
  state = {'ts': ts, 'pos': 0}
  n_disp = max(1, math.ceil(8 / exp.k))  # blocks of >= 8 steps

  def block():
    ts, m = state['ts'], None
    for _ in range(n_disp):
      state['pos'] = (state['pos'] + exp.k) % (exp.steps_per_epoch - exp.k + 1)
      ts, m = exp.train_chunk(ts, 0, state['pos'])
    jax.block_until_ready((ts, m))
    state['ts'] = ts

  if FLAGS.first_step_only:
    return out
  out['img_s'] = _timed_blocks(block, n_disp * exp.k, batch, FLAGS.seconds)
  if FLAGS.profile:
    out['top_ops_ms_per_step'] = _jax_profile(exp, state, FLAGS.profile)
  return out


def _jax_profile(exp, state, steps: int) -> dict:
  """The XLA:CPU ops (thunks) that took the most time over `steps` steps, ms per step, grouped by HLO name
  without its numeric suffix."""
  import collections
  import glob
  import re
  import jax
  from jax.profiler import ProfileData
  where = tempfile.mkdtemp(prefix='kdjax_profile_')
  with jax.profiler.trace(where):
    ts = state['ts']
    for i in range(0, steps, exp.k):
      ts, m = exp.train_chunk(ts, 0, i)
    jax.block_until_ready((ts, m))
  totals = collections.Counter()
  for plane in ProfileData.from_file(glob.glob(f'{where}/**/*.xplane.pb', recursive=True)[0]).planes:
    for line in plane.lines:
      if line.name == 'python':
        continue
      for e in line.events:
        if not re.match(r'(ThreadpoolListener|ThunkExecutor|end: )', e.name):
          totals[re.sub(r'[._]\d+$', '', e.name)] += e.duration_ns / 1e6 / steps
  shutil.rmtree(where, ignore_errors=True)
  return {k: round(v, 2) for k, v in totals.most_common(12)}


# ----------------------------------------------------------------------------------------------------- PyTorch
def torch_net(name: str, shape, classes: int):
  from kdjax.tools import torch_reference as ref
  h, _, c = shape
  return {
      'mlp': lambda: ref.MLP(h * h * c, (800, 800), classes),
      'cnn_small': lambda: ref.SmallCNN(c, h, classes),
      'cnn2': lambda: ref.SmallCNN(c, h, classes, hidden=(128,), batch_norm=False),
      'alexnet': lambda: ref.AlexNet(classes),
      'ResNet18': lambda: ref.ResNet18(classes),
      'resnet20': lambda: ref.CifarResNet(20, (16, 16, 32, 64), classes),
      'resnet8': lambda: ref.CifarResNet(8, (16, 16, 32, 64), classes),
      'resnet32x4': lambda: ref.CifarResNet(32, (32, 64, 128, 256), classes),
      'resnet8x4': lambda: ref.CifarResNet(8, (32, 64, 128, 256), classes),
      'deit_tiny': lambda: _timm_deit_tiny(h, classes),
  }[name]()


def _timm_deit_tiny(size: int, classes: int):
  import timm  # a test extra (requirements-test.txt)
  return timm.create_model('deit_tiny_patch16_224', pretrained=False, img_size=size,
                           num_classes=classes, **STUDENT_KWARGS['deit_tiny'])


def torch_worker(pair: str, compiled: bool) -> dict:
  t_import = time.perf_counter()
  if os.environ.get('STEP_SPEED_TORCH_MALLOC'):
    from kdjax.malloc import malloc_settings  # (no JAX: kdjax.platform's import would bring it in)
    assert malloc_settings(), 'glibc malloc settings not applied'
  import torch
  from torch.nn import functional as F
  from kdjax.tools import torch_reference as ref
  teacher_name, student_name, shape, classes, batch, method = PAIRS[pair]
  t0 = time.perf_counter()
  out = {'import': t0 - t_import, 'threads': torch.get_num_threads()}
  torch.manual_seed(0)
  teacher = torch_net(teacher_name, shape, classes).eval()
  student = torch_net(student_name, shape, classes).train()
  params = list(student.parameters())
  projector = None
  if method == 'simkd':
    t_n, s_n = teacher.fc.in_features, student.fc.in_features
    projector = ref.SimKDProjector(s_n, t_n).train()
    params += list(projector.parameters())
  t_fwd, s_fwd = ((teacher.last_map, student.last_map) if method == 'simkd' else (teacher, student))
  if compiled:
    t_fwd, s_fwd = torch.compile(t_fwd), torch.compile(s_fwd)
    projector = torch.compile(projector) if projector is not None else None
  opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
  h, w, c = shape
  x = torch.randn(batch, c, h, w)
  y = torch.randint(0, classes, (batch,))

  def step():
    with torch.no_grad():
      t_out = t_fwd(x)
    s_out = s_fwd(x)
    if method == 'kd':
      kd = F.kl_div(F.log_softmax(s_out / 4, -1), F.softmax(t_out / 4, -1), reduction='batchmean') * 16
      loss = 0.1 * F.cross_entropy(s_out, y) + 0.9 * kd
    else:  # SimKD: the student's map projected to the teacher's (same 8x8 size here), MSE
      loss = F.mse_loss(projector(s_out), t_out)
    opt.zero_grad()
    loss.backward()
    opt.step()

  step()
  out['first_step'] = out['setup_and_first'] = time.perf_counter() - t0

  def block():
    for _ in range(8):
      step()

  out['img_s'] = _timed_blocks(block, 8, batch, FLAGS.seconds)
  if FLAGS.profile:
    from torch import profiler
    with profiler.profile(activities=[profiler.ProfilerActivity.CPU]) as prof:
      for _ in range(FLAGS.profile):
        step()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    out['top_ops_ms_per_step'] = {e.key: round(e.self_cpu_time_total / 1e3 / FLAGS.profile, 2) for e in rows}
  return out


# ---------------------------------------------------------------------------------------------------- the table
def _run(args: list[str]) -> dict | None:
  env, worker_args, script = dict(os.environ), [], os.path.abspath(__file__)
  for a in args:  # --env=FLAGS: more XLA_FLAGS; --setenv=NAME=VALUE: one variable; --script=PATH: another tree's
    if a.startswith('--script='):  # worker; the rest go to the worker
      script = a[len('--script='):]
    elif a.startswith('--env='):
      env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' ' + a[len('--env='):]).strip()
    elif a.startswith('--setenv='):
      name, _, value = a[len('--setenv='):].partition('=')
      env[name] = value
    else:
      worker_args.append(a)
  cmd = [sys.executable, script] + worker_args + [f'--seconds={FLAGS.seconds}']
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  for line in proc.stdout.splitlines():
    if line.startswith('RESULT '):
      return json.loads(line[len('RESULT '):])
  print(f'  ({" ".join(args)} failed: {(proc.stderr.strip().splitlines() or ["?"])[-1]})', flush=True)
  return None


def _contenders(pair: str):
  out = []
  if FLAGS.torch:
    out.append(('PyTorch eager', ['--worker=torch']))
    if FLAGS.torch_malloc:
      out.append(('PyTorch eager, kdjax\'s malloc settings', ['--worker=torch', '--setenv=STEP_SPEED_TORCH_MALLOC=1']))
  if FLAGS.torch_compile:
    out.append(('PyTorch torch.compile', ['--worker=torch_compile']))
  for k in FLAGS.ks:
    for loop in (FLAGS.loops if int(k) != 1 else ['auto']):
      out.append((f'kdjax K={k}{"" if int(k) == 1 else f" {loop}"}', ['--worker=kdjax', f'--k={k}', f'--loop={loop}']))
  if FLAGS.ynn_conv:
    out.append(('kdjax K=0 auto, YNNPACK convolutions (KDJAX_CPU_CONV=ynn)',
                ['--worker=kdjax', '--k=0', '--loop=auto', '--setenv=KDJAX_CPU_CONV=ynn']))
  for tree in FLAGS.trees:
    name, _, path = tree.partition('=')
    script = os.path.join(os.path.abspath(path), 'benchmarks', 'step_speed.py')
    out.append((f'kdjax K=0 auto [{name}]', [f'--script={script}', '--worker=kdjax', '--k=0', '--loop=auto']))
  for extra in FLAGS.xla_flags:
    out.append((f'kdjax K=0 auto, XLA_FLAGS={extra}', ['--worker=kdjax', '--k=0', '--loop=auto', f'--env={extra}']))
  return out


def main(argv):
  del argv
  if FLAGS.worker:
    if FLAGS.worker == 'kdjax':
      result = kdjax_worker(FLAGS.pair)
    else:
      result = torch_worker(FLAGS.pair, FLAGS.worker == 'torch_compile')
    print('RESULT ' + json.dumps(result), flush=True)
    return
  import platform
  print(f'{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), load average '
        f'{os.getloadavg()[0]:.2f} at start; each contender in its own process, {FLAGS.repeats} interleaved '
        f'repeat(s), medians', flush=True)
  rows = []
  for pair in FLAGS.pairs:
    results = {}
    for rep in range(FLAGS.repeats):
      for name, args in _contenders(pair):
        if args[0] == '--worker=kdjax':
          cache = tempfile.mkdtemp(prefix='kdjax_bench_cache_')
          r = _run(args + [f'--pair={pair}', f'--cache_dir={cache}'])
          results.setdefault(name + ' (cold cache)', []).append(r)
          print(f'  {pair} {name} (cold cache): {json.dumps(r)}', flush=True)
          if FLAGS.warm:
            r = _run(args + [f'--pair={pair}', f'--cache_dir={cache}'])
            results.setdefault(name + ' (warm cache)', []).append(r)
            print(f'  {pair} {name} (warm cache): {json.dumps(r)}', flush=True)
          shutil.rmtree(cache, ignore_errors=True)
        else:
          r = _run(args + [f'--pair={pair}'])
          results.setdefault(name, []).append(r)
          print(f'  {pair} {name}: {json.dumps(r)}', flush=True)
      print(f'{pair}: repeat {rep + 1} done, load average {os.getloadavg()[0]:.2f}', flush=True)
    base, base_reps = None, None
    for name, reps in results.items():
      rs = [r for r in reps if r]
      if not rs:
        continue
      med = {key: statistics.median(r[key] for r in rs) for key in rs[0] if isinstance(rs[0][key], (int, float))}
      rates = [r['img_s'] if r else None for r in reps]
      if name == 'PyTorch eager':
        base, base_reps = med['img_s'], rates
      # Each repeat's contender against the same repeat's PyTorch eager (interleaved: the same moment's load).
      ratios = [a / b for a, b in zip(rates, base_reps or []) if a and b]
      if 'k' in rs[0]:
        loop = '' if rs[0]['k'] == 1 else f' {rs[0]["loop"]}'
        name = name.replace('K=0 auto', f'K={rs[0]["k"]}{loop}').replace(' auto', loop)
      rows.append((pair, name, med, len(rs), base, [r for r in rates if r], ratios))
      detail = ', '.join(f'{k} {v:.2f}' for k, v in med.items() if k not in ('img_s', 'k', 'threads'))
      print(f'  {name}: {med["img_s"]:,.0f} img/s (repeats: {", ".join(f"{r:,.1f}" for r in rates if r)}); '
            f'{detail}', flush=True)
  print(f'\nload average {os.getloadavg()[0]:.2f} at the end; img/s: median (min-max over repeats); vs PyTorch '
        'eager: ratio of the medians (min-max of the per-repeat ratios)')
  print('\n| pair | contender | img/s | vs PyTorch eager | first step | of which setup / compile | runs |')
  print('|---|---|---|---|---|---|---|')
  for pair, name, med, n, base, rates, ratios in rows:
    ratio = f'{med["img_s"] / base:.2f}x ({min(ratios):.2f}-{max(ratios):.2f})' if base and ratios else '—'
    parts = f'{med["setup"]:.1f} s / {med["compile"]:.1f} s' if 'setup' in med else '—'
    print(f'| {pair} | {name} | {med["img_s"]:,.0f} ({min(rates):,.0f}-{max(rates):,.0f}) | {ratio} | '
          f'{med["first_step"]:.1f} s | {parts} | {n} |')


if __name__ == '__main__':
  app.run(main)
