r"""A/B of kdjax train-step variants in ONE process, interleaved: the way to compare on a shared, noisy machine.

Every variant is a Trainer built from `step_speed.py`'s pair (same synthetic data, teacher pass every step) with
its own config overrides and XLA compile options; all are compiled first, then timed round after round (A, B, C,
A, B, C, ...), each round a block of at least `--steps` steps per variant, and the table gives each variant's
median ms/step and its ratio to the first variant's median over the same rounds, with the load average. The CPU
time of the process per step (all its threads) is given too: on an oversubscribed machine it moves less with the
load than the wall time (it omits the time spent waiting for a core).

  python benchmarks/step_ab.py --pair=resnet20-resnet8 --variants='k1; k4: steps_per_dispatch=4 steps_loop=unroll'
  python benchmarks/step_ab.py --variants='base; onednn: @xla_cpu_use_onednn=true'

A variant is `name: field=value field=value @xla_option=value %attribute=value ...`: `field` a config field
(Python literal values), `@option` an XLA debug option passed to this variant's compile only (the others keep the
defaults), `%attribute` an attribute of the Trainer set before compiling (e.g. `%k=2`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ast  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import step_speed  # noqa: E402  (its flags too: --pair names the pair here, resnet20-resnet8 if unset)

flags.DEFINE_string('variants', 'k1; k4: steps_per_dispatch=4 steps_loop=unroll',
                    'Variants, `;`-separated (see above).')
flags.DEFINE_integer('rounds', 7, 'Interleaved rounds.')
flags.DEFINE_integer('steps', 8, 'Steps per variant per round (rounded up to whole dispatches).')
flags.DEFINE_bool('check', True, 'Check that every variant gives the first one\'s parameters after one round.')
FLAGS = flags.FLAGS


def _parse(spec: str):
  out = []
  for part in [p.strip() for p in spec.split(';') if p.strip()]:
    name, _, rest = part.partition(':')
    fields, options, attrs = {}, {}, {}
    for item in rest.split():
      key, _, value = item.partition('=')
      try:
        value = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        pass
      target = options if key.startswith('@') else attrs if key.startswith('%') else fields
      target[key.lstrip('@%')] = value
    out.append((name.strip(), fields, options, attrs))
  return out


def main(argv):
  del argv
  import kdjax.platform  # noqa: F401  (before jax)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from kdjax import config_lib
  from kdjax import data as data_lib
  from kdjax import models
  from kdjax import sharding
  from kdjax import trainer as trainer_lib

  pair = FLAGS.pair or 'resnet20-resnet8'
  teacher_name, student_name, shape, classes, batch, method = step_speed.PAIRS[pair]
  rng = np.random.default_rng(0)
  split = lambda n: data_lib.Split(rng.integers(0, 256, (n,) + shape, dtype=np.uint8),
                                   rng.integers(0, classes, n).astype(np.int32))
  ds = data_lib.Dataset('synthetic', classes, split(50 * batch), split(2 * batch), None, (0.5,) * shape[-1],
                        (0.25,) * shape[-1], 'crop_flip' if shape[0] == 32 else 'none')
  mesh = sharding.make_mesh(1)
  teacher = models.create(teacher_name, classes)
  abstract_t = jax.eval_shape(teacher.init, jax.random.key(0), jax.ShapeDtypeStruct((1,) + shape, np.float32))
  # A teacher with non-trivial BatchNorm statistics (mean 0 / var 1 would make its BN layers identities).
  fill = lambda path, s: (lambda sh, dt: rng.uniform(0.5, 1.5, sh).astype(dt)) if 'var' in jax.tree_util.keystr(
      path) else (lambda sh, dt: rng.normal(0, 0.05, sh).astype(dt))
  teacher_vars = jax.device_put(jax.tree_util.tree_map_with_path(lambda p, s: fill(p, s)(s.shape, s.dtype),
                                                                 abstract_t), sharding.replicated(mesh))

  runs = []
  for name, fields, options, attrs in _parse(FLAGS.variants):
    c = config_lib.base()
    c.student.model, c.teacher.model = student_name, teacher_name
    c.distill.losses = {'ce': 0.1, 'kd': 0.9} if method == 'kd' else {'simkd': 1.0}
    c.distill.cache_teacher = 'off'
    c.batch_size, c.num_devices, c.epochs, c.steps_per_dispatch = batch, 1, 1, 1
    for key, value in fields.items():
      node = c
      *head, last = key.split('.')
      for h in head:
        node = node[h]
      node[last] = value
    exp = trainer_lib.build(c, ds, mesh, teacher, teacher_vars)
    for key, value in attrs.items():
      setattr(exp, key, value)
    t0 = time.perf_counter()
    abstract = exp.init_state(abstract=True)
    if options:  # this variant's own XLA options: its dispatch compiled as Trainer.compile does, with them
      args = (abstract, *exp._args(0, 0, exp.source.dispatch_spec(exp.k)))
      exp._compiled_chunk = jax.jit(exp._dispatch_fn, donate_argnums=(0,), out_shardings=(
          exp.state_shardings(abstract), exp.replicated)).lower(*args).compile(options)
    else:
      exp.compile(abstract)
    compile_s = time.perf_counter() - t0
    ts = exp.init_state()
    ts, m = exp.train_chunk(ts, 0, 0)
    jax.block_until_ready((ts, m))
    runs.append({'name': name, 'exp': exp, 'ts': ts, 'pos': 0, 'ms': [], 'cpu_ms': [], 'compile_s': compile_s})
    print(f'{name}: K={exp.k} {exp.steps_loop}, compiled in {compile_s:.1f} s, load {os.getloadavg()[0]:.2f}',
          flush=True)

  if FLAGS.check and len(runs) > 1:  # the same parameters from the same steps (one dispatch of every variant)
    ref = jax.tree.leaves(runs[0]['ts'].params)
    for r in runs[1:]:
      diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(ref, jax.tree.leaves(r['ts'].params)))
      print(f'{r["name"]}: params after its first dispatch vs {runs[0]["name"]}: max |diff| {diff:.2e} '
            f'({"same K" if r["exp"].k == runs[0]["exp"].k else "different K: not comparable"})', flush=True)

  loads = []
  for _ in range(FLAGS.rounds):
    for r in runs:
      exp, ts, k = r['exp'], r['ts'], r['exp'].k
      n = max(1, -(-FLAGS.steps // k))
      t0, c0 = time.perf_counter(), time.process_time()
      for _ in range(n):
        r['pos'] = (r['pos'] + k) % (exp.steps_per_epoch - k + 1)
        ts, m = exp.train_chunk(ts, 0, r['pos'])
      jax.block_until_ready((ts, m))
      r['ms'].append((time.perf_counter() - t0) * 1e3 / (n * k))
      r['cpu_ms'].append((time.process_time() - c0) * 1e3 / (n * k))
      r['ts'] = ts
    loads.append(os.getloadavg()[0])
  base = statistics.median(runs[0]['ms'])
  print(f'\n{pair}, {FLAGS.rounds} interleaved rounds, load average {min(loads):.2f}-{max(loads):.2f}')
  print('| variant | ms/step (median) | img/s | vs first | per-round ratio to first (median) | CPU ms/step | CPU vs '
        'first | compile s |')
  print('|---|---|---|---|---|---|---|---|')
  cpu_base = statistics.median(runs[0]['cpu_ms'])
  for r in runs:
    med, cpu = statistics.median(r['ms']), statistics.median(r['cpu_ms'])
    ratio = statistics.median(a / b for a, b in zip(r['ms'], runs[0]['ms']))
    print(f'| {r["name"]} | {med:.1f} | {batch * 1e3 / med:,.0f} | {med / base:.3f} | {ratio:.3f} | {cpu:.1f} | '
          f'{cpu / cpu_base:.3f} | {r["compile_s"]:.1f} |')


if __name__ == '__main__':
  app.run(main)
