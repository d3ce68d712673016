r"""Supervised training of a network (a teacher, or a from-scratch baseline), with the CIFAR reference recipe.

Config string: 'model,dataset' (defaults resnet32x4,cifar100). CIFAR: 240 epochs, batch 64, SGD lr 0.05
(0.01 for MobileNetV2/ShuffleNet, as the references), momentum 0.9, wd 5e-4, x0.1 at 150/180/210.
digits/mnist/fashion_mnist: a short cosine recipe.

  python launch.py --config=configs/teacher.py:resnet32x4,cifar100 --workdir=runs/teacher_resnet32x4
  python launch.py --config=configs/teacher.py:cnn_small,digits --workdir=/tmp/teacher_digits
"""

from kdjax import config_lib

def get_config(arg=None):
  args = config_lib.parse_args(arg, ('model', 'dataset'), {'model': 'resnet32x4', 'dataset': 'cifar100'})
  c = config_lib.base()
  c.student.model = args['model']
  c.data.name = args['dataset']
  c.distill.losses = {'ce': 1.0}
  if args['dataset'] in ('cifar10', 'cifar100'):
    return config_lib.cifar_recipe(c, args['dataset'])
  return config_lib.cosine_recipe(c, args['dataset'], epochs=20, batch_size=64, lr=0.05)
