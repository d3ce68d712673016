r"""Subclass distillation (Müller, Kornblith & Hinton 2020) on MNIST: the teacher has 2 subclass logits per class
and is trained with CE on its class logits (logsumexp over subclasses) plus the auxiliary loss that spreads the
examples over the subclasses; the student, with the same head layout, matches the teacher's subclass logits at
temperature T plus CE on its class logits.

Config string: mnist (default) | digits (the CPU-sized run on sklearn digits) | fashion (Fashion-MNIST: Debian's
dataset-fashion-mnist package, or --config.data.dir).

  python launch.py --config=configs/subclass_mnist.py --workdir=runs/subclass_mnist
  python launch.py --config=configs/subclass_mnist.py:digits --workdir=/tmp/subclass_digits   # CPU
  python launch.py --config=configs/subclass_mnist.py:fashion --workdir=runs/subclass_fashion   # Fashion-MNIST
"""

from kdjax import config_lib

SUBCLASSES = 2
DATASETS = {'mnist': 'mnist', 'fashion': 'fashion_mnist', 'digits': 'digits'}


def get_config(arg=None):
  data = arg or 'mnist'
  if data not in DATASETS:
    raise ValueError(f"configs/subclass_mnist.py: the config string is one of {', '.join(DATASETS)}, got {arg!r}")
  c = config_lib.base()
  c.teacher.model, c.student.model = 'mlp_teacher', 'mlp_student'
  c.teacher.subclasses = c.student.subclasses = SUBCLASSES
  c.teacher.losses = {'ce': 1.0, 'subclass_aux': 1.0}
  c.distill.losses = {'ce': 0.1, 'subclass_kd': 0.9}
  c.distill.temperature = 4.0
  if data == 'digits':
    return config_lib.digits_recipe(c)
  return config_lib.cosine_recipe(c, DATASETS[data], epochs=30, batch_size=128, lr=0.05)
