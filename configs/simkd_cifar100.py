r"""SimKD (Chen et al., CVPR 2022): the student's last feature map, projected, through the teacher's classifier.

Config string 'teacher,student[,variant][,digits]'; defaults resnet32x4,resnet8x4 with the paper's recipe
(240 epochs, batch 64, lr 0.05 (0.01 for MobileNetV2/ShuffleNet students), x0.1 at 150/180/210, wd 5e-4,
projector factor 2, loss weight 1 on the feature MSE alone: the SimKD repo's -c 0 -d 0 -b 1).
Variants: l2 (the paper), kl (KL of the reused-classifier logits to the teacher's), labels (+ CE on them),
multi (the second-last stage projected and matched too), all (every stage); the item 'lrs' adds the SimKD study's
learning-rate sweep, lr in {0.001, 0.005, 0.01, 0.05, 0.1}, as five students of one program; or override
--config.distill.simkd.{loss,use_labels,projectors,factor}. The teacher is trained first and cached unless
--config.teacher.checkpoint names one (e.g. a published teacher imported with kdjax.tools.import_torch).

  python launch.py --config=configs/simkd_cifar100.py --workdir=runs/simkd_r32x4_r8x4
  python launch.py --config=configs/simkd_cifar100.py:wrn_40_2,wrn_16_2,multi --workdir=runs/simkd_multi
  python launch.py --config=configs/simkd_cifar100.py:resnet32x4,resnet8x4 --workdir=runs/simkd \
      --config.teacher.checkpoint=teachers/resnet32x4_cifar100
  python launch.py --config=configs/simkd_cifar100.py:resnet32x4,resnet8x4,lrs --workdir=runs/simkd_lrs
  python launch.py --config=configs/simkd_cifar100.py:digits --workdir=/tmp/simkd_digits   # CPU, ~1 minute
  python launch.py --config=configs/simkd_cifar100.py:digits,lrs --workdir=/tmp/simkd_lrs   # CPU
"""

from kdjax import config_lib

VARIANTS = {'l2': {}, 'kl': {'loss': 'kl'}, 'labels': {'use_labels': True}, 'multi': {'projectors': 'multi'},
            'all': {'projectors': 'all'}}


LRS = (0.001, 0.005, 0.01, 0.05, 0.1)


def get_config(arg=None):
  items = [a for a in (arg or '').split(',') if a]
  digits = 'digits' in items
  variant = next((a for a in items if a in VARIANTS), 'l2')
  models = [a for a in items if a not in VARIANTS and a not in ('digits', 'lrs')]
  if len(models) > 2:
    raise ValueError(f'configs/simkd_cifar100.py: expected at most a teacher and a student, got {models}')
  teacher, student = (models + ['', ''])[:2] if models else ('', '')
  c = config_lib.base()
  c.student.model = student or ('resnet8' if digits else 'resnet8x4')
  c.teacher.model = teacher or ('resnet20' if digits else 'resnet32x4')
  c.distill.losses = {'simkd': 1.0}
  c.distill.simkd.update(VARIANTS[variant])
  if 'lrs' in items:
    c.sweep = f"optimizer.lr={','.join(map(str, LRS))}"
  return config_lib.digits_recipe(c) if digits else config_lib.cifar_recipe(c, 'cifar100')
