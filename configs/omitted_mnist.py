r"""The omitted-class experiment of Hinton et al. (2015): the student's transfer set has no example of one digit
(3 by default); the teacher saw them all. Evaluation reports the accuracy on the omitted digit separately, also
with the omitted class's bias raised (Hinton et al. raised it by 3.5; --config.distill.omitted.bias).

  python launch.py --config=configs/omitted_mnist.py --workdir=runs/omitted3 --config.data.omit_class=3
  python launch.py --config=configs/omitted_mnist.py:digits --workdir=/tmp/omitted_digits   # CPU
"""

from kdjax import config_lib


def get_config(arg=None):
  c = config_lib.base()
  c.teacher.model, c.student.model = 'mlp_teacher', 'mlp_student'
  c.data.omit_class = 3
  c.distill.losses = {'ce': 0.1, 'kd': 0.9}
  c.distill.temperature = 8.0
  if arg == 'digits':
    c.teacher.model = 'cnn_small'
    c.student.model = 'mlp'
    c.student.kwargs = {'hidden': (64,)}
    return config_lib.digits_recipe(c, epochs=20)
  return config_lib.cosine_recipe(c, 'mnist', epochs=30, batch_size=128, lr=0.05)
