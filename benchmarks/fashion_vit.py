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

The three students differ in code (the scratch student has no distillation token; hard and soft are different
losses), which a sweep's `method=` axis can express only for methods with a CIFAR-100 `distill.Recipe` (DeiT has
none: it needs a ViT student with the token): each is its own program of 3 seeds, against the same teacher
checkpoint.

The defaults (teacher 2 epochs, students 2 epochs: 936 steps) took 7 + 28 minutes on 2 CPU cores at load 8-11
(benchmarks/README.md); the students are not converged at that length.

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


def student_config(teacher_dir: str, kind: str, epochs: int, train_examples: int, lr: float):
  c = base(epochs, train_examples)
  c.optimizer.update(name='adamw', lr=lr, weight_decay=0.05)
  c.schedule = dict(c.schedule.to_dict(), name='cosine', warmup_epochs=0.25)  # a float: replace the section
  c.seeds = 3
  if kind == 'scratch':
    c.student.model = 'vit_test'
    return c
  c.student.model = 'vit_test_distilled'
  c.teacher.update(model='cnn_small', checkpoint=teacher_dir)
  c.distill.losses = {'ce': 0.5, 'deit': 0.5}
  c.distill.deit.update(kind=kind, tau=1.0)
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
  rows = []  # (name, accuracies over seeds, extra text, program wall seconds)
  for kind, label in (('scratch', 'ViT from scratch (ce)'), ('hard', 'ViT + DeiT hard (ce 0.5, deit 0.5)'),
                      ('soft', 'ViT + DeiT soft (ce 0.5, deit 0.5, tau 1)')):
    cfg = student_config(teacher_dir, kind, args.student_epochs, args.train_examples, args.lr)
    s = run(kind, cfg, args.workdir)
    accs = [x['test_accuracy'] for x in s['students']]
    heads = ''
    if kind != 'scratch':
      cls = [x['test_cls_head_accuracy'] for x in s['students']]
      dist = [x['test_dist_head_accuracy'] for x in s['students']]
      heads = f'class head {np.mean(cls):.4f} ± {np.std(cls, ddof=1):.4f}, ' \
              f'distillation head {np.mean(dist):.4f} ± {np.std(dist, ddof=1):.4f}'
    rows.append((label, accs, heads, s['wall_seconds']))

  n = args.train_examples or 60000
  steps = args.student_epochs * (n // 128)
  print(f'\nFashion-MNIST test accuracy (10,000 test images), ViT student vit_test(_distilled), mean ± std over 3 '
        f'seeds; teacher cnn_small {args.teacher_epochs} epochs: {teacher["test_accuracy"]:.4f}; students '
        f'{args.student_epochs} epochs of {n} images = {steps} steps of batch 128, AdamW lr {args.lr:g}; '
        f'{os.cpu_count()} CPU cores, load average {load0[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; '
        f'total wall time {(time.time() - start) / 60:.1f} min')
  width = max(len(r[0]) for r in rows)
  print(f"{'student'.ljust(width)}  accuracy           program wall  per head")
  for name, accs, heads, wall in rows:
    print(f'{name.ljust(width)}  {np.mean(accs):.4f} ± {np.std(accs, ddof=1):.4f}  {wall / 60:5.1f} min     {heads}')


if __name__ == '__main__':
  main()
