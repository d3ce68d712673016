r"""Function matching (Beyer et al., CVPR 2022, "Knowledge distillation: A good teacher is patient and consistent";
big_vision configs/proj/distill/bigsweep_flowers_pet.py): the student matches the teacher's function on the very
view it sees, made once per batch for both (config.data.mixup etc., kdjax/views.py), for a long schedule.

Recipe: loss `kd` alone (KL to the teacher at T = 1, no label term); Adam with decoupled weight decay (adamw), the
gradient clipped to global norm 1 (optimizer.clip_norm); linear warmup, then cosine to 0; mixup with one Beta(1, 1)
lambda per batch (big_vision's `mixup(p=1.0)`; kdjax pairs each example with the reversed batch, big_vision with the
batch rolled by one: the same distribution of pairs' weights); the teacher runs every step (its outputs change with
each mixed batch, so distill.cache_teacher stays off, as the run logs).

Config string 'data[,sweep]':
- folder (default): a flowers/pets-style ImageFolder (data.folder.root) kept on the device at 128 x 128 (each image
  resized to that square when read), inception crop + flip on the device before mixup (big_vision crops the
  decoded image: `inception_crop(128)|flip_lr`; and evaluates at resize 160, central crop 128, where this evaluates
  the whole 128 x 128 image), a teacher given as a checkpoint
  (teacher.checkpoint: e.g. a fine-tuned resnet50v2_imagenet; teacher.image_size when it reads another resolution),
  a resnet50v2_imagenet student from scratch; batch 512, lr 0.003, weight decay 3e-4 x the schedule (big_vision's
  flowers `fast` variant, which trains 10,000 epochs of Flowers-102's 1,020 training images).
- fashion: Fashion-MNIST on the CPU (Debian's dataset-fashion-mnist, or --config.data.dir): a cnn_small teacher
  trained here (SGD, 10 epochs) -> a small cnn_small student, 100 epochs.
- digits: the CPU-sized stand-in (sklearn digits, the CI's): the same pair, 30 epochs; a minute or two on 2 cores.
The paper's teachers are BiT ResNet-V2s (kdjax/models/bit.py): import a BiT-M `.npz` with `python -m
kdjax.tools.import_bit --model resnetv2_152x2_bit FILE.npz DIR` and set teacher.model='resnetv2_152x2_bit',
teacher.checkpoint=DIR (or a fine-tuned one); `resnetv2_50x1_bit` serves as a BiT student.
The item `sweep` trains the lr x schedule-length grid as one program: `epochs` itself changes the program (the
schedule and the number of steps) and cannot be swept, so the students share the longest run and each one's cosine
ends at its own `schedule.length_epochs`, after which its learning rate stays 0 (final_fraction 0: its parameters
stop changing, its BatchNorm statistics still follow the batches; not bit for bit a shorter run).

  python launch.py --config=configs/funmatch.py --workdir=runs/funmatch_flowers \
      --config.data.folder.root=/data/flowers102 --config.teacher.checkpoint=runs/flowers_teacher
  python launch.py --config=configs/funmatch.py:fashion --workdir=runs/funmatch_fashion
  python launch.py --config=configs/funmatch.py:digits --workdir=/tmp/funmatch_digits            # CPU
  python launch.py --config=configs/funmatch.py:digits,sweep --workdir=/tmp/funmatch_digits_sweep
"""

import ml_collections

from kdjax import config_lib

DATA = ('folder', 'fashion', 'digits')
SMALL_CNN = {'channels': (8, 16), 'hidden': (32,)}
# (epochs, batch, lr, big_vision's weight decay `wd`, warmup epochs) per dataset; the sweep's (lrs, lengths).
RECIPE = {'folder': (10_000, 512, 0.003, 3e-4, 750), 'fashion': (100, 128, 0.003, 1e-4, 2),
          'digits': (30, 64, 0.003, 1e-4, 2)}
SWEEP = {'folder': ((0.001, 0.003), (1000, 10_000)), 'fashion': ((0.001, 0.003, 0.01), (30, 100)),
         'digits': ((0.001, 0.003, 0.01), (10, 30))}
# The teachers trained here (fashion, digits): configs/teacher.py's digits recipe, SGD with a cosine schedule.
TEACHER_RECIPE = {'fashion': dict(epochs=10, batch_size=128), 'digits': dict(epochs=15, batch_size=64)}


def funmatch(c: ml_collections.ConfigDict, epochs: int, batch: int, lr: float, wd: float,
             warmup: float) -> ml_collections.ConfigDict:
  """The recipe on `c`: kd at T = 1 alone, adamw + clipping, warmup + cosine, mixup on every batch."""
  c.distill.losses = {'kd': 1.0}
  c.distill.temperature = 1.0
  c.epochs, c.batch_size = epochs, batch
  # big_vision's `wd` decays by wd x the schedule per step; optax's adamw by lr x weight_decay x the schedule.
  c.optimizer.update(name='adamw', lr=lr, weight_decay=wd / lr, clip_norm=1.0)
  c.schedule.update(name='cosine', warmup_epochs=warmup, final_fraction=0.0)
  c.data.mixup = dict(alpha=1.0, prob=1.0, mode='batch')
  c.eval_every_epochs = c.checkpoint_every_epochs = max(1, epochs // 10)
  return c


def _teacher_recipe(c, data: str):
  """The teacher's own supervised run (fashion, digits): SGD, cosine, no mixup (kdjax/teacher.py resets the views)."""
  c.teacher.recipe = dict(TEACHER_RECIPE[data], optimizer=dict(name='sgd', lr=0.05, momentum=0.9, weight_decay=5e-4,
                                                               clip_norm=0.0),
                          schedule=dict(name='cosine', warmup_epochs=0, length_epochs=0), eval_every_epochs=5,
                          checkpoint_every_epochs=5)


def get_config(arg=None):
  items = [a for a in (arg or '').split(',') if a]
  flags = config_lib.parse_flags(arg, DATA + ('sweep',), 'configs/funmatch.py')
  chosen = [d for d in DATA if flags[d]]
  if len(chosen) > 1:
    raise ValueError(f'configs/funmatch.py: choose one dataset item of {", ".join(DATA)}, got {items}')
  data = chosen[0] if chosen else 'folder'
  c = config_lib.base()
  if data == 'folder':
    c.data.name = 'folder'
    c.data.folder.image_size = 128
    c.data.pipeline = 'device'  # the views crop on the device (a streamed folder would be cropped on the host too)
    c.data.augment = 'none'
    c.data.inception_crop = dict(enabled=True, min_scale=0.08, max_scale=1.0, flip=True)
    c.teacher.model = c.student.model = 'resnet50v2_imagenet'
  else:
    c.data.name = 'fashion_mnist' if data == 'fashion' else 'digits'
    c.teacher.model = c.student.model = 'cnn_small'
    c.student.kwargs = dict(SMALL_CNN)
    _teacher_recipe(c, data)
  funmatch(c, *RECIPE[data])
  if flags['sweep']:
    lrs, lengths = SWEEP[data]
    c.epochs = max(lengths)
    c.sweep = (f'optimizer.lr={",".join(map(str, lrs))}; '
               f'schedule.length_epochs={",".join(map(str, lengths))}')
    c.sweep_labels = 'optimizer.lr=lr; schedule.length_epochs=epochs'
  return c
