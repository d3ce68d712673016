r"""The omitted-class experiment of Hinton et al. (2015): the student's transfer set has no example of one digit
(3 by default); the teacher saw them all. Evaluation reports the accuracy on the omitted digit separately, also
with the omitted class's bias raised (Hinton et al. raised it by 3.5; --config.distill.omitted.bias).

Config string: mnist (default) | digits (the CPU-sized run on sklearn digits) | fashion (Fashion-MNIST, where class 3
is 'dress': Debian's dataset-fashion-mnist package, or --config.data.dir).

  python launch.py --config=configs/omitted_mnist.py --workdir=runs/omitted3 --config.data.omit_class=3
  python launch.py --config=configs/omitted_mnist.py:digits --workdir=/tmp/omitted_digits   # CPU
  python launch.py --config=configs/omitted_mnist.py:fashion --workdir=runs/omitted_fashion   # Fashion-MNIST
"""

from kdjax import config_lib


DATASETS = {'mnist': 'mnist', 'fashion': 'fashion_mnist', 'digits': 'digits'}


def get_config(arg=None):
  data = arg or 'mnist'
  if data not in DATASETS:
    raise ValueError(f"configs/omitted_mnist.py: the config string is one of {', '.join(DATASETS)}, got {arg!r}")
  c = config_lib.base()
  c.teacher.model, c.student.model = 'mlp_teacher', 'mlp_student'
  c.data.omit_class = 3
  c.distill.losses = {'ce': 0.1, 'kd': 0.9}
  c.distill.temperature = 8.0
  if data == 'digits':
    c.teacher.model = 'cnn_small'
    c.student.model = 'mlp'
    c.student.kwargs = {'hidden': (64,)}
    return config_lib.digits_recipe(c, epochs=20)
  return config_lib.cosine_recipe(c, DATASETS[data], epochs=30, batch_size=128, lr=0.05)
