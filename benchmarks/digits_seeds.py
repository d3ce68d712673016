r"""Digits, several seeds: teacher, scratch student, KD student and SimKD student test accuracy (mean +- std), and
the omitted-digit experiment with and without the bias adjustment. CPU-sized (about 25 minutes on 2 cores).

  python benchmarks/digits_seeds.py --seeds=5 --workdir=/tmp/digits_seeds
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kdjax.platform  # noqa: E402,F401  (before jax)

import json  # noqa: E402

from absl import app
from absl import flags
from absl import logging
import numpy as np

from kdjax import config_lib  # noqa: E402
from kdjax import train  # noqa: E402

flags.DEFINE_integer('seeds', 5, 'Number of seeds.')
flags.DEFINE_string('workdir', '/tmp/kdjax_digits_seeds', 'Where the runs go.')
flags.DEFINE_integer('epochs', 10, 'Student epochs.')
FLAGS = flags.FLAGS

TEACHER, STUDENT = 'resnet20', 'resnet8'


def run_config(seed, model, losses, teacher_dir=None, **data):
  c = config_lib.digits_recipe(config_lib.base(), epochs=FLAGS.epochs)
  c.seed = seed
  c.student.model = model
  c.distill.losses = losses
  c.data.update(data)
  c.tensorboard = False
  c.eval_every_epochs = c.checkpoint_every_epochs = FLAGS.epochs
  if teacher_dir:
    c.teacher.update(model=TEACHER, checkpoint=teacher_dir)
  return c


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  rows = {k: [] for k in ('teacher', 'scratch', 'kd', 'simkd', 'omitted', 'omitted_adjusted',
                          'cnn_teacher', 'cnn_omitted', 'cnn_omitted_adjusted')}
  for seed in range(FLAGS.seeds):
    base = os.path.join(FLAGS.workdir, f'seed{seed}')
    t_cfg = run_config(seed, TEACHER, {'ce': 1.0})
    t_cfg.epochs = 15
    t_dir = os.path.join(base, 'teacher')
    rows['teacher'].append(train.train_and_evaluate(t_cfg, t_dir)['test_accuracy'])
    rows['scratch'].append(train.train_and_evaluate(run_config(seed, STUDENT, {'ce': 1.0}),
                                                    os.path.join(base, 'scratch'))['test_accuracy'])
    rows['kd'].append(train.train_and_evaluate(run_config(seed, STUDENT, {'ce': 0.1, 'kd': 0.9}, t_dir),
                                               os.path.join(base, 'kd'))['test_accuracy'])
    rows['simkd'].append(train.train_and_evaluate(run_config(seed, STUDENT, {'simkd': 1.0}, t_dir),
                                                  os.path.join(base, 'simkd'))['test_accuracy'])
    # The omitted-digit experiment (configs/omitted_mnist.py:digits), from the resnet20 teacher and from a
    # cnn_small teacher.
    c_cfg = run_config(seed, 'cnn_small', {'ce': 1.0})
    c_cfg.epochs = 15
    c_dir = os.path.join(base, 'cnn_teacher')
    rows['cnn_teacher'].append(train.train_and_evaluate(c_cfg, c_dir)['test_accuracy'])
    for prefix, teacher, teacher_dir in (('', TEACHER, t_dir), ('cnn_', 'cnn_small', c_dir)):
      omit = run_config(seed, 'mlp', {'ce': 0.1, 'kd': 0.9}, teacher_dir, omit_class=3)
      omit.teacher.model = teacher
      omit.student.kwargs = {'hidden': (64,)}
      omit.distill.temperature = 8.0
      omit.epochs = 20
      s = train.train_and_evaluate(omit, os.path.join(base, prefix + 'omitted'))
      rows[prefix + 'omitted'].append(s['test_omitted_accuracy'])
      rows[prefix + 'omitted_adjusted'].append(s['test_omitted_accuracy_adjusted'])
    print(f'seed {seed}: ' + ', '.join(f'{k} {v[-1]:.4f}' for k, v in rows.items()), flush=True)
  print(f'\ndigits, {FLAGS.seeds} seeds (teacher {TEACHER}, students {STUDENT}; omitted digit 3: mlp(64) student, '
        'T=8, bias +3.5, from the resnet20 teacher and from a cnn_small teacher (cnn_*))')
  print('| run | test accuracy, mean ± std |\n|---|---|')
  for k, v in rows.items():
    print(f'| {k} | {np.mean(v):.4f} ± {np.std(v):.4f} |')
  with open(os.path.join(FLAGS.workdir, 'results.json'), 'w') as f:
    json.dump(rows, f, indent=2)


if __name__ == '__main__':
  app.run(main)
