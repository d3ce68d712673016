r"""KD with scarce labels on real Fashion-MNIST: teachers trained on all 60,000 training images, students on a seeded
stratified 1 / 2 / 5 / 20 / 100 % of them, every method against its from-scratch twin, 3 seeds.

Config string 'fraction[,group][,digits]': fraction is the labelled share of the training set in percent, one of
1, 2, 5, 20, 100 (600, 1,200, 3,000, 12,000, 60,000 images; `data.train_examples`, stratified, seeded by
`data.val_seed`, the same subset for every seed); group is one program (default: all three, a suite):

- logit: MLP 2x1200 teacher (`mlp_teacher`, dropout) -> MLP 2x800 students (`mlp_student`): scratch (ce 1), KD
  (ce 0.1, kd 0.9, T 4), DKD (ce 1, dkd 1: alpha 1, beta BETA_DKD, T 4) and DIST (ce 1, dist 2: beta 1, gamma 1,
  tau 4), x 3 seeds = 12 students in one program. A sweep varies numbers only, so every student carries all four
  terms and the zipped sweep sets their weights: a term at weight 0 adds nothing to the loss or its gradient
  (`benchmarks/scarce_labels.py --verify_zip`: each student's losses and accuracies every epoch equal those of the
  method trained alone with only its own terms, to 1.5e-8 relative, on digits).
- ls: the same pair, KD with logit standardization (Sun et al., CVPR 2024; configs/cifar100.py's `ls`: ce 0.1, kd 9,
  T 2), 3 students. A bool field, so a program of its own.
- feature: a conv pair, cnn_small (32, 64 channels) -> a small cnn_small (8, 16 channels, one dense layer of 32):
  scratch, KD (ce 0.1, kd 0.9, T 4) and attention transfer (ce 1, at 1000, RepDistiller's weight), 3 seeds = 9
  students. Another architecture, so a program of its own. AT rather than FitNet: both networks pool to the same
  14x14 map after their second conv, so AT compares them with no extra parameters, while FitNet needs a regressor
  and a hint layer other than its default (cnn_small has 2 feature maps, fitnet.hint_layer defaults to 2).

Recipe: SGD momentum 0.9, weight decay 5e-4, cosine schedule to 0, batch 128; lr 0.01 for the MLP students (at 0.05
DIST and DKD diverged, see STUDENT_LR), 0.05 for the CNN students and both teachers; DKD's warm-up is mdistiller's
20 of 240 epochs, scaled to the run. Length: every fraction gets about the same number of optimizer steps (STEPS,
1,500: the small subsets run many epochs, 375 at 1 %, so that no method is judged undertrained there); 100 % is
bounded by it: 3 epochs of 468 steps. The teachers (MLP 2x1200 for 20 epochs, cnn_small for 5) are trained once, on
all the training images (`teacher.recipe` sets `data.train_examples=0`), and cached: every fraction and group reads
the same two teachers. No augmentation, so the students read the teacher's outputs from the per-example cache
(distill.cache_teacher = auto). The item `steps=N` changes the budget (e.g. '100,logit,steps=6000').

The item `digits` is the CPU-sized stand-in (sklearn digits, 1,437 training images: fractions of those, a few
hundred steps; about a minute on 2 cores per group).

  python launch.py --config=configs/fashion_scarce.py:2 --workdir=runs/scarce_2            # the 3 programs at 2 %
  python launch.py --config=configs/fashion_scarce.py:5,logit --workdir=runs/scarce_5_logit
  python launch.py --config=configs/fashion_scarce.py:20,logit,digits --workdir=/tmp/scarce_digits   # CPU, ~1 min
  python benchmarks/scarce_labels.py --out=runs/scarce                                     # every fraction, table

A student's test accuracy is its last epoch's (no model selection on the test set; no validation split).
"""

import ml_collections

from kdjax import config_lib

FRACTIONS = (1, 2, 5, 20, 100)  # percent of the training set
GROUPS = ('logit', 'ls', 'feature')
TRAIN_SIZE = {'fashion_mnist': 60000, 'digits': 1437}
BATCH = {'fashion_mnist': 128, 'digits': 32}
STEPS = {'fashion_mnist': 1500, 'digits': 300}  # optimizer steps per student, whatever the fraction
TEACHER_EPOCHS = {'fashion_mnist': {'mlp_teacher': 20, 'cnn_small': 5}, 'digits': {'mlp_teacher': 20, 'cnn_small': 15}}
CONV_STUDENT = {'channels': (8, 16), 'hidden': (32,)}
# The students' learning rate per pair. The MLPs (no BatchNorm) train at 0.01: at 0.05 DIST diverged within 100
# steps in every seed and DKD (beta 8) in 2 of 4 students on the 5 % subset (benchmarks/README.md); the CNNs at 0.05.
STUDENT_LR = {'mlp_student': 0.01, 'cnn_small': 0.05}
TEACHER_LR = 0.05
BETA_DKD = 8.0

# One method per student of the zipped sweep: the loss weights of (ce, kd, dkd, dist) / (ce, kd, at).
LOGIT_METHODS = {'scratch': (1.0, 0.0, 0.0, 0.0), 'kd': (0.1, 0.9, 0.0, 0.0), 'dkd': (1.0, 0.0, 1.0, 0.0),
                 'dist': (1.0, 0.0, 0.0, 2.0)}
LOGIT_TERMS = ('ce', 'kd', 'dkd', 'dist')
FEATURE_METHODS = {'scratch': (1.0, 0.0, 0.0), 'kd': (0.1, 0.9, 0.0), 'at': (1.0, 0.0, 1000.0)}
FEATURE_TERMS = ('ce', 'kd', 'at')


def examples(fraction: int, dataset: str = 'fashion_mnist') -> int:
  """The training images at `fraction` percent (0 = all of them)."""
  return 0 if fraction == 100 else TRAIN_SIZE[dataset] * fraction // 100


def batch(fraction: int, dataset: str = 'fashion_mnist') -> int:
  """BATCH, or the whole subset when it is smaller (digits at 1 %: 14 images)."""
  return min(BATCH[dataset], examples(fraction, dataset) or TRAIN_SIZE[dataset])


def epochs(fraction: int, dataset: str = 'fashion_mnist', steps: int | None = None) -> int:
  """About `steps` (default STEPS) optimizer steps whatever the fraction (at least one epoch)."""
  n = examples(fraction, dataset) or TRAIN_SIZE[dataset]
  return max(1, round((steps or STEPS[dataset]) / (n // batch(fraction, dataset))))


def zipped_sweep(methods: dict, terms: tuple) -> str:
  """`distill.losses.<term>=w1,w2,...` for every term, one value per method (zip mode)."""
  return '; '.join(f'distill.losses.{t}=' + ','.join(f'{w[i]:g}' for w in methods.values())
                   for i, t in enumerate(terms))


def method_of(values: dict, methods: dict, terms: tuple) -> str:
  """The method a student of `zipped_sweep(methods, terms)` runs, from its swept values."""
  weights = tuple(float(values[f'distill.losses.{t}']) for t in terms)
  return next(name for name, w in methods.items() if w == weights)


def run_config(fraction: int, group: str, dataset: str, steps: int = 0) -> ml_collections.ConfigDict:
  c = config_lib.base()
  c.data.name = dataset
  c.data.train_examples = examples(fraction, dataset)
  n_epochs = epochs(fraction, dataset, steps)
  c.epochs, c.batch_size = n_epochs, batch(fraction, dataset)
  c.optimizer.update(name='sgd', momentum=0.9, weight_decay=5e-4)
  c.schedule.update(name='cosine', warmup_epochs=0)
  c.eval_every_epochs = n_epochs  # the test set once, at the end: no selection on it
  c.checkpoint_every_epochs = max(1, n_epochs // 5)
  c.eval_batch_size = 1000
  c.tensorboard = False
  c.seeds = 3
  c.distill.temperature = 4.0
  c.distill.dkd.beta = BETA_DKD
  c.distill.dkd.warmup_epochs = max(1, round(n_epochs * 20 / 240))  # mdistiller's 20 of 240 epochs, scaled
  if group == 'feature':
    c.teacher.model, c.student.model, c.student.kwargs = 'cnn_small', 'cnn_small', dict(CONV_STUDENT)
    methods, terms = FEATURE_METHODS, FEATURE_TERMS
  else:
    c.teacher.model, c.student.model = 'mlp_teacher', 'mlp_student'
    methods, terms = LOGIT_METHODS, LOGIT_TERMS
  c.optimizer.lr = STUDENT_LR[c.student.model]
  t_epochs = TEACHER_EPOCHS[dataset][c.teacher.model]
  # The teacher sees every training image, whatever the students' share; its own length and evaluation.
  c.teacher.recipe = {'data': {'train_examples': 0}, 'epochs': t_epochs, 'optimizer': {'lr': TEACHER_LR},
                      'eval_every_epochs': t_epochs,
                      'checkpoint_every_epochs': max(1, t_epochs // 4)}
  if group == 'ls':
    c.distill.losses = {'ce': 0.1, 'kd': 9.0}
    c.distill.temperature = 2.0
    c.distill.logit_standardize = True
  else:
    c.distill.losses = {t: w for t, w in zip(terms, methods['scratch'])}
    c.sweep, c.sweep_mode = zipped_sweep(methods, terms), 'zip'
  return c


def get_config(arg=None):
  items = [a for a in (arg or '').split(',') if a]
  digits = 'digits' in items
  args = config_lib.parse_args(','.join(a for a in items if a != 'digits'), ('fraction', 'group'),
                               {'fraction': '5', 'group': 'all', 'steps': 0})
  if args['steps'] < 0:
    raise ValueError(f'configs/fashion_scarce.py: steps must be >= 0 (0 = {STEPS["fashion_mnist"]}), got {args["steps"]}')
  if args['fraction'] not in {str(f) for f in FRACTIONS}:
    raise ValueError(f'configs/fashion_scarce.py: fraction must be one of {", ".join(map(str, FRACTIONS))} '
                     f'(percent), got {args["fraction"]!r}')
  if args['group'] not in GROUPS + ('all',):
    raise ValueError(f'configs/fashion_scarce.py: group must be one of {", ".join(GROUPS)}, all; '
                     f'got {args["group"]!r}')
  fraction, dataset = int(args['fraction']), 'digits' if digits else 'fashion_mnist'
  if args['group'] != 'all':
    return run_config(fraction, args['group'], dataset, args['steps'])
  c = ml_collections.ConfigDict()
  c.suite_order = GROUPS
  c.suite = {g: run_config(fraction, g, dataset, args['steps']) for g in GROUPS}
  return c
