r"""KD with scarce labels on real Fashion-MNIST (configs/fashion_scarce.py): every method's test accuracy against the
labelled fraction of the training set, with its gap to the from-scratch student of the same architecture.

Runs every fraction's programs (configs/fashion_scarce.py's groups: `logit` = scratch / KD / DKD / DIST MLP students
in one program, `ls` = KD with logit standardization, `feature` = scratch / KD / AT conv students), 3 seeds each;
the two teachers are trained once on all 60,000 images and cached by the first program that needs each. Prints a
table (rows methods, columns fractions, mean ± std over the seeds, then each method's gap to its scratch twin) and
writes it, the per-student results (results.json) and a figure (scarce_labels.png) to --out. A program whose workdir
already holds a summary.json is read back, not rerun; an unfinished one resumes.

  python benchmarks/scarce_labels.py --out=runs/scarce                  # the full benchmark (see benchmarks/README)
  python benchmarks/scarce_labels.py --out=/tmp/scarce_smoke --smoke    # digits, 2 fractions, a few minutes
  python benchmarks/scarce_labels.py --out=/tmp/zip_check --verify_zip  # the zipped program against separate runs
  python benchmarks/scarce_labels.py --out=runs/scarce --collect        # table + figure of the finished programs
"""

import argparse
import importlib.util
import json
import math
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import kdjax.platform  # noqa: E402,F401  (before jax: selects the CPU quietly when there is no accelerator)


def _config_module():
  spec = importlib.util.spec_from_file_location('fashion_scarce', os.path.join(ROOT, 'configs', 'fashion_scarce.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


FS = _config_module()
# Table rows: (group, method, label, the scratch twin's (group, method)); the label names the architecture.
ROWS = [
    ('logit', 'scratch', 'MLP 2x800, scratch (CE)', None),
    ('logit', 'kd', 'MLP 2x800, KD (ce 0.1, kd 0.9, T 4)', ('logit', 'scratch')),
    ('logit', 'dkd', f'MLP 2x800, DKD (ce 1, dkd 1, beta {FS.BETA_DKD:g})', ('logit', 'scratch')),
    ('logit', 'dist', 'MLP 2x800, DIST (ce 1, dist 2)', ('logit', 'scratch')),
    ('ls', 'kd', 'MLP 2x800, KD + logit stand. (ce 0.1, kd 9, T 2)', ('logit', 'scratch')),
    ('feature', 'scratch', 'CNN 8-16, scratch (CE)', None),
    ('feature', 'kd', 'CNN 8-16, KD (ce 0.1, kd 0.9, T 4)', ('feature', 'scratch')),
    ('feature', 'at', 'CNN 8-16, AT (ce 1, at 1000)', ('feature', 'scratch')),
]
SHORT = {('logit', 'scratch'): 'scratch', ('logit', 'kd'): 'KD', ('logit', 'dkd'): 'DKD', ('logit', 'dist'): 'DIST',
         ('ls', 'kd'): 'KD+LS', ('feature', 'scratch'): 'CNN scratch', ('feature', 'kd'): 'CNN KD',
         ('feature', 'at'): 'CNN AT'}


def program_accuracies(workdir: str, group: str) -> dict:
  """{method: [last test accuracy per seed]} of a finished program, from its workdir (kdjax.results)."""
  from kdjax import results
  run = results.load_run(workdir)
  rows = {r['index']: r for r in results.student_rows(run)}
  methods, terms = (FS.LOGIT_METHODS, FS.LOGIT_TERMS) if group == 'logit' else (FS.FEATURE_METHODS, FS.FEATURE_TERMS)
  out = {}
  for s in run.students:
    method = 'kd' if group == 'ls' else FS.method_of(s['values'], methods, terms)
    acc = rows[s['index']]['last_test_accuracy']
    if acc is None or not math.isfinite(acc):
      raise RuntimeError(f'{workdir}: student {s["index"]} has no test accuracy')
    out.setdefault(method, []).append(acc)
  return out


def run_program(arg: str, workdir: str) -> tuple[dict, float]:
  """Trains configs/fashion_scarce.py:`arg` in `workdir` (or reads it back when finished); (summary, seconds)."""
  from kdjax import train
  done = os.path.join(workdir, 'summary.json')
  if os.path.exists(done):
    with open(done) as f:
      summary = json.load(f)
    print(f'[{arg}: finished before, read back from {workdir}]', flush=True)
    return summary, 0.0
  cfg = FS.get_config(arg)
  t = time.time()
  summary = train.train_and_evaluate(cfg, workdir)
  wall = time.time() - t
  print(f'[{arg}: {len(summary["students"])} student(s) in one program, {cfg.epochs} epochs of '
        f'{cfg.batch_size}-image batches, {wall / 60:.1f} min]', flush=True)
  return summary, wall


def teacher_accuracy(arg: str):
  """The cached teacher's test accuracy (its summary.json in the teacher cache), or None."""
  from kdjax import sweep
  from kdjax import teacher as teacher_lib
  cfg = sweep.expand(FS.get_config(arg)).base  # as the run keys its teacher (data.seed filled in)
  path = os.path.join(teacher_lib.cache_dir(cfg, cfg.data.name), 'summary.json')
  try:
    with open(path) as f:
      return json.load(f).get('test_accuracy')
  except (OSError, ValueError):
    return None


def gap(acc: dict, key, twin, fraction) -> tuple[float, float] | None:
  """(mean difference to the scratch twin in points, its std: sqrt(s_a^2 + s_b^2), the seeds being unpaired)."""
  a, b = acc.get((key, fraction)), acc.get((twin, fraction))
  if not a or not b:
    return None
  std = math.sqrt(np.var(a, ddof=1) + np.var(b, ddof=1)) if len(a) > 1 and len(b) > 1 else 0.0
  return 100 * (np.mean(a) - np.mean(b)), 100 * std


def table(acc: dict, fractions: list, rows: list, sizes: dict) -> str:
  head = ['method'] + [f'{f} % ({sizes[f]:,})' for f in fractions]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for group, method, label, _ in rows:
    cells = []
    for f in fractions:
      v = acc.get(((group, method), f))
      cells.append(f'{100 * np.mean(v):.2f} ± {100 * np.std(v, ddof=1):.2f}' if v and len(v) > 1 else
                   f'{100 * np.mean(v):.2f}' if v else '-')
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  lines += ['', '| gap to scratch (points) | ' + ' | '.join(f'{f} %' for f in fractions) + ' |',
            '|' + '---|' * (len(fractions) + 1)]
  for group, method, label, twin in rows:
    if twin is None:
      continue
    cells = []
    for f in fractions:
      g = gap(acc, (group, method), twin, f)
      cells.append('-' if g is None else f'{g[0]:+.2f} ± {g[1]:.2f}')
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def figure(acc: dict, fractions: list, rows: list, teachers: dict, path: str, title: str):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
  styles = {'logit': '-', 'ls': '-.', 'feature': '--'}
  colors = plt.get_cmap('tab10')
  for i, (group, method, label, twin) in enumerate(rows):
    key = (group, method)
    xs = [f for f in fractions if acc.get((key, f))]
    if not xs:
      continue
    mean = [100 * np.mean(acc[(key, f)]) for f in xs]
    std = [100 * np.std(acc[(key, f)], ddof=1) if len(acc[(key, f)]) > 1 else 0.0 for f in xs]
    marker = 's' if group == 'feature' else 'o'
    left.errorbar(xs, mean, yerr=std, label=SHORT[key], color=colors(i), ls=styles[group], marker=marker,
                  ms=4, capsize=3)
    if twin is not None:
      gaps = [(f, gap(acc, key, twin, f)) for f in xs]
      gaps = [(f, g) for f, g in gaps if g is not None]
      right.errorbar([f for f, _ in gaps], [g[0] for _, g in gaps], yerr=[g[1] for _, g in gaps],
                     label=SHORT[key], color=colors(i), ls=styles[group], marker=marker, ms=4, capsize=3)
  for name, value in teachers.items():
    if value is not None:
      left.axhline(100 * value, color='grey', lw=0.8, ls=':' if 'MLP' in name else '--')
      left.annotate(f'teacher {name} {100 * value:.1f}', (fractions[0], 100 * value), fontsize=7, color='grey',
                    xytext=(0, 2), textcoords='offset points')
  right.axhline(0.0, color='black', lw=0.8)
  for ax, ylabel in ((left, 'test accuracy (%)'), (right, 'gap to the same architecture from scratch (points)')):
    ax.set_xscale('log')
    ax.set_xticks(fractions)
    ax.set_xticklabels([f'{f:g} %' for f in fractions])
    ax.set_xlabel('labelled share of the 60,000 training images' if 'Fashion' in title else 'labelled share')
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
  left.legend(fontsize=8, loc='lower right')
  right.legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def verify_zip(out: str):
  """The zipped logit program (one seed) against each method trained alone with only its own terms, on digits."""
  from kdjax import results
  program = FS.get_config('20,logit,digits,steps=60')
  program.seeds = 1
  run_program_cfg(program, os.path.join(out, 'program'))
  prog = results.load_run(os.path.join(out, 'program'))
  worst = 0.0
  for s in prog.students:
    method = FS.method_of(s['values'], FS.LOGIT_METHODS, FS.LOGIT_TERMS)
    alone = FS.get_config('20,logit,digits,steps=60')
    alone.seeds, alone.sweep, alone.sweep_mode = 1, '', 'grid'
    alone.distill.losses = {t: w for t, w in zip(FS.LOGIT_TERMS, FS.LOGIT_METHODS[method]) if w}
    if method == 'scratch':
      alone.teacher.model = ''
    run_program_cfg(alone, os.path.join(out, method))
    one = results.load_run(os.path.join(out, method))
    mine = [r for r in prog.history if r['student'] == s['index']]
    for a, b in zip(mine, one.history):
      assert a['epoch'] == b['epoch'], (a['epoch'], b['epoch'])
      for key in ('train_loss', 'test_loss', 'test_accuracy'):
        if a.get(key) is not None and b.get(key) is not None:
          worst = max(worst, abs(a[key] - b[key]) / max(abs(b[key]), 1e-6))
    print(f'{method}: test accuracy {mine[-1]["test_accuracy"]:.4f} in the program, {one.history[-1]["test_accuracy"]:.4f} '
          f'alone; train loss {mine[-1]["train_loss"]:.6g} / {one.history[-1]["train_loss"]:.6g}', flush=True)
  print(f'largest relative difference over every epoch (train loss, test loss, test accuracy): {worst:.2e}')


def run_program_cfg(cfg, workdir):
  from kdjax import train
  if not os.path.exists(os.path.join(workdir, 'summary.json')):
    train.train_and_evaluate(cfg, workdir)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='workdirs, table, results.json and figure go here')
  parser.add_argument('--fractions', default=','.join(map(str, FS.FRACTIONS)), help='percent, comma-separated')
  parser.add_argument('--groups', default=','.join(FS.GROUPS), help='programs per fraction: logit, ls, feature')
  parser.add_argument('--steps', type=int, default=0, help='optimizer steps per student (0: the config default)')
  parser.add_argument('--smoke', action='store_true', help='digits, fractions 5 and 100, 40 steps: the mechanics')
  parser.add_argument('--verify_zip', action='store_true', help='the zipped program against separate runs, digits')
  parser.add_argument('--collect', action='store_true', help='table and figure of the finished programs only: '
                      'train nothing, leave out (and name) the unfinished ones')
  args = parser.parse_args()
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  if args.verify_zip:
    return verify_zip(out)
  fractions = [int(f) for f in args.fractions.split(',')] if not args.smoke else [5, 100]
  groups = args.groups.split(',')
  bad = [f for f in fractions if f not in FS.FRACTIONS] + [g for g in groups if g not in FS.GROUPS]
  if bad:
    parser.error(f'unknown fraction or group {bad[0]!r}: fractions {FS.FRACTIONS}, groups {FS.GROUPS}')
  steps = 40 if args.smoke else args.steps
  dataset = 'digits' if args.smoke else 'fashion_mnist'
  suffix = (',digits' if args.smoke else '') + (f',steps={steps}' if steps else '')
  acc, walls, t0 = {}, {}, time.time()
  for f in fractions:
    for g in groups:
      arg = f'{f},{g}{suffix}'
      if args.collect and not os.path.exists(os.path.join(out, 'runs', f'{f}pct', g, 'summary.json')):
        print(f'[{arg}: not finished, left out]', flush=True)
        continue
      summary, walls[(f, g)] = run_program(arg, os.path.join(out, 'runs', f'{f}pct', g))
      for method, values in program_accuracies(os.path.join(out, 'runs', f'{f}pct', g), g).items():
        acc[((g, method), f)] = values
  rows = [r for r in ROWS if r[0] in groups]
  teachers = {}
  if 'logit' in groups or 'ls' in groups:
    teachers['MLP 2x1200'] = teacher_accuracy(f'{fractions[0]},logit{suffix}')
  if 'feature' in groups:
    teachers['cnn_small'] = teacher_accuracy(f'{fractions[0]},feature{suffix}')
  sizes = {f: FS.examples(f, dataset) or FS.TRAIN_SIZE[dataset] for f in fractions}
  text = table(acc, fractions, rows, sizes)
  total = time.time() - t0
  lengths = ', '.join(f'{f} %: {FS.epochs(f, dataset, steps or None)} epochs' for f in fractions)
  header = (f'{"digits (smoke)" if args.smoke else "Fashion-MNIST"} test accuracy (%), last epoch, mean ± std over '
            f'3 seeds; about {steps or FS.STEPS[dataset]} steps per student ({lengths}); teachers: '
            + ', '.join(f'{k} {100 * v:.2f}' if v is not None else f'{k} ?' for k, v in teachers.items())
            + f'; {total / 60:.1f} min this invocation')
  print('\n' + header + '\n\n' + text)
  with open(os.path.join(out, 'table.md'), 'w') as fh:
    fh.write(header + '\n\n' + text + '\n')
  with open(os.path.join(out, 'results.json'), 'w') as fh:
    json.dump({'accuracy': {f'{g}/{m}/{f}': v for ((g, m), f), v in acc.items()}, 'teachers': teachers,
               'program_minutes': {f'{f}/{g}': w / 60 for (f, g), w in walls.items()}}, fh, indent=2)
  title = ('digits (smoke): ' if args.smoke else 'Fashion-MNIST: ') + 'teachers on all training images, students ' \
      'on a labelled share (3 seeds, mean ± std)'
  figure(acc, fractions, rows, teachers, os.path.join(out, 'scarce_labels.png'), title)
  print(f'wrote {out}/table.md, results.json, scarce_labels.png')


if __name__ == '__main__':
  main()
