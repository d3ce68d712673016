r"""CIFAR-100 distillation benchmark: the teacher/student pairs of the CRD, DKD and SimKD papers, every anchor method.

Config string 'method,teacher,student' (default kd,resnet32x4,resnet8x4). Methods: every key of
`kdjax.distill.REFERENCE_WEIGHTS` (kd fitnet at sp rkd pkt vid crd dkd simkd, dist nkd ctkd, reviewkd ofd cat_kd,
mlkd, nst cc ab ft fsp kdsvd; ab, ft, fsp with RepDistiller's 30-epoch pre-training stage first, config.distill.init,
counted in config.epochs = 270). A method that cannot apply to a pair is refused in one line naming it and the
models. The item `ls` (anywhere in the string, e.g. `dkd,resnet32x4,resnet8x4,ls`) runs kd, dkd or ctkd with logit
standardization and the LS authors' settings (below). Pairs (teacher -> student): resnet32x4->resnet8x4,
wrn_40_2->wrn_16_2, wrn_40_2->wrn_40_1, vgg13->vgg8, resnet110->resnet32, resnet56->resnet20,
resnet32x4->ShuffleV1, resnet32x4->ShuffleV2, wrn_40_2->ShuffleV1, vgg13->MobileNetV2, ResNet50->MobileNetV2 (other
model pairs are accepted too; DKD then uses mdistiller's default beta 8).
The item `mlkd_recipe` sets the lr and epochs of MLKD's per-pair yaml (MLKD_RECIPE), e.g.
'mlkd,resnet32x4,resnet8x4,mlkd_recipe' (lr 0.025).

Recipe (RepDistiller train_student.py, also mdistiller's and SimKD's CIFAR-100 recipe): 240 epochs, batch 64, SGD
momentum 0.9, lr 0.05 (0.01 for MobileNetV2/ShuffleV1/ShuffleV2 students), x0.1 at epochs 150/180/210, weight decay
5e-4. Loss weights are the references' flags: KD `-r 0.1 -a 0.9 -b 0` (T = 4); FitNet/AT/SP/RKD/PKT/VID/CRD
`-r 1 -a 0 -b <w>` with w = 100/1000/3000/1/30000/1/0.8 (RepDistiller scripts/run_cifar_distill.sh); DKD ce 1,
alpha 1, beta per pair, T 4, 20 warmup epochs (mdistiller configs/cifar100/dkd/*.yaml); SimKD `-c 0 -d 0 -b 1`
(DefangChen/SimKD README), factor 2. DIST ce 1, dist 2 (beta 1, gamma 1, tau 4; image_classification_sota
dist_cifar.yaml); NKD ce 1, nkd 1 (temperature 3, gamma 3.5; cls_KD's CIFAR-100 config); CTKD ce 0.1, ctkd 0.9
(learned global temperature 1 + 20 sigmoid(t), reversal strength cosine 0 -> 1 over 10 epochs; zhengli97/CTKD).
Logit standardization (`ls`): KD ce 0.1, kd 9, T 2; DKD ce 1, alpha 9, beta 9 x the pair's beta, T 2; CTKD ce 0.1,
ctkd 9 (sunshangquan/logit-standardization-KD tools/train.py and CTKD/scripts/run_cifar_distill.sh).
ReviewKD ce 1, reviewkd 5 (mdistiller reviewkd.yaml), OFD ce 1, ofd 0.001 (mdistiller cfg.py); CAT-KD ce 1 and the
CAT weight, CAM resolution and normalisation per pair (`CAT_KD`, the CAT-KD repo's configs/cifar100/CAT_KD/*.yaml).

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

# Logit standardization (Sun et al., CVPR 2024), the config-string item `ls`: sunshangquan/logit-standardization-KD
# tools/train.py with `--logit-stand --base-temp 2 --kd-weight 9` (its README's CIFAR-100 commands) sets, for KD, the
# KD weight 9 and T 2 (CE keeps mdistiller/engine/cfg.py's KD.LOSS.CE_WEIGHT 0.1); for DKD, alpha and beta x 9 and
# T 2 (CE 1, warmup 20). CTKD+LS is that repo's CTKD/scripts/run_cifar_distill.sh: -r 0.1 -a 9, t_start 1, t_end 20.
LS_METHODS = ('kd', 'dkd', 'ctkd')
LS_KD_WEIGHT = 9.0
LS_BASE_TEMPERATURE = 2.0


def logit_standardized(c, method):
  """Turns a `method` config of this file into its logit-standardized variant with the LS authors' settings."""
  if method not in LS_METHODS:
    raise ValueError(f'configs/cifar100.py: no logit-standardization settings for {method!r}; '
                     f'the ls item applies to {", ".join(LS_METHODS)}')
  c.distill.logit_standardize = True
  if method == 'kd':
    c.distill.losses = {'ce': 0.1, 'kd': LS_KD_WEIGHT}
    c.distill.temperature = LS_BASE_TEMPERATURE
  elif method == 'dkd':
    c.distill.dkd.alpha = c.distill.dkd.alpha * LS_KD_WEIGHT
    c.distill.dkd.beta = c.distill.dkd.beta * LS_KD_WEIGHT
    c.distill.dkd.temperature = LS_BASE_TEMPERATURE
  elif method == 'ctkd':
    c.distill.losses = {'ce': 0.1, 'ctkd': LS_KD_WEIGHT}
  return c


# GzyAftermath/CAT-KD configs/cifar100/CAT_KD/*.yaml: (CAT_loss_weight, CAM_RESOLUTION, IF_NORMALIZE) per pair.
CAT_KD = {
    ('resnet32x4', 'resnet8x4'): (15.0, 2, False),
    ('wrn_40_2', 'wrn_16_2'): (12.0, 2, False),
    ('wrn_40_2', 'wrn_40_1'): (1.5, 2, False),
    ('vgg13', 'vgg8'): (4.5, 2, False),
    ('resnet110', 'resnet32'): (1.8, 2, False),
    ('resnet56', 'resnet20'): (0.7, 2, False),
    ('resnet32x4', 'ShuffleV1'): (600.0, 4, True),
    ('resnet32x4', 'ShuffleV2'): (600.0, 4, True),
    ('wrn_40_2', 'ShuffleV1'): (80.0, 4, True),
    ('vgg13', 'MobileNetV2'): (15.0, 2, True),
    ('ResNet50', 'MobileNetV2'): (40.0, 2, True),
}


# Multi-Level-Logit-Distillation configs/cifar100/ours/*.yaml: (lr, epochs) per pair; the lr decays x0.1 at 150, 180
# and 210 in every file, the 480-epoch ones included.
MLKD_RECIPE = {
    ('resnet32x4', 'resnet8x4'): (0.025, 240),
    ('wrn_40_2', 'wrn_16_2'): (0.025, 240),
    ('wrn_40_2', 'wrn_40_1'): (0.025, 240),
    ('vgg13', 'vgg8'): (0.025, 240),
    ('resnet110', 'resnet32'): (0.025, 240),
    ('resnet56', 'resnet20'): (0.025, 240),
    ('resnet32x4', 'ShuffleV1'): (0.01, 480),
    ('resnet32x4', 'ShuffleV2'): (0.01, 480),
    ('wrn_40_2', 'ShuffleV1'): (0.0025, 480),
    ('vgg13', 'MobileNetV2'): (0.0025, 480),
    ('ResNet50', 'MobileNetV2'): (0.0025, 480),
}


def get_config(arg=None):
  items = [a for a in (arg or '').split(',') if a]
  digits, ls, mlkd_recipe = 'digits' in items, 'ls' in items, 'mlkd_recipe' in items
  arg = ','.join(a for a in items if a not in ('digits', 'ls', 'mlkd_recipe'))
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
  if ls:
    logit_standardized(c, method)
  cat_weight, c.distill.cat_kd.cam_resolution, c.distill.cat_kd.normalize = CAT_KD.get((teacher, student),
                                                                                       (15.0, 2, False))
  if method == 'cat_kd':
    c.distill.losses['cat_kd'] = cat_weight
  if digits:  # the method's losses and weights on the CPU-sized stand-in (resnet20 -> resnet8 by default)
    c.teacher.recipe = {}
    c.distill.dkd.warmup_epochs = 2
    c.distill.crd.nce_k = 1024
    return _init_stage(config_lib.digits_recipe(c), method, student, 2)
  c = _init_stage(config_lib.cifar_recipe(c, 'cifar100'), method, student, 30)
  if mlkd_recipe:  # opt-in: every method's config keeps the common recipe, so that they differ in losses only
    if (teacher, student) not in MLKD_RECIPE:
      raise ValueError(f'configs/cifar100.py: no MLKD recipe for {teacher} -> {student}')
    c.optimizer.lr, c.epochs = MLKD_RECIPE[(teacher, student)]
    c.teacher.recipe = {**config_lib.as_dict(c.teacher.recipe), 'epochs': 240}  # the same cached teacher as kd's
  return c


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
  # The teacher keeps the common length (the same cached teacher as the other methods').
  c.teacher.recipe = {**config_lib.as_dict(c.teacher.recipe), 'epochs': c.epochs}
  c.epochs += epochs
  return c
