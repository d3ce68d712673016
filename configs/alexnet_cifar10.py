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
  return config_lib.cosine_recipe(c, 'cifar10', epochs=100, batch_size=128, lr=0.05,
                                 teacher=dict(optimizer=dict(lr=0.01)))


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.suite_order = tuple(ALPHAS)
  c.suite = {name: run(alpha, arg == 'digits') for name, alpha in ALPHAS.items()}
  return c
