r"""CIFAR-100 distillation benchmark: the teacher/student pairs of the CRD, DKD and SimKD papers, every anchor method.

Config string 'method,teacher,student' (default kd,resnet32x4,resnet8x4). Methods: every registered method with a
`distill.Recipe` (kdjax's: kd, fitnet at sp vid, rkd pkt, crd, dkd, simkd, dist nkd ctkd, reviewkd ofd cat_kd, mlkd,
nst cc fsp ab ft kdsvd, wttm, sdd_kd sdd_dkd sdd_nkd, wkd_l wkd_f, mgd, crld; ab, ft, fsp with RepDistiller's
30-epoch pre-training stage first, config.distill.init, counted in config.epochs = 270), and any method registered
from outside kdjax with one: its recipe (weights, pre-training stage, per-pair settings, variants) is read from the
registry, so this file names no method. A method that cannot apply to a pair is refused in one line naming it and
the models. The item `ls` (anywhere in the string, e.g. `dkd,resnet32x4,resnet8x4,ls`) runs kd, dkd or ctkd with
logit standardization and the LS authors' settings (below; any method's `Recipe.variants` are such items). Pairs
(teacher -> student): resnet32x4->resnet8x4, wrn_40_2->wrn_16_2, wrn_40_2->wrn_40_1, vgg13->vgg8,
resnet110->resnet32, resnet56->resnet20, resnet32x4->ShuffleV1, resnet32x4->ShuffleV2, wrn_40_2->ShuffleV1,
vgg13->MobileNetV2, ResNet50->MobileNetV2 (other model pairs are accepted too; DKD then uses mdistiller's default
beta 8). The item `mlkd_recipe` sets the lr and epochs of MLKD's per-pair yaml (kdjax/methods/mlkd.py; any method's
`Recipe.training` is the item '<method>_recipe'), e.g. 'mlkd,resnet32x4,resnet8x4,mlkd_recipe' (lr 0.025).

Recipe (RepDistiller train_student.py, also mdistiller's and SimKD's CIFAR-100 recipe): 240 epochs, batch 64, SGD
momentum 0.9, lr 0.05 (0.01 for MobileNetV2/ShuffleV1/ShuffleV2 students), x0.1 at epochs 150/180/210, weight decay
5e-4. Loss weights are the references' flags: KD `-r 0.1 -a 0.9 -b 0` (T = 4); FitNet/AT/SP/RKD/PKT/VID/CRD
`-r 1 -a 0 -b <w>` with w = 100/1000/3000/1/30000/1/0.8 (RepDistiller scripts/run_cifar_distill.sh); DKD ce 1, alpha 1,
beta per pair, T 4, 20 warmup epochs (mdistiller configs/cifar100/dkd/*.yaml); SimKD `-c 0 -d 0 -b 1` (DefangChen/SimKD
README), factor 2. DIST ce 1, dist 2 (beta 1, gamma 1, tau 4; image_classification_sota dist_cifar.yaml); NKD ce 1,
nkd 1 (temperature 3, gamma 3.5; cls_KD's CIFAR-100 config); CTKD ce 0.1, ctkd 0.9 (learned global temperature 1 +
20 sigmoid(t), reversal strength cosine 0 -> 1 over 10 epochs; zhengli97/CTKD). Logit standardization (`ls`): KD ce
0.1, kd 9, T 2; DKD ce 1, alpha 9, beta 9 x the pair's beta, T 2; CTKD ce 0.1, ctkd 9
(sunshangquan/logit-standardization-KD tools/train.py and CTKD/scripts/run_cifar_distill.sh). ReviewKD ce 1,
reviewkd 5 (mdistiller reviewkd.yaml), OFD ce 1, ofd 0.001 (mdistiller cfg.py); CAT-KD ce 1 and the CAT weight, CAM
resolution and normalisation per pair (the CAT-KD repo's configs/cifar100/CAT_KD/*.yaml). WTTM ce 1, wttm 4 (gamma
0.2; zkxufo/TTM README); SD-KD ce 0.1, sdd_kd 0.9 (T 4), SD-DKD ce 1, sdd_dkd 1 and SD-NKD ce 1, sdd_nkd 1 (DKD's
options), the pooling scales per pair (SDD-CVPR2024's scripts); WKD-L ce 1, wkd_l 1 (inner weight 600, T 8) and
WKD-F ce 1, wkd_f 0.08 (JiamingLv/WKD configs/cifar100/wkd_*/res32x4_res8x4.yaml, for every pair); MGD ce 1, mgd
7e-5 (mask ratio 0.15; yzd-v/MGD's ImageNet configs); CRLD ce 1, ce_strong 1, crld 1 (within-view 2, cross-view 0.5,
T 4, confidence thresholds 0.9 and 0.2; CFG.CRLD). Each method's settings and their sources are in its file
(`Recipe` beside its `distill.register`).

The teacher is trained first with the same recipe (lr 0.05) and cached (config.teacher.checkpoint = ''), or taken
from a checkpoint: a kdjax run's workdir or a published PyTorch teacher imported with
`python -m kdjax.tools.import_torch`.

  python launch.py --config=configs/cifar100.py:crd,resnet32x4,resnet8x4 --workdir=runs/crd_resnet32x4_resnet8x4
  python launch.py --config=configs/cifar100.py:dkd,digits --workdir=/tmp/dkd_digits   # CPU, every method
  python launch.py --config=configs/cifar100.py:dkd,vgg13,MobileNetV2 --workdir=runs/dkd_vgg13_mv2 \
      --config.teacher.checkpoint=runs/teacher_vgg13

A paper's table in one program, `table,TEACHER[,digits]` (teachers resnet32x4, wrn_40_2, resnet56, vgg13): every
method above (and a `ce` row, the student alone) on each of the teacher's students, one teacher pass per step,
the methods that cannot apply to a pair left out (n/a); table.md and figures/table.png beside results.csv:

  python launch.py --config=configs/cifar100.py:table,resnet32x4 --workdir=runs/table_r32x4 --config.seeds=3 \
      --config.teacher.checkpoint=teachers/resnet32x4
  python launch.py --config=configs/cifar100.py:table,resnet32x4,digits --workdir=/tmp/table   # CPU, minutes
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


# The methods with a recipe when this file was loaded (`get_config` reads the registry when it is called, so a method
# registered later is a config too).
METHODS = tuple(distill.recipes(cifar100_only=True))


def _items() -> dict:
  """The config-string items beside method, teacher and student: 'digits', each recipe's variants ('ls') and each
  recipe's training table ('<method>_recipe') -> the methods that have it."""
  items = {'digits': ()}
  for name, recipe in distill.recipes(cifar100_only=True).items():
    for item in recipe.variants:
      items[item] = items.get(item, ()) + (name,)
    if recipe.training:
      items[f'{name}_recipe'] = (name,)
  return items


# `table,TEACHER[,digits]`: the benchmark rows of one teacher in one program (a sweep over method= and
# student.model=), the methods that cannot apply to a pair left out (n/a).
TABLE_STUDENTS = {'resnet32x4': ('resnet8x4', 'ShuffleV1', 'ShuffleV2'), 'wrn_40_2': ('wrn_16_2', 'wrn_40_1', 'ShuffleV1'),
                  'resnet56': ('resnet20',), 'vgg13': ('vgg8', 'MobileNetV2')}
TABLE_METHODS = ('ce', 'kd', 'fitnet', 'at', 'sp', 'cc', 'vid', 'rkd', 'pkt', 'ab', 'ft', 'fsp', 'nst', 'crd', 'dkd')
# The digits stand-in: resnet20 -> resnet8 and cnn_small, six methods (a staged one among them).
DIGITS_TABLE = (('resnet8', 'cnn_small'), ('ce', 'kd', 'dkd', 'crd', 'fitnet', 'ab'))


def table_config(teacher: str, digits: bool):
  """The table of `teacher`'s pairs: every method with its reference recipe, a `ce` row (the student alone);
  ShuffleNet and MobileNetV2 students at lr 0.01 (the recipe's), through `sweep_overrides`."""
  if teacher not in TABLE_STUDENTS:
    raise ValueError(f'configs/cifar100.py: no table for teacher {teacher!r}; tables: {", ".join(TABLE_STUDENTS)}')
  students, methods = DIGITS_TABLE if digits else (TABLE_STUDENTS[teacher], TABLE_METHODS)
  c = get_config(f'kd,{"resnet20" if digits else teacher},{students[0]}' + (',digits' if digits else ''))
  c.sweep = f"method={','.join(methods)}; student.model={','.join(students)}"
  c.sweep_skip_inapplicable = True
  c.sweep_overrides = '; '.join(f'student.model={s}: optimizer.lr=0.01' for s in students
                                if s in config_lib.SMALL_LR_STUDENTS)
  return c


def get_config(arg=None):
  items, known = [a for a in (arg or '').split(',') if a], _items()
  if items[:1] == ['table']:
    rest = items[1:]
    return table_config(next((a for a in rest if a != 'digits'), 'resnet32x4'), 'digits' in rest)
  flags = [a for a in items if a in known]
  args = config_lib.parse_args(','.join(a for a in items if a not in known), ('method', 'teacher', 'student'),
                               {'method': 'kd', 'teacher': 'resnet20' if 'digits' in flags else 'resnet32x4',
                                'student': 'resnet8' if 'digits' in flags else 'resnet8x4'})
  method, teacher, student = args['method'], args['teacher'], args['student']
  recipes = distill.recipes(cifar100_only=True)
  if method not in recipes:
    raise ValueError(f'configs/cifar100.py: unknown method {method!r}; choose one of {", ".join(recipes)}')
  recipe = recipes[method]
  c = config_lib.base()
  c.student.model = student
  c.teacher.model = teacher
  c.teacher.checkpoint = ''  # '' = train the teacher with this recipe first and cache it
  if 'digits' in flags:  # the CPU-sized stand-in (resnet20 -> resnet8 by default)
    c = config_lib.digits_recipe(c)
  else:
    # The teacher-to-be trains with its own learning rate, whatever the student's (configs/teacher.py's recipe).
    c.teacher.recipe = {'optimizer': {'lr': 0.01 if teacher in config_lib.SMALL_LR_STUDENTS else 0.05}}
    c = config_lib.cifar_recipe(c, 'cifar100')
  c.distill.temperature = 4.0
  teacher_epochs = c.epochs
  # The method's weights, every recipe's options for this pair (one pair's configs differ in their losses only),
  # its pre-training stage (counted in config.epochs).
  distill.method_config(c, method)
  for item in flags:
    if item in recipe.variants:
      recipe.variants[item](c)
    elif item != 'digits' and not item.endswith('_recipe'):
      raise ValueError(f'configs/cifar100.py: no {item!r} settings for {method!r}; the {item} item applies to '
                       f'{", ".join(known[item])}')
  for item in flags:  # opt-in: every method's config keeps the common recipe, so that they differ in losses only
    if item.endswith('_recipe') and item not in recipe.variants and 'digits' not in flags:
      owner = known[item][0]
      training = recipes[owner].training
      if (teacher, student) not in training:
        raise ValueError(f'configs/cifar100.py: no {owner} recipe for {teacher} -> {student}')
      distill.set_settings(c, training[(teacher, student)])
      c.teacher.recipe = {**config_lib.as_dict(c.teacher.recipe), 'epochs': teacher_epochs}  # kd's cached teacher
  return c
