r"""AlexNet (adapted to 32x32) teacher -> small CNN student on CIFAR-10, for alpha in {1, 0, 0.5}: a suite of three
students distilled from one teacher (trained first and cached), then a table of their test accuracy.
alpha = 0 is the student trained on labels alone; alpha = 1 on the teacher's soft targets alone.

  python launch.py --config=configs/alexnet_cifar10.py --workdir=runs/alexnet_cifar10
  python launch.py --config=configs/alexnet_cifar10.py:digits --workdir=/tmp/alexnet_digits   # CPU
"""

import ml_collections

from kdjax import config_lib

ALPHAS = {'alpha1': 1.0, 'alpha0': 0.0, 'alpha05': 0.5}


def run(alpha: float, digits: bool) -> ml_collections.ConfigDict:
  c = config_lib.base()
  c.student.model = 'cnn_small'
  c.teacher.model = 'alexnet'
  c.distill.losses = {'ce': 1.0 - alpha, 'kd': alpha}
  c.distill.temperature = 4.0
  if digits:
    c.teacher.kwargs = {'hidden': (256, 256)}
    return config_lib.digits_recipe(c)
  c.data.name = 'cifar10'
  c.epochs, c.batch_size = 100, 128
  c.optimizer.update(lr=0.05, weight_decay=5e-4)
  c.schedule.name = 'cosine'
  c.teacher.recipe = dict(epochs=100, optimizer=dict(lr=0.01))
  return c


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.suite_order = tuple(ALPHAS)
  c.suite = {name: run(alpha, arg == 'digits') for name, alpha in ALPHAS.items()}
  return c
