r"""Reverse KD (a smaller teacher than the student) and self KD (the same architecture) on CIFAR-10, with Hinton's
loss (0.1 CE + 0.9 KD, T = 4) and the CIFAR reference recipe.

Config string 'reverse' (resnet8 -> resnet32, default) | 'self' (resnet20 -> resnet20), optionally ',digits'.

  python launch.py --config=configs/reverse_self_cifar10.py:reverse --workdir=runs/reverse_kd
  python launch.py --config=configs/reverse_self_cifar10.py:self --workdir=runs/self_kd
  python launch.py --config=configs/reverse_self_cifar10.py:self,digits --workdir=/tmp/self_digits   # CPU
"""

from kdjax import config_lib

PAIRS = {'reverse': ('resnet8', 'resnet32'), 'self': ('resnet20', 'resnet20')}


def get_config(arg=None):
  args = config_lib.parse_args(arg, ('kind', 'data'), {'kind': 'reverse', 'data': 'cifar10'})
  if args['kind'] not in PAIRS:
    raise ValueError(f"configs/reverse_self_cifar10.py: kind must be one of {sorted(PAIRS)}, got {args['kind']!r}")
  c = config_lib.base()
  c.teacher.model, c.student.model = PAIRS[args['kind']]
  if args['data'] == 'digits':
    c.teacher.model, c.student.model = {'reverse': ('resnet8', 'resnet20'), 'self': ('resnet8', 'resnet8')}[
        args['kind']]
  c.distill.losses = {'ce': 0.1, 'kd': 0.9}
  c.distill.temperature = 4.0
  if args['data'] == 'digits':
    return config_lib.digits_recipe(c)
  return config_lib.cifar_recipe(c, 'cifar10')
