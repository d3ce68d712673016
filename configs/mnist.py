r"""Hinton et al. (2015) KD on MNIST: an MLP teacher (2x1200, dropout) -> MLP student (2x800), or a CNN teacher ->
small CNN student; loss (1 - alpha) * CE + alpha * T^2 * KL, alpha and T as fields.

Config string 'mlp' (default) | 'cnn', optionally ',digits' for the CPU-sized run on sklearn digits.

  python launch.py --config=configs/mnist.py:mlp --workdir=runs/mnist_mlp --config.alpha=0.9 \
      --config.distill.temperature=20
  python launch.py --config=configs/mnist.py:cnn --workdir=runs/mnist_cnn
  python launch.py --config=configs/mnist.py:mlp,digits --workdir=/tmp/mnist_digits   # CPU, ~1 minute
"""

from kdjax import config_lib


def get_config(arg=None):
  args = config_lib.parse_args(arg, ('arch', 'data'), {'arch': 'mlp', 'data': 'mnist'})
  c = config_lib.base()
  if args['arch'] == 'mlp':
    c.teacher.model, c.student.model = 'mlp_teacher', 'mlp_student'
  elif args['arch'] == 'cnn':
    c.teacher.model, c.student.model = 'cnn_small', 'cnn_small'
    c.student.kwargs = {'channels': (8, 16), 'hidden': (32,)}
  else:
    raise ValueError(f"configs/mnist.py: arch must be 'mlp' or 'cnn', got {args['arch']!r}")
  config_lib.alpha_losses(c, 0.9)
  c.distill.temperature = 20.0 if args['arch'] == 'mlp' else 4.0
  if args['data'] == 'digits':
    return config_lib.digits_recipe(c)
  return config_lib.cosine_recipe(c, 'mnist', epochs=30, batch_size=128, lr=0.05)
