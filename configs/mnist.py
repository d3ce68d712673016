r"""Hinton et al. (2015) KD on MNIST: an MLP teacher (2x1200, dropout) -> MLP student (2x800), or a CNN teacher ->
small CNN student; loss (1 - alpha) * CE + alpha * T^2 * KL, alpha and T as fields.

Config string 'arch[,data][,sweep]': arch mlp (default) | cnn; data mnist (default) | digits (the CPU-sized run on
sklearn digits) | fashion (the same recipe on Fashion-MNIST: Debian's dataset-fashion-mnist package, or
--config.data.dir); sweep none (default) | grid (alpha in {0.1, 0.5, 0.9} x T in {1, 2, 5, 10, 20}: 15 students in
one program, plotted as a heatmap) | temperature (T in {1, 2, 5, 10, 20, 50} at alpha 0.9: the effect of T, plotted
as a line).

  python launch.py --config=configs/mnist.py:mlp --workdir=runs/mnist_mlp --config.alpha=0.9 \
      --config.distill.temperature=20
  python launch.py --config=configs/mnist.py:cnn --workdir=runs/mnist_cnn
  python launch.py --config=configs/mnist.py:mlp,mnist,grid --workdir=runs/mnist_grid --config.seeds=3
  python launch.py --config=configs/mnist.py:mlp,fashion --workdir=runs/fashion_mlp
  python launch.py --config=configs/mnist.py:mlp,digits --workdir=/tmp/mnist_digits   # CPU, ~1 minute
  python launch.py --config=configs/mnist.py:mlp,digits,temperature --workdir=/tmp/mnist_t   # CPU
"""

from kdjax import config_lib

# The config string's data item -> the dataset (digits has its own recipe).
DATASETS = {'mnist': 'mnist', 'digits': 'digits', 'fashion': 'fashion_mnist'}
SWEEPS = {
    'none': '',
    'grid': 'alpha=0.1,0.5,0.9; distill.temperature=1,2,5,10,20',
    'temperature': 'distill.temperature=1,2,5,10,20,50',
}


def get_config(arg=None):
  args = config_lib.parse_args(arg, ('arch', 'data', 'sweep'), {'arch': 'mlp', 'data': 'mnist', 'sweep': 'none'})
  c = config_lib.base()
  if args['arch'] == 'mlp':
    c.teacher.model, c.student.model = 'mlp_teacher', 'mlp_student'
  elif args['arch'] == 'cnn':
    c.teacher.model, c.student.model = 'cnn_small', 'cnn_small'
    c.student.kwargs = {'channels': (8, 16), 'hidden': (32,)}
  else:
    raise ValueError(f"configs/mnist.py: arch must be 'mlp' or 'cnn', got {args['arch']!r}")
  if args['data'] not in DATASETS:
    raise ValueError(f"configs/mnist.py: data must be one of {', '.join(DATASETS)}, got {args['data']!r}")
  if args['sweep'] not in SWEEPS:
    raise ValueError(f"configs/mnist.py: sweep must be one of {', '.join(SWEEPS)}, got {args['sweep']!r}")
  config_lib.alpha_losses(c, 0.9)
  c.distill.temperature = 20.0 if args['arch'] == 'mlp' else 4.0
  c.sweep = SWEEPS[args['sweep']]
  c.sweep_labels = 'alpha=α; distill.temperature=T'
  if args['data'] == 'digits':
    return config_lib.digits_recipe(c)
  return config_lib.cosine_recipe(c, DATASETS[args['data']], epochs=30, batch_size=128, lr=0.05)
