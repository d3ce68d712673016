"""The run config's schema and defaults; each file in configs/ starts from `base()` and overrides what it needs.

Every field a run reads exists here, so a locked config rejects a misspelt override by name, and the code reads each
as an attribute (no second copy of its default). The methods' sections come from the registry (`distill.Options`).
"""

from __future__ import annotations

import copy

import ml_collections

from kdjax import distill
from kdjax import stages


def _distill() -> dict:
  """`config.distill`: the loss terms, the options every term shares and each registered method's section."""
  return dict(
      losses={'ce': 1.0},   # term -> weight; total loss = sum(weight * term)
      temperature=4.0,      # Hinton KD (and the KD-style terms that use a temperature)
      # Logit standardization (Sun et al., CVPR 2024) of student and teacher logits in every logit-based term.
      logit_standardize=False,
      kd_scale='T2',        # the kd term's factor: T2 (x T^2, Hinton and the anchors) | 1 (no T^2, as some studies)
      # Teacher outputs computed once for the whole training set and reused every epoch: auto (when the training
      # images are not augmented and the outputs fit in 2 GiB) | on | off.
      cache_teacher='auto',
      # The teacher replay store (kdjax/replay.py): a folder of the teacher's top-k logits on every augmented batch,
      # made by `python -m kdjax.tools.teacher_logits`; a run replays them instead of running the teacher ('' = off).
      teacher_store='',
      store_topk=0,         # the logits kept per example in a store made for this config (0 = every class)
      # on: the store's rows sent to the device per dispatch from the memory-mapped files (for stores larger than a
      # device: ImageNet's epochs); off: the whole store placed on the device once; auto: on when the run's rows
      # exceed data.device_budget_gb (0: a quarter of a device's memory)
      store_stream='auto',
      label_smoothing=0.0,  # for 'ce'
      # Omitted-class runs also report accuracy with this added to the omitted class's logit (Hinton et al. 2015
      # raised that bias by 3.5 on MNIST); 0 reports only the plain accuracy.
      omitted=dict(bias=3.5),
      # Several teachers: the logit terms read the mean of all the teachers' logits (ensemble), and a term may read
      # its own teacher, {term: index} (0 = config.teacher, i = config.teachers[i - 1]).
      ensemble=False,
      teacher_for={},
      # The methods' extra modules (FitNet's regressor, CRD's embedding heads, ...) of a fresh run start from this
      # checkpoint: a run's workdir (its student 0) or `kdjax.tools.import_torch --extras`'s output; '' = initialised.
      extras_checkpoint='',
      # The pre-training stage of two-stage methods (AB, FT, FSP), counted in config.epochs: see kdjax/stages.py.
      init=copy.deepcopy(stages.DEFAULTS),
      # Each registered method's options section, `config.distill.<section>` (its `distill.Options`: kdjax/methods/
      # and any method registered before this call); a method reads only its own section.
      **distill.sections(),
  )


def _data() -> ml_collections.ConfigDict:
  """`config.data`: the dataset, its splits and subsets, augmentation and the input pipeline."""
  return ml_collections.ConfigDict(dict(
      name='digits',        # digits | mnist | fashion_mnist | kmnist | cifar10 | cifar100 | folder
      seed=-1,              # batch order and augmentation; -1 = config.seed (a sweep shares its base seed's)
      # torchvision's files (CIFAR pickles, MNIST-family IDX) or a folder of images, read by what it holds
      # (kdjax.data.files); '' = TFDS (fashion_mnist: Debian's /usr/share/datasets/fashion-mnist first).
      dir='',
      data_dir='',          # TFDS data_dir ('' = TFDS default, ~/tensorflow_datasets)
      cache_dir='',         # decoded arrays of data.dir's files ('' = ~/.cache/kdjax/data)
      label_set='fine',     # cifar100: fine (100 classes) | coarse (20 superclasses)
      val_fraction=0.0,     # validation split carved from train (0 for paper recipes)
      val_seed=0,
      train_examples=0,     # > 0: a seeded stratified subset of train of this size (0 = all); likewise test
      test_examples=0,
      augment='auto',       # auto (crop_flip for CIFAR, none otherwise) | crop_flip | none
      omit_class=-1,        # >= 0: the student's transfer set leaves this class out (omitted-class experiment)
      folder=dict(root='', image_size=0, test_fraction=0.2, seed=0, label_column='', file_column=''),
      # The input pipeline (kdjax/data/stream.py): device (the uint8 training set on the devices, batches gathered
      # and augmented in the step) | stream (read, decoded and augmented on the host by Grain workers: imagenet2012,
      # ImageFolder trees) | auto (stream for imagenet2012 and for a folder larger than the device budget).
      pipeline='auto',
      device_budget_gb=0.0, # auto: the most decoded training data kept on a device (0 = a quarter of its memory)
      workers=0,            # stream: Grain worker processes decoding and augmenting (0 = in this process)
      prefetch=2,           # stream: host batches read ahead of the step
      image_size=224,       # stream: the training crop and the evaluation center crop (pixels)
      resize=256,           # stream: evaluation resizes the shorter side to this before the center crop
      on_corrupt='stop',    # stream: a corrupt image stops the run naming it | skip (left out, counted per epoch)
      # Consistent views (kdjax/views.py): made once in the train step, on the device, read by the teacher and
      # every student alike. alpha 0 = off; prob: the chance an example (mode 'example') or the whole batch
      # ('batch') is mixed; with mixup and cutmix both on, each example (batch) takes one of them.
      mixup=dict(alpha=0.0, prob=1.0, mode='example'),
      cutmix=dict(alpha=0.0, prob=1.0, mode='example'),
      erasing=dict(prob=0.0),  # random erasing of a box (to the mean pixel), per example with this probability
      # RandomResizedCrop back to the data's size (+ a random horizontal flip with `flip`)
      inception_crop=dict(enabled=False, min_scale=0.08, max_scale=1.0, flip=True),
      # timm's RandAugment after the crop (kdjax/data/randaugment.py; DeiT's rand-m9-mstd0.5-inc1 is num_ops 2,
      # magnitude 9, magnitude_std 0.5, prob 0.5): num_ops 0 = off; magnitude_std > 100 = uniform in [0, magnitude]
      randaugment=dict(num_ops=0, magnitude=9.0, magnitude_std=0.5, prob=0.5),
  ))


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                # initialisation and dropout (and, unless data.seed is set, the data order)
  # Sweeps (kdjax.sweep): numeric fields -> values, trained as students of one program against one teacher pass.
  c.sweep = ''              # 'field=v1,v2,...; field2=...', e.g. 'alpha=0.1,0.9; distill.temperature=1,4'
  c.sweep_mode = 'grid'     # grid (every combination) | zip (element-wise)
  c.sweep_labels = ''       # 'field=display name; ...' for tables and figures
  # Per program point of a table ('method=' / 'student.model=' axes): 'AXIS=VALUE: field=literal, ...; ...', e.g.
  # 'student.model=ShuffleV1: optimizer.lr=0.01; method=crd: distill.crd.feat_dim=64'
  c.sweep_overrides = ''
  c.sweep_skip_inapplicable = False  # a method that cannot apply to a pair: left out (True) or refused (False)
  c.seeds = 1               # N > 1: every grid point trained with seeds seed, seed + 1, ..., seed + N - 1
  c.mesh_students = 0       # devices along the students axis of the (students x data) mesh; 0 = auto
  c.students_loop = 'auto'  # how the step runs the students: vmap | unroll | auto (unroll on the CPU, else vmap)
  # The memory per device a program may plan for, in GiB (0 = the device's; on the CPU, the host's available
  # memory shared by its CPU devices): a table that does not fit is split into programs that do (kdjax/table_split.py).
  c.memory_budget_gb = 0.0
  c.steps_loop = 'auto'     # a dispatch's K steps: scan (rolled) | unroll | auto (unroll on the CPU, else scan)
  c.data = _data()
  # The network being trained: the student, or the teacher-to-be in a supervised run.
  c.student = dict(model='cnn_small', kwargs={}, subclasses=1,
                   init_checkpoint='',     # start from this run's/imported checkpoint (fine-tuning)
                   freeze_backbone=False)  # train only the head (BatchNorm statistics still adapt)
  c.teacher = dict(
      model='',             # '' = no teacher
      kwargs={},
      checkpoint='',        # a teacher run's workdir (or an imported checkpoint); '' = train it first and cache
      which='latest',       # latest | best
      index=0,              # which student, when the checkpoint is a sweep's workdir
      accept_incomplete=False,  # use an explicit checkpoint of an unfinished run (refused by default)
      cache_dir='',         # where auto-trained teachers are cached ('' = ~/.cache/kdjax/teachers)
      seed=0,
      subclasses=1,         # > 1: the teacher has num_classes * subclasses logits (subclass distillation)
      init_checkpoint='',   # fine-tune the teacher from this checkpoint when it is trained here
      recipe={},            # overrides of this config for training the teacher (epochs, optimizer, ...)
      losses={},            # the teacher's loss terms ({} = {'ce': 1.0})
      # > 0: the teachers read each batch resized on the device to image_size x image_size (a teacher trained at
      # another resolution than the students' data); 0 = the data's own size.
      image_size=0,
  )
  # More teachers (teacher 1, 2, ...; `config.teacher` is teacher 0): each a dict of teacher-section fields, e.g.
  # [dict(model='resnet56', checkpoint='runs/r56')], loaded (or trained first and cached) like `config.teacher`.
  c.teachers = []
  c.distill = _distill()
  # name: sgd | adam | adamw | dot (DOT: task momentum momentum - dot_delta, distillation momentum + dot_delta)
  # clip_norm > 0: the gradient clipped to this global norm before the update (0 = off).
  c.optimizer = dict(name='sgd', lr=0.05, momentum=0.9, nesterov=False, weight_decay=5e-4, dot_delta=0.075,
                     clip_norm=0.0)
  # length_epochs (cosine): the epoch at which the cosine reaches final_fraction and stays there (0 = the run's
  # end); unlike `epochs` a sweep may vary it (schedule lengths of one program's students).
  c.schedule = dict(name='step', decay_epochs=(150, 180, 210), decay_factor=0.1, warmup_epochs=0,
                    final_fraction=0.0, length_epochs=0)
  c.epochs = 240
  c.batch_size = 64
  c.eval_batch_size = 500
  c.steps_per_dispatch = 0  # K steps per dispatch; 0 = auto (kdjax.trainer.Trainer._auto_steps_per_dispatch)
  c.eval_every_epochs = 1
  c.checkpoint_every_epochs = 1
  c.keep_checkpoints = 2
  c.dtype = 'float32'       # compute dtype: float32 | bfloat16 (parameters stay float32)
  c.num_devices = 0         # 0 = all devices
  c.tensorboard = True
  c.figures = True          # results figures (PNG) in workdir/figures at the end of a run
  # JAX's persistent compilation cache (kdjax.compile_cache): a directory | 'off'; '' = $KDJAX_COMPILATION_CACHE,
  # else ~/.cache/kdjax/jax. A rerun, resume or relaunched sweep then loads its compiled programs.
  c.compilation_cache = ''
  return c


SMALL_LR_STUDENTS = ('MobileNetV2', 'mobile_half', 'MobileNetV2_1_0', 'ShuffleV1', 'ShuffleV2')


def cifar_recipe(c: ml_collections.ConfigDict, dataset: str = 'cifar100') -> ml_collections.ConfigDict:
  """RepDistiller's / SimKD's CIFAR recipe: 240 epochs, batch 64, SGD momentum 0.9, wd 5e-4, lr 0.05 (0.01 for
  MobileNetV2/ShuffleNet students), x0.1 at epochs 150, 180, 210."""
  c.data.name = dataset
  c.epochs, c.batch_size = 240, 64
  c.optimizer.update(name='sgd', lr=0.01 if c.student.model in SMALL_LR_STUDENTS else 0.05, momentum=0.9,
                     weight_decay=5e-4)
  c.schedule.update(name='step', decay_epochs=(150, 180, 210), decay_factor=0.1)
  return c


def cosine_recipe(c: ml_collections.ConfigDict, dataset: str, epochs: int, batch_size: int, lr: float,
                  weight_decay: float = 5e-4, teacher: dict | None = None) -> ml_collections.ConfigDict:
  """SGD with a cosine schedule, the seed projects' recipe; `teacher` overrides it for the teacher's own run."""
  c.data.name = dataset
  c.epochs, c.batch_size = epochs, batch_size
  c.optimizer.update(lr=lr, weight_decay=weight_decay)
  c.schedule.name = 'cosine'
  c.teacher.recipe = {'epochs': epochs, **(teacher or {})}
  return c


def digits_recipe(c: ml_collections.ConfigDict, epochs: int = 10) -> ml_collections.ConfigDict:
  """The CPU-sized stand-in of an experiment: sklearn digits, a short cosine schedule; the teacher recipe too."""
  c.data.name = 'digits'
  c.epochs, c.batch_size = epochs, 64
  c.optimizer.update(lr=0.05, weight_decay=5e-4)
  c.schedule.update(name='cosine', warmup_epochs=0)
  c.eval_every_epochs = c.checkpoint_every_epochs = max(1, epochs // 2)
  if c.teacher.model:
    c.teacher.recipe = dict(epochs=15)
  return c


def alpha_losses(c: ml_collections.ConfigDict, alpha: float, extra: str = 'kd'):
  """Hinton's mix as two weights tied to one field: losses = {'ce': 1 - alpha, extra: alpha}; overriding
  `--config.alpha=0.5` moves both."""
  c.alpha = ml_collections.FieldReference(float(alpha))
  c.distill.losses = {'ce': 1.0 - c.get_ref('alpha'), extra: c.get_ref('alpha')}
  return c


def label_alpha_losses(c: ml_collections.ConfigDict, label_alpha: float):
  """The opposite tie, for studies whose alpha weights the label loss: losses = {'ce': label_alpha,
  'kd': 1 - label_alpha} through the field `label_alpha`."""
  c.label_alpha = ml_collections.FieldReference(float(label_alpha))
  c.distill.losses = {'ce': c.get_ref('label_alpha'), 'kd': 1.0 - c.get_ref('label_alpha')}
  return c


def parse_flags(arg: str | None, known: tuple[str, ...], where: str) -> dict:
  """A config string of on/off items ('grid,digits') -> {item: bool}; an unknown item is refused by name (a typo
  must not silently select the full recipe)."""
  items = [a for a in (arg or '').split(',') if a]
  unknown = [a for a in items if a not in known]
  if unknown:
    raise ValueError(f'{where}: unknown config string item {unknown[0]!r}; known: {", ".join(known)}')
  return {k: k in items for k in known}


def as_dict(d) -> dict:
  """A ConfigDict (or None, or a dict) as a plain dict."""
  return d.to_dict() if hasattr(d, 'to_dict') else dict(d or {})


def parse_args(arg: str | None, names: tuple[str, ...], defaults: dict) -> dict:
  """big_vision-style config string 'a,b,key=value' -> dict: positional items fill `names` in order."""
  out = dict(defaults)
  if not arg:
    return out
  positional = [a for a in arg.split(',') if a and '=' not in a]
  if len(positional) > len(names):
    raise ValueError(f'config string {arg!r}: expected at most {len(names)} positional items ({", ".join(names)})')
  out.update(zip(names, positional))
  for item in arg.split(','):
    if '=' in item:
      k, v = item.split('=', 1)
      if k not in out:
        raise ValueError(f'config string {arg!r}: unknown key {k!r}; known: {", ".join(out)}')
      out[k] = type(defaults[k])(v) if defaults.get(k) is not None and not isinstance(defaults[k], str) else v
  return out
