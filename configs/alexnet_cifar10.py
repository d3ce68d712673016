r"""AlexNet (adapted to 32x32) teacher -> small CNN student on CIFAR-10, the study's three students in one program:
its alpha weights the *label* loss, loss = alpha CE(y, s(z_s)) + (1 - alpha) KD, for alpha in {1, 0, 0.5}. alpha = 1
is the student trained on labels alone; alpha = 0 on the teacher's soft targets alone. This config's field is
`label_alpha` (kdjax's own `alpha` elsewhere weights the soft term), and tables and figures label it as the study
does. The teacher is trained first with its own recipe and cached; the students' train and validation loss curves
are in workdir/figures/curves.png.

  python launch.py --config=configs/alexnet_cifar10.py --workdir=runs/alexnet_cifar10
  python launch.py --config=configs/alexnet_cifar10.py:digits --workdir=/tmp/alexnet_digits   # CPU
"""

from kdjax import config_lib

LABEL_ALPHAS = (1, 0, 0.5)


def get_config(arg=None):
  items = config_lib.parse_flags(arg, ('digits',), 'configs/alexnet_cifar10.py')
  c = config_lib.base()
  c.student.model = 'cnn_small'
  c.teacher.model = 'alexnet'
  config_lib.label_alpha_losses(c, 0.5)
  c.sweep = f"label_alpha={','.join(map(str, LABEL_ALPHAS))}"
  c.sweep_labels = 'label_alpha=α (label-loss weight)'
  c.distill.temperature = 4.0
  if items['digits']:
    c.teacher.kwargs = {'hidden': (256, 256)}
    c.data.val_fraction = 0.2  # validation curves, as the study plots
    return config_lib.digits_recipe(c)
  c.data.val_fraction = 0.1
  return config_lib.cosine_recipe(c, 'cifar10', epochs=100, batch_size=128, lr=0.05,
                                 teacher=dict(optimizer=dict(lr=0.01)))
