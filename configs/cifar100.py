r"""CIFAR-100 distillation benchmark: the teacher/student pairs of the CRD, DKD and SimKD papers, every anchor method.

Config string 'method,teacher,student' (default kd,resnet32x4,resnet8x4). Methods: kd fitnet at sp rkd pkt vid crd dkd
simkd nst cc ab ft fsp kdsvd (ab, ft, fsp: with RepDistiller's 30-epoch pre-training stage first,
config.distill.init, counted in config.epochs = 270). Pairs (teacher -> student): resnet32x4->resnet8x4, wrn_40_2->wrn_16_2, wrn_40_2->wrn_40_1, vgg13->vgg8,
resnet110->resnet32, resnet56->resnet20, resnet32x4->ShuffleV1, resnet32x4->ShuffleV2, wrn_40_2->ShuffleV1,
vgg13->MobileNetV2, ResNet50->MobileNetV2 (other model pairs are accepted too; DKD then uses mdistiller's default
beta 8).

Recipe (RepDistiller train_student.py, also mdistiller's and SimKD's CIFAR-100 recipe): 240 epochs, batch 64, SGD
momentum 0.9, lr 0.05 (0.01 for MobileNetV2/ShuffleV1/ShuffleV2 students), x0.1 at epochs 150/180/210, weight decay
5e-4. Loss weights are the references' flags: KD `-r 0.1 -a 0.9 -b 0` (T = 4); FitNet/AT/SP/RKD/PKT/VID/CRD
`-r 1 -a 0 -b <w>` with w = 100/1000/3000/1/30000/1/0.8 (RepDistiller scripts/run_cifar_distill.sh); DKD ce 1,
alpha 1, beta per pair, T 4, 20 warmup epochs (mdistiller configs/cifar100/dkd/*.yaml); SimKD `-c 0 -d 0 -b 1`
(DefangChen/SimKD README), factor 2.

The teacher is trained first with the same recipe (lr 0.05) and cached (config.teacher.checkpoint = ''), or taken
from a checkpoint: a kdjax run's workdir or a published PyTorch teacher imported with
`python -m kdjax.tools.import_torch`.

  python launch.py --config=configs/cifar100.py:crd,resnet32x4,resnet8x4 --workdir=runs/crd_resnet32x4_resnet8x4
  python launch.py --config=configs/cifar100.py:dkd,digits --workdir=/tmp/dkd_digits   # CPU, every method
  python launch.py --config=configs/cifar100.py:dkd,vgg13,MobileNetV2 --workdir=runs/dkd_vgg13_mv2 \
      --config.teacher.checkpoint=runs/teacher_vgg13
"""

from kdjax import config_lib
from kdjax import distill

PAIRS = (
    ('resnet32x4', 'resnet8x4'),
    ('wrn_40_2', 'wrn_16_2'),
    ('wrn_40_2', 'wrn_40_1'),
    ('vgg13', 'vgg8'),
    ('resnet110', 'resnet32'),
    ('resnet56', 'resnet20'),
    ('resnet32x4', 'ShuffleV1'),
    ('resnet32x4', 'ShuffleV2'),
    ('wrn_40_2', 'ShuffleV1'),
    ('vgg13', 'MobileNetV2'),
    ('ResNet50', 'MobileNetV2'),
)

METHODS = tuple(distill.REFERENCE_WEIGHTS)

# mdistiller configs/cifar100/dkd/*.yaml set DKD.BETA for these pairs; the others keep cfg.DKD.BETA = 8.
DKD_BETA = {
    ('resnet56', 'resnet20'): 2.0,
    ('resnet110', 'resnet32'): 2.0,
    ('wrn_40_2', 'wrn_16_2'): 6.0,
    ('wrn_40_2', 'wrn_40_1'): 6.0,
    ('vgg13', 'vgg8'): 6.0,
    ('vgg13', 'MobileNetV2'): 6.0,
}

def get_config(arg=None):
  items = [a for a in (arg or '').split(',') if a]
  digits = 'digits' in items
  arg = ','.join(a for a in items if a != 'digits')
  args = config_lib.parse_args(arg, ('method', 'teacher', 'student'),
                               {'method': 'kd', 'teacher': 'resnet20' if digits else 'resnet32x4',
                                'student': 'resnet8' if digits else 'resnet8x4'})
  method, teacher, student = args['method'], args['teacher'], args['student']
  if method not in METHODS:
    raise ValueError(f'configs/cifar100.py: unknown method {method!r}; choose one of {", ".join(METHODS)}')
  c = config_lib.base()
  c.student.model = student
  c.teacher.model = teacher
  c.teacher.checkpoint = ''  # '' = train the teacher with this recipe first and cache it
  # The teacher-to-be trains with its own learning rate, whatever the student's (configs/teacher.py's recipe).
  c.teacher.recipe = {'optimizer': {'lr': 0.01 if teacher in config_lib.SMALL_LR_STUDENTS else 0.05}}
  c.distill.losses = distill.reference_weights(method)
  c.distill.temperature = 4.0
  c.distill.dkd.beta = DKD_BETA.get((teacher, student), 8.0)
  if digits:  # the method's losses and weights on the CPU-sized stand-in (resnet20 -> resnet8 by default)
    c.teacher.recipe = {}
    c.distill.dkd.warmup_epochs = 2
    c.distill.crd.nce_k = 1024
    return _init_stage(config_lib.digits_recipe(c), method, student, 2)
  return _init_stage(config_lib.cifar_recipe(c, 'cifar100'), method, student, 30)


# helper/pretrain.py: FT's stage runs at lr 0.01 for these students, at the main lr for the others.
FT_INIT_LR_001 = ('resnet8', 'resnet14', 'resnet20', 'resnet32', 'resnet44', 'resnet56', 'resnet110', 'resnet8x4',
                  'resnet32x4', 'wrn_16_1', 'wrn_16_2', 'wrn_40_1', 'wrn_40_2')


def _init_stage(c, method: str, student: str, epochs: int):
  """AB, FT, FSP: RepDistiller's pre-training stage (init_epochs 30) before the 240 main epochs; config.epochs
  counts both, and the main schedule is counted from the stage's end (kdjax/stages.py)."""
  if method not in distill.REFERENCE_INIT:
    return c
  c.distill.init = dict(distill.REFERENCE_INIT[method], epochs=epochs,
                        lr=0.01 if method == 'ft' and student in FT_INIT_LR_001 else 0.0)
  c.epochs += epochs
  return c
