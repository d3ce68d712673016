r"""Real learning on real Fashion-MNIST (Debian's dataset-fashion-mnist: 60,000 train / 10,000 test, 28x28):
a cnn_small teacher and MLP(64) students over 3 seeds, mean ± std, with published figures for scale.

Every stage is one program of several students (kdjax sweeps): the teacher over 3 seeds; the students from scratch
over 3 seeds; Hinton KD over alpha in {0.5, 0.9} x T in {2, 4, 8} x 3 seeds; DKD, RKD, WTTM, WKD-L and CRLD over 3
seeds each; the feature methods (WKD-F, MGD) on a half-width CNN student beside its scratch and KD rows, one
program of 12 students (`method=` axis); and SDD (SD-KD, whose classifier reads pooled regions of the last map) on a
CIFAR ResNet pair, a resnet20 teacher and resnet8 students (scratch, KD, SD-KD: one program of 9). The students
distill from the seed-0 teacher (`teacher.index`), whose logits are computed once for the whole training set (no
augmentation) and reused every epoch (CRLD's strong view, the feature methods and SDD run it every step). SGD
momentum 0.9, lr 0.05 cosine, weight decay 5e-4, batch 128; the teacher trains for 4 epochs, the students for 10
(the resnet pair for 3). About an hour on 2 CPU cores without the resnet stage; `--stages` runs a subset (the
cnn_small teacher is trained first unless only `resnet` is asked, resumed when its workdir holds it),
`--teacher_seeds=1` the seed-0 teacher alone.

  python benchmarks/fashion_mnist.py --workdir=/tmp/fashion_bench
"""

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import kdjax.platform  # noqa: E402,F401

# Published test accuracy on Fashion-MNIST, for scale (the dataset's benchmark table and papers; not our runs).
PUBLISHED = [
    ('2 conv + pooling + BN', 0.934),
    ('MLP 256-128-100', 0.883),
    ('ResNet18', 0.949),
    ('WRN-40-4', 0.967),
]


STAGES = ('scratch', 'kd', 'dkd', 'rkd', 'wttm', 'wkd-l', 'crld', 'conv', 'resnet')
RESNET_METHODS = {'ce': 'from scratch', 'kd': 'Hinton KD (reference recipe)', 'sdd_kd': 'SD-KD (reference recipe)'}
CONV_METHODS = {'ce': 'from scratch', 'kd': 'Hinton KD (reference recipe)', 'wkd_f': 'WKD-F (reference recipe)',
                'mgd': 'MGD (reference recipe)'}


def base(epochs: int):
  from kdjax import config_lib
  c = config_lib.base()
  c.data.name = 'fashion_mnist'
  c.epochs, c.batch_size = epochs, 128
  c.optimizer.update(lr=0.05, momentum=0.9, weight_decay=5e-4)
  c.schedule.name = 'cosine'
  c.eval_every_epochs = c.checkpoint_every_epochs = epochs
  c.eval_batch_size = 1000
  c.tensorboard = False
  return c


def student(teacher_dir: str, losses: dict, epochs: int):
  c = base(epochs)
  c.student.model, c.student.kwargs = 'mlp', {'hidden': (64,)}
  c.distill.losses = losses
  if teacher_dir:
    c.teacher.update(model='cnn_small', checkpoint=teacher_dir, index=0)
  c.seeds = 3
  return c


def run(name, cfg, workdir):
  from kdjax import train
  t = time.time()
  summary = train.train_and_evaluate(cfg, os.path.join(workdir, name))
  print(f'[{name}: {len(summary["students"])} student(s) in one program, {time.time() - t:.0f} s]', flush=True)
  return summary


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='/tmp/kdjax_fashion_bench')
  parser.add_argument('--teacher_epochs', type=int, default=4)
  parser.add_argument('--student_epochs', type=int, default=10)
  parser.add_argument('--conv_epochs', type=int, default=10, help="the feature methods' students (stage conv)")
  parser.add_argument('--resnet_epochs', type=int, default=3,
                      help='the resnet20 teacher and resnet8 students of stage resnet (SDD)')
  parser.add_argument('--teacher_seeds', type=int, default=3,
                      help='teachers trained (the students distill from seed 0, the same at any count)')
  parser.add_argument('--stages', default=','.join(STAGES),
                      help='comma-separated subset of: ' + ', '.join(STAGES))
  args = parser.parse_args()
  stages = args.stages.split(',')
  unknown = sorted(set(stages) - set(STAGES))
  if unknown:
    parser.error(f'--stages: unknown {", ".join(unknown)}; known: {", ".join(STAGES)}')
  from absl import logging
  from kdjax import config_lib
  logging.set_verbosity(logging.WARNING)
  rows = []  # (run, accuracies over seeds, wall seconds)

  teacher_dir = os.path.join(args.workdir, 'teacher')
  if set(stages) - {'resnet'}:  # every stage but resnet distills from cnn_small
    t_cfg = base(args.teacher_epochs)
    t_cfg.student.model = 'cnn_small'
    t_cfg.seeds = args.teacher_seeds
    teacher = run('teacher', t_cfg, args.workdir)
    rows.append(('teacher cnn_small', [s['test_accuracy'] for s in teacher['students']], teacher['wall_seconds']))

  if 'scratch' in stages:
    scratch = run('scratch', student('', {'ce': 1.0}, args.student_epochs), args.workdir)
    rows.append(('MLP(64) from scratch', [s['test_accuracy'] for s in scratch['students']], scratch['wall_seconds']))

  if 'kd' in stages:
    rows += kd_grid(teacher_dir, args)
  rows += single_runs(teacher_dir, args, stages)
  if 'conv' in stages:
    rows += conv_stage(teacher_dir, args)
  if 'resnet' in stages:
    rows += resnet_stage(args)
  print_table(rows, args)


def kd_grid(teacher_dir, args):
  from kdjax import config_lib
  kd_cfg = student(teacher_dir, {'ce': 0.1, 'kd': 0.9}, args.student_epochs)
  config_lib.alpha_losses(kd_cfg, 0.9)
  kd_cfg.sweep = 'alpha=0.5,0.9; distill.temperature=2,4,8'
  kd = run('kd', kd_cfg, args.workdir)
  rows = []
  for alpha in (0.5, 0.9):
    for t in (2, 4, 8):
      accs = [s['test_accuracy'] for s in kd['students']
              if s['values']['alpha'] == alpha and s['values']['distill.temperature'] == t]
      rows.append((f'MLP(64) Hinton KD, alpha {alpha}, T {t}', accs, kd['wall_seconds']))
  return rows


def single_runs(teacher_dir, args, stages):
  """One program of 3 seeds per setting: DKD (mdistiller's beta 8, then beta 1), RKD, WTTM, WKD-L and CRLD
  (their reference weights, then lower ones); WKD-L's cosine decay scaled from epochs 150-240 of 240 to the
  students' length."""
  rows, e = [], args.student_epochs
  # DKD at mdistiller's CIFAR-100 setting (alpha 1, beta 8, T 4), then at beta 1; WTTM, WKD-L and CRLD at their
  # reference weights, then at lower ones: the reference weights do not train this MLP at this learning rate (see
  # benchmarks/README.md).
  for name, losses, settings in (
      ('dkd', {'ce': 1.0, 'dkd': 1.0}, {'dkd.beta': 8.0}), ('dkd_beta1', {'ce': 1.0, 'dkd': 1.0}, {'dkd.beta': 1.0}),
      ('rkd', {'ce': 1.0, 'rkd': 1.0}, {}), ('wttm', {'ce': 1.0, 'wttm': 4.0}, {}),
      ('wttm_w1', {'ce': 1.0, 'wttm': 1.0}, {}), ('wkd-l', {'ce': 1.0, 'wkd_l': 1.0}, {}),
      ('wkd-l_w60', {'ce': 1.0, 'wkd_l': 1.0}, {'wkd_l.logit_weight': 60.0}),
      ('crld', {'ce': 1.0, 'ce_strong': 1.0, 'crld': 1.0}, {}),
      ('crld_w01', {'ce': 1.0, 'ce_strong': 0.1, 'crld': 0.1}, {})):
    if name.split('_')[0] not in stages:
      continue
    cfg = student(teacher_dir, losses, e)
    cfg.distill.dkd.warmup_epochs = 2  # mdistiller's 20 of 240 epochs, scaled
    cfg.distill.wkd_l.update(decay_start=e * 150 / 240, decay_end=float(e))
    for key, value in settings.items():
      section, field = key.split('.')
      cfg.distill[section][field] = value
    s = run(name, cfg, args.workdir)
    label = ', '.join([f'{k} {v:g}' for k, v in losses.items()] + [f'{k} {v:g}' for k, v in settings.items()])
    rows.append((f'MLP(64) {name.split("_")[0].upper()} ({label})', [x['test_accuracy'] for x in s['students']],
                 s['wall_seconds']))
  return rows


def conv_stage(teacher_dir, args):
  """The feature methods, which need a student with convolutional maps: a half-width cnn_small (16 and 32
  channels, one hidden layer of 64) from the same teacher, scratch, Hinton KD, WKD-F and MGD at their reference
  recipes (`method=` axis) x 3 seeds, all in one program; WKD-F's decay scaled as WKD-L's. SDD needs a globally
  pooled student (its classifier on pooled regions): `resnet_stage`."""
  e = args.conv_epochs
  c = base(e)
  c.student.model, c.student.kwargs = 'cnn_small', {'channels': (16, 32), 'hidden': (64,)}
  c.teacher.update(model='cnn_small', checkpoint=teacher_dir, index=0)
  c.seeds = 3
  c.sweep = 'method=' + ','.join(CONV_METHODS)
  c.distill.wkd_f.update(decay_start=e * 150 / 240, decay_end=float(e))
  s = run('conv', c, args.workdir)
  return [(f'small CNN {CONV_METHODS[m]}', [x['test_accuracy'] for x in s['students'] if x['values']['method'] == m],
           s['wall_seconds']) for m in CONV_METHODS]


def resnet_stage(args):
  """SDD on a globally pooled pair: a resnet20 teacher (seed 0), then resnet8 students from scratch, with Hinton KD
  and with SD-KD at their reference recipes (`method=` axis; SD-KD's scales (1, 2, 4): the 7x7 map pooled to 4x4,
  2x2 and 1x1, PyTorch's overlapping adaptive bins) x 3 seeds, one program; the teacher runs every step (the
  region logits read its map)."""
  e = args.resnet_epochs
  t_cfg = base(e)
  t_cfg.student.model = 'resnet20'
  teacher = run('resnet_teacher', t_cfg, args.workdir)
  c = base(e)
  c.student.model = 'resnet8'
  c.teacher.update(model='resnet20', checkpoint=os.path.join(args.workdir, 'resnet_teacher'))
  c.seeds = 3
  c.sweep = 'method=' + ','.join(RESNET_METHODS)
  s = run('resnet', c, args.workdir)
  return [('teacher resnet20', [teacher['students'][0]['test_accuracy']], teacher['wall_seconds'])] + [
      (f'resnet8 {RESNET_METHODS[m]}', [x['test_accuracy'] for x in s['students'] if x['values']['method'] == m],
       s['wall_seconds']) for m in RESNET_METHODS]


def print_table(rows, args):
  print(f'\nFashion-MNIST test accuracy, mean ± std over 3 seeds (10,000 test images); teacher {args.teacher_epochs} '
        f'epochs, students {args.student_epochs} (small CNN students {args.conv_epochs}; resnet20 / resnet8 '
        f'{args.resnet_epochs}); {os.cpu_count()} CPU cores')
  width = max(len(r[0]) for r in rows + [(p[0] + ' (published)',) for p in PUBLISHED])
  print(f"{'run'.ljust(width)}  accuracy           program wall time")
  print(f"{'-' * width}  -----------------  -----------------")
  for name, accs, wall in rows:
    spread = f'{np.std(accs, ddof=1):.4f}' if len(accs) > 1 else '—     '  # one seed: no spread
    print(f'{name.ljust(width)}  {np.mean(accs):.4f} ± {spread}  {wall / 60:.1f} min')
  for name, acc in PUBLISHED:
    print(f"{(name + ' (published)').ljust(width)}  {acc:.3f}")


if __name__ == '__main__':
  main()
