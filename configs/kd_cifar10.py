r"""Hinton KD on CIFAR-10: ResNet18 teacher -> 2-conv-layer CNN student (100 epochs, batch 128, SGD lr 0.1,
cosine), loss (1 - alpha) * CE + alpha * T^2 * KL at temperature T. alpha and T are fields.

Config string items: 'grid' trains the CIFAR-10 study's 45 students in one program, alpha in {0.1, 0.25, 0.5, 0.75,
0.9} x T in {1, 2.5, 5, 7.5, 10, 20, 30, 40, 50}, with that study's loss (1 - alpha) CE(y, s(z_s)) +
alpha CE(s(z_t / T), s(z_s / T)): no T^2 on the soft term (distill.kd_scale = '1'), so its gradient fades as T
grows. kdjax logs the soft term as the KL divergence, which differs from that cross entropy by the teacher's
entropy, a constant for the student: the same gradients. 'digits' runs the same on sklearn digits on the CPU
(resnet20 teacher).

  python launch.py --config=configs/kd_cifar10.py --workdir=runs/kd_cifar10 --config.alpha=0.9 \
      --config.distill.temperature=4
  python launch.py --config=configs/kd_cifar10.py:grid --workdir=runs/kd_cifar10_grid --config.seeds=3
  python launch.py --config=configs/kd_cifar10.py:digits --workdir=/tmp/kd_digits   # CPU, ~1 minute
  python launch.py --config=configs/kd_cifar10.py:grid,digits --workdir=/tmp/kd_grid_digits   # CPU, 45 students
"""

from kdjax import config_lib

ALPHAS = (0.1, 0.25, 0.5, 0.75, 0.9)
TEMPERATURES = (1, 2.5, 5, 7.5, 10, 20, 30, 40, 50)


def get_config(arg=None):
  items = config_lib.parse_flags(arg, ('grid', 'digits'), 'configs/kd_cifar10.py')
  c = config_lib.base()
  c.student.model = 'cnn2'
  c.teacher.model = 'resnet20' if items['digits'] else 'ResNet18'
  config_lib.alpha_losses(c, 0.9)
  c.distill.temperature = 4.0
  if items['grid']:
    c.distill.kd_scale = '1'
    c.sweep = (f"alpha={','.join(map(str, ALPHAS))}; "
               f"distill.temperature={','.join(map(str, TEMPERATURES))}")
    c.sweep_labels = 'alpha=α (soft-target weight); distill.temperature=T'
  if items['digits']:
    return config_lib.digits_recipe(c)
  return config_lib.cosine_recipe(c, 'cifar10', epochs=100, batch_size=128, lr=0.1)
