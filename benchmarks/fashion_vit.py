r"""A ViT student learns on real Fashion-MNIST (Debian's dataset-fashion-mnist: 60,000 train / 10,000 test, 28x28):
from scratch, with DeiT's hard distillation and with its soft distillation from a cnn_small teacher, 3 seeds each,
mean ± std.

The student is kdjax's `vit_test` (width 32, 2 blocks, 2 heads, MLP ratio 2, patch 4: 7 x 7 = 49 patches at 28 px)
or, for DeiT, `vit_test_distilled` (the same with a distillation token and its head). Its recipe is DeiT's at this
scale: AdamW, weight decay 0.05, linear warmup (a quarter epoch) then cosine, batch 128, lr 1e-3 (DeiT's 5e-4 x
batch / 512 would be 1.25e-4: too slow for two epochs); DeiT's loss weights, ce 0.5 + deit 0.5 (`deit.kind` hard, or
soft at tau 1). The teacher (cnn_small, SGD momentum 0.9, lr 0.05 cosine, weight decay 5e-4) trains first; its
logits are computed once for the training set (no augmentation) and reused every epoch. A distilled student's
accuracy is DeiT's inference rule, the average of its two heads; each head's is printed too.

The three students are one program (one kdjax sweep of 9 students): a `method=` axis zipped with a `student.model=`
axis, `method=ce,deit_hard,deit_soft; student.model=vit_test,vit_test_distilled,vit_test_distilled` (DeiT's two
recipes, kdjax/methods/deit.py), 3 seeds each, against one teacher checkpoint.

Timings are in benchmarks/README.md.

  python benchmarks/fashion_vit.py --workdir=/tmp/fashion_vit
"""

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import kdjax.platform  # noqa: E402,F401


def base(epochs: int, train_examples: int):
  from kdjax import config_lib
  c = config_lib.base()
  c.data.name = 'fashion_mnist'
  c.data.train_examples = train_examples
  c.epochs, c.batch_size = epochs, 128
  c.eval_every_epochs = c.checkpoint_every_epochs = epochs
  c.eval_batch_size = 1000
  c.tensorboard = c.figures = False
  return c


def teacher_config(epochs: int, train_examples: int):
  c = base(epochs, train_examples)
  c.student.model = 'cnn_small'
  c.optimizer.update(name='sgd', lr=0.05, momentum=0.9, weight_decay=5e-4)
  c.schedule.name = 'cosine'
  return c


METHODS = ('ce', 'deit_hard', 'deit_soft')
LABELS = {'ce': 'ViT from scratch (ce)', 'deit_hard': 'ViT + DeiT hard (ce 0.5, deit 0.5)',
          'deit_soft': 'ViT + DeiT soft (ce 0.5, deit 0.5, tau 1)'}


def students_config(teacher_dir: str, epochs: int, train_examples: int, lr: float):
  """The three students x 3 seeds in one program."""
  c = base(epochs, train_examples)
  c.optimizer.update(name='adamw', lr=lr, weight_decay=0.05)
  c.schedule = dict(c.schedule.to_dict(), name='cosine', warmup_epochs=0.25)  # a float: replace the section
  c.seeds = 3
  c.student.model = 'vit_test'
  c.teacher.update(model='cnn_small', checkpoint=teacher_dir)
  c.sweep = f'method={",".join(METHODS)}; student.model=vit_test,vit_test_distilled,vit_test_distilled'
  c.sweep_mode = 'zip'
  return c


def run(name, cfg, workdir):
  from kdjax import train
  t = time.time()
  summary = train.train_and_evaluate(cfg, os.path.join(workdir, name))
  print(f'[{name}: {summary.get("num_students", 1)} student(s) in one program, {time.time() - t:.0f} s, '
        f'load average {os.getloadavg()[0]:.2f}]', flush=True)
  return summary


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='/tmp/kdjax_fashion_vit')
  parser.add_argument('--teacher_epochs', type=int, default=2)
  parser.add_argument('--student_epochs', type=int, default=2)
  parser.add_argument('--train_examples', type=int, default=0, help='0 = all 60,000')
  parser.add_argument('--lr', type=float, default=1e-3)
  args = parser.parse_args()
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  start, load0 = time.time(), os.getloadavg()

  teacher = run('teacher', teacher_config(args.teacher_epochs, args.train_examples), args.workdir)
  teacher_dir = os.path.join(args.workdir, 'teacher')
  s = run('students', students_config(teacher_dir, args.student_epochs, args.train_examples, args.lr), args.workdir)
  rows = []  # (name, accuracies over seeds, extra text)
  for method in METHODS:
    mine = [x for x in s['students'] if x['values']['method'] == method]
    heads = ''
    if method != 'ce':
      cls = [x['test_cls_head_accuracy'] for x in mine]
      dist = [x['test_dist_head_accuracy'] for x in mine]
      heads = f'class head {np.mean(cls):.4f} ± {np.std(cls, ddof=1):.4f}, ' \
              f'distillation head {np.mean(dist):.4f} ± {np.std(dist, ddof=1):.4f}'
    rows.append((LABELS[method], [x['test_accuracy'] for x in mine], heads))

  n = args.train_examples or 60000
  steps = args.student_epochs * (n // 128)
  print(f'\nFashion-MNIST test accuracy (10,000 test images), ViT student vit_test(_distilled), mean ± std over 3 '
        f'seeds; teacher cnn_small {args.teacher_epochs} epochs: {teacher["test_accuracy"]:.4f}; students '
        f'{args.student_epochs} epochs of {n} images = {steps} steps of batch 128, AdamW lr {args.lr:g}; '
        f'{os.cpu_count()} CPU cores, load average {load0[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; '
        f'the 9 students one program of {s["wall_seconds"] / 60:.1f} min; total wall time '
        f'{(time.time() - start) / 60:.1f} min')
  width = max(len(r[0]) for r in rows)
  print(f"{'student'.ljust(width)}  accuracy           per head")
  for name, accs, heads in rows:
    print(f'{name.ljust(width)}  {np.mean(accs):.4f} ± {np.std(accs, ddof=1):.4f}  {heads}')


if __name__ == '__main__':
  main()
