r"""DeiT distillation (Touvron et al., ICML 2021, "Training data-efficient image transformers & distillation through
attention"): a ViT student with a distillation token (kdjax/models/vit.py) taught by a convolutional teacher
through the `deit` term (kdjax/methods/deit.py), on ImageNet; and the CIFAR-100 ViT-student recipe of Locality
Guidance (Li et al., ECCV 2022, lkhl/tiny-transformers), as logit-standardization-KD's `tiny-transformers/` reuses it.

Config string items (one of each group): `tiny` (default) | `small` — the student DeiT-Ti / DeiT-S (distilled);
`cifar100` — the CIFAR-100 recipe instead of ImageNet's; `mock` | `digits` — the CPU-sized stand-ins of the two.

ImageNet (`tiny`, `small`; facebookresearch/deit main.py's defaults and README): `deit_{tiny,small}_distilled` at
224 px, drop path 0.1; 300 epochs, batch 1024, AdamW with lr 5e-4 x batch / 512 = 1e-3, weight decay 0.05, 5 warmup
epochs then cosine to min lr 1e-5 (final_fraction 0.01); label smoothing 0.1; RandAugment rand-m9-mstd0.5-inc1 (2 ops,
magnitude 9, std 0.5, each op with probability 0.5: kdjax/data/randaugment.py), mixup 0.8 and cutmix 1.0 (one of them
per batch, even odds: timm's Mixup with mode 'batch', switch prob 0.5), random erasing 0.25 — all made once per step
on the device and read by the teacher too (kdjax/views.py; DeiT's teacher also sees the mixed batch); random
resized crop + flip at 224, evaluation resize 256 + center crop 224 (the stream pipeline). Loss: ce 0.5 + deit 0.5,
hard (DeiT's `--distillation-type hard`, alpha 0.5, tau 1). The teacher is a checkpoint
(`--config.teacher.checkpoint`, imported with kdjax.tools.import_torch; `teacher.model` names it).
Reported (DeiT's README, ImageNet top-1 %): DeiT-Ti 72.2 -> DeiT-Ti with distillation 74.5; DeiT-S 79.9 -> 81.2
(`REPORTED`, kdjax/published.py `DEIT_IMAGENET`).

CIFAR-100 (`cifar100`; logit-standardization-KD tiny-transformers/configs/deit/deit-ti_c100_KD_ours.yaml): DeiT-Ti
with a distillation token (drop path 0.1), a CIFAR ResNet-56 teacher at 32 px (TEACHER_IMG_SIZE 32: the data's own
size here), 300 epochs, 20 warmup epochs then cosine to 5e-6 (final_fraction 0.01), batch 128, AdamW lr 5e-4,
weight decay 0.05; the distillation head's loss soft at T 3 (LOGIT_LOSS soft, LOGIT_TEMP 3): ce 0.5 + deit 0.5,
`deit.kind = 'soft'`, `deit.tau = 3`. The teacher is trained first with configs/cifar100.py's teacher recipe (SGD
0.05, 240 epochs) and cached, or given as `--config.teacher.checkpoint`.
Reported (that README's table, CIFAR-100 top-1 %): DeiT-Tiny from scratch 65.08 -> 78.15 with the ResNet-56 guidance
(the ECCV 2022 column: Locality Guidance's feature-map guidance, not this logit term) and 78.55 with its KD +
logit standardization (`REPORTED`, kdjax/published.py `DEIT_CIFAR100`).

What knowingly differs (README, "Where kdjax knowingly differs"): RandAugment's geometric ops sample
nearest-neighbour (timm: bilinear or bicubic); DeiT's RegNetY-16GF teacher is not a kdjax model
(any imported ImageNet classifier serves); no repeated augmentation, no model EMA; AdamW decays every parameter
(DeiT exempts biases, norms, position embeddings and tokens); on CIFAR-100 the student reads the 32 px images with
patch 4 (64 patches), where the reference upsamples them to 224 px for patch 16 (196 patches), and with CIFAR's
pad-4 crop + flip, where the reference sets TRAIN.STRONG_AUGMENTATION (its dataset code's stronger augmentation, not
reproduced); the reference's soft term is the KL summed over the classes (batch mean) with weights ce 0 / logit 1,
kdjax's `deit` soft divides by the classes as DeiT's own code does, with DeiT's 0.5 / 0.5.

  python launch.py --config=configs/deit.py:tiny --workdir=runs/deit_tiny \
      --config.teacher.model=resnet50_imagenet --config.teacher.checkpoint=teachers/resnet50 --config.data.data_dir=DIR
  python launch.py --config=configs/deit.py:cifar100 --workdir=runs/deit_tiny_c100
  python launch.py --config=configs/deit.py:cifar100,digits --workdir=/tmp/deit_digits   # CPU, a minute
  # CI: configs/deit.py:mock runs under tfds.testing.mock_data (tests/test_configs_deit.py)
"""

from kdjax import config_lib
from kdjax import published

SIZES = ('tiny', 'small')
ITEMS = SIZES + ('cifar100', 'mock', 'digits')
# Published top-1 (%): {(dataset, student): (without distillation, with it)} (kdjax/published.py).
REPORTED = {('imagenet2012', 'tiny'): published.DEIT_IMAGENET['deit_tiny'],
            ('imagenet2012', 'small'): published.DEIT_IMAGENET['deit_small'],
            ('cifar100', 'tiny'): (published.DEIT_CIFAR100['deit_tiny']['ce'],
                                   published.DEIT_CIFAR100['deit_tiny']['locality_guidance'])}


def imagenet(c, size: str):
  """DeiT's ImageNet recipe for DeiT-Ti / DeiT-S with distillation (hard)."""
  c.student.model, c.student.kwargs = f'deit_{size}_distilled', {'drop_path_rate': 0.1}
  c.teacher.model = 'resnet50_imagenet'  # DeiT's is RegNetY-16GF; give the imported teacher's model and checkpoint
  c.data.update(name='imagenet2012', pipeline='stream', image_size=224, resize=256, workers=8)
  c.data.mixup = dict(alpha=0.8, prob=1.0, mode='batch')
  c.data.cutmix = dict(alpha=1.0, prob=1.0, mode='batch')
  c.data.erasing = dict(prob=0.25)
  c.data.randaugment = dict(num_ops=2, magnitude=9.0, magnitude_std=0.5, prob=0.5)
  c.distill.label_smoothing = 0.1
  c.distill.losses = {'ce': 0.5, 'deit': 0.5}
  c.distill.deit.update(kind='hard', tau=1.0)
  c.epochs, c.batch_size, c.eval_batch_size = 300, 1024, 256
  c.optimizer.update(name='adamw', lr=5e-4 * 1024 / 512, weight_decay=0.05)
  c.schedule.update(name='cosine', warmup_epochs=5, final_fraction=1e-5 / 1e-3)
  c.dtype = 'bfloat16'
  return c


def cifar100(c):
  """The CIFAR-100 ViT student of Locality Guidance's repository (logit distillation from a ResNet-56)."""
  c.student.model, c.student.kwargs = 'deit_tiny_distilled', {'patch_size': 4, 'drop_path_rate': 0.1}
  c.teacher.model, c.teacher.checkpoint = 'resnet56', ''
  c.teacher.recipe = dict(epochs=240, batch_size=64,
                          optimizer=dict(name='sgd', lr=0.05, momentum=0.9, weight_decay=5e-4),
                          schedule=dict(name='step', decay_epochs=(150, 180, 210), decay_factor=0.1,
                                        warmup_epochs=0, final_fraction=0.0))
  c.data.name = 'cifar100'
  c.distill.losses = {'ce': 0.5, 'deit': 0.5}
  c.distill.deit.update(kind='soft', tau=3.0)
  c.epochs, c.batch_size, c.eval_batch_size = 300, 128, 200
  c.optimizer.update(name='adamw', lr=5e-4, weight_decay=0.05)
  c.schedule.update(name='cosine', warmup_epochs=20, final_fraction=5e-6 / 5e-4)
  return c


def mock(c):
  """CI: the ImageNet recipe's pipeline and views on TFDS's generated imagenet2012 (8 x 8 images, 1000 classes),
  a tiny distilled ViT and an MLP teacher trained first; seconds on a CPU."""
  c.student.model, c.student.kwargs = 'vit_test_distilled', {'drop_path_rate': 0.1}
  c.teacher.model, c.teacher.kwargs, c.teacher.checkpoint = 'mlp', {'hidden': (16,)}, ''
  c.teacher.recipe = {'epochs': 1, 'schedule': {'warmup_epochs': 0}}
  c.data.update(image_size=8, resize=10, workers=0)
  c.epochs, c.batch_size, c.eval_batch_size = 2, 8, 8
  c.schedule.warmup_epochs = 1
  c.dtype = 'float32'
  c.num_devices = 1
  c.tensorboard = c.figures = False
  return c


def digits(c):
  """CPU: the CIFAR-100 recipe's losses and optimizer on sklearn digits (8 x 8), a tiny distilled ViT (patch 4)
  from a cnn_small teacher trained first."""
  c.student.model, c.student.kwargs = 'vit_test_distilled', {'drop_path_rate': 0.1}
  c.teacher.model = 'cnn_small'
  c.teacher.recipe = dict(epochs=15, batch_size=64, optimizer=dict(name='sgd', lr=0.05, momentum=0.9,
                                                                   weight_decay=5e-4),
                          schedule=dict(name='cosine', warmup_epochs=0, final_fraction=0.0))
  c.data.name = 'digits'
  c.epochs, c.batch_size, c.eval_batch_size = 20, 64, 500
  c.optimizer.lr = 2e-3
  c.schedule.warmup_epochs = 2
  c.eval_every_epochs = c.checkpoint_every_epochs = 10
  c.tensorboard = c.figures = False
  return c


def get_config(arg=None):
  flags = config_lib.parse_flags(arg, ITEMS, 'configs/deit.py')
  sizes = [s for s in SIZES if flags[s]]
  if len(sizes) > 1:
    raise ValueError(f'configs/deit.py: choose one student size of {", ".join(SIZES)}, got {arg!r}')
  if flags['cifar100'] and (sizes or flags['mock']):
    raise ValueError(f'configs/deit.py: the cifar100 recipe has one student (DeiT-Ti) and its CPU stand-in is '
                     f'digits, got {arg!r}')
  if flags['digits'] and not flags['cifar100']:
    raise ValueError("configs/deit.py: digits is the cifar100 recipe's stand-in (cifar100,digits); the ImageNet "
                     "recipe's is mock")
  c = config_lib.base()
  if flags['cifar100']:
    c = cifar100(c)
    return digits(c) if flags['digits'] else c
  c = imagenet(c, sizes[0] if sizes else 'tiny')
  return mock(c) if flags['mock'] else c
