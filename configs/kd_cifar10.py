r"""Hinton KD on CIFAR-10: ResNet18 teacher -> 2-conv-layer CNN student (100 epochs, batch 128, SGD lr 0.1,
cosine), loss (1 - alpha) * CE + alpha * T^2 * KL at temperature T. alpha and T are fields:

  python launch.py --config=configs/kd_cifar10.py --workdir=runs/kd_cifar10 --config.alpha=0.9 \
      --config.distill.temperature=4
  python launch.py --config=configs/kd_cifar10.py:digits --workdir=/tmp/kd_digits   # CPU, ~1 minute
"""

from kdjax import config_lib


def get_config(arg=None):
  digits = arg == 'digits'
  c = config_lib.base()
  c.student.model = 'cnn2'
  c.teacher.model = 'resnet20' if digits else 'ResNet18'
  config_lib.alpha_losses(c, 0.9)
  c.distill.temperature = 4.0
  if digits:
    return config_lib.digits_recipe(c)
  return config_lib.cosine_recipe(c, 'cifar10', epochs=100, batch_size=128, lr=0.1)
