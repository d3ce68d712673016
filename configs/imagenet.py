r"""ImageNet distillation, the anchors' two pairs: ResNet34 -> ResNet18 and ResNet50 -> MobileNetV1, streamed from
disk (data.pipeline = 'stream': kdjax/data/stream.py), the teacher a frozen input imported from torchvision.

Config string 'method,teacher,student' (default kd,resnet34_imagenet,resnet18_imagenet); methods kd, dkd, dist; the
pairs resnet34_imagenet->resnet18_imagenet and resnet50_imagenet->mobilenetv1_imagenet. The item `mock` is the CI
stand-in: the same pipeline on a tiny generated JPEG ImageFolder (32x32 crops of 40x40 images, resize 36), tiny MLPs,
one epoch, the teacher trained first and cached.

Recipe (mdistiller configs/imagenet/r34_r18/{kd,dkd}.yaml and r50_mv1/{kd,dkd}.yaml over mdistiller/engine/cfg.py):
100 epochs, batch 512, SGD momentum 0.9, lr 0.2, x0.1 at epochs 30/60/90, weight decay 1e-4, evaluation batch 128.
KD: ce 0.5, kd 0.5, T 1. DKD: ce 1, alpha 1 (cfg.py default), beta 0.5 (r34_r18) / 2.0 (r50_mv1), T 1, warmup 1
epoch. DIST (image_classification_sota configs/strategies/distill/resnet_dist.yaml, lib/models/losses/kd_loss.py):
ce 1, dist 2 with beta 1, gamma 1, tau 1; that yaml trains at batch 256 (32 x 8 GPUs) and lr 0.1, here the same
lr per example at batch 512 (lr 0.2). Compute in bfloat16 (parameters and BatchNorm statistics in float32).
Training images: random-resized crop (scale 0.08-1) + flip at 224; evaluation: resize 256 + center crop 224
(torchvision's ImageNet transforms, kdjax/data/transforms.py); normalised with torchvision's ImageNet mean and std.

Data: TFDS's imagenet2012 as array_record (prepared once: `tfds build imagenet2012 --file_format=array_record
--data_dir=DIR` with the two ILSVRC2012 tars in DIR/downloads/manual), or an ImageFolder tree of JPEGs
(DIR/train/<wnid>/*.JPEG and DIR/val/<wnid>/*.JPEG, as torchvision's ImageNet folder) with
`--config.data.name=folder --config.data.dir=DIR`. `--config.data.workers=N` decoding processes per host.

Teachers (torchvision's published weights, imported once; no torch needed when training):

  pip install torch==2.13.0
  wget https://download.pytorch.org/models/resnet34-b627a593.pth \
      https://download.pytorch.org/models/resnet50-0676ba61.pth
  python -m kdjax.tools.import_torch --model resnet34_imagenet --num_classes 1000 --image_size 224 \
      --dataset imagenet2012 resnet34-b627a593.pth teachers/resnet34
  python -m kdjax.tools.import_torch --model resnet50_imagenet --num_classes 1000 --image_size 224 \
      --dataset imagenet2012 resnet50-0676ba61.pth teachers/resnet50

Runs:

  python launch.py --config=configs/imagenet.py:kd,resnet34_imagenet,resnet18_imagenet --workdir=runs/in_kd_r34_r18 \
      --config.teacher.checkpoint=teachers/resnet34 --config.data.data_dir=DIR --config.data.workers=16
  python launch.py --config=configs/imagenet.py:dkd,resnet50_imagenet,mobilenetv1_imagenet \
      --workdir=runs/in_dkd_r50_mv1 --config.teacher.checkpoint=teachers/resnet50 \
      --config.data.name=folder --config.data.dir=/data/imagenet --config.data.workers=16
  python -m kdjax.tools.jpeg_folder /tmp/jpegs && \
      python launch.py --config=configs/imagenet.py:mock --workdir=/tmp/in_mock --config.data.dir=/tmp/jpegs  # CPU
"""

from kdjax import config_lib

PAIRS = {('resnet34_imagenet', 'resnet18_imagenet'): 'r34_r18',
         ('resnet50_imagenet', 'mobilenetv1_imagenet'): 'r50_mv1'}
# mdistiller configs/imagenet/<pair>/dkd.yaml DKD.BETA
DKD_BETA = {'r34_r18': 0.5, 'r50_mv1': 2.0}
METHODS = ('kd', 'dkd', 'dist')


def get_config(arg=None):
  items = [a for a in (arg or '').split(',') if a]
  mock = 'mock' in items
  args = config_lib.parse_args(','.join(a for a in items if a != 'mock'), ('method', 'teacher', 'student'),
                               {'method': 'kd', 'teacher': 'resnet34_imagenet', 'student': 'resnet18_imagenet'})
  method, teacher, student = args['method'], args['teacher'], args['student']
  if method not in METHODS:
    raise ValueError(f'configs/imagenet.py: unknown method {method!r}; choose one of {", ".join(METHODS)}')
  pair = PAIRS.get((teacher, student))
  if pair is None and not mock:
    raise ValueError(f'configs/imagenet.py: unknown pair {teacher}->{student}; choose one of '
                     f'{", ".join(f"{t}->{s}" for t, s in PAIRS)}')
  c = config_lib.base()
  c.student.model, c.teacher.model = student, teacher
  c.data.update(name='imagenet2012', pipeline='stream', image_size=224, resize=256, workers=8)
  if method == 'kd':
    c.distill.losses, c.distill.temperature = {'ce': 0.5, 'kd': 0.5}, 1.0
  elif method == 'dkd':
    c.distill.losses = {'ce': 1.0, 'dkd': 1.0}
    c.distill.dkd.update(alpha=1.0, beta=DKD_BETA.get(pair, 0.5), temperature=1.0, warmup_epochs=1)
  else:
    c.distill.losses = {'ce': 1.0, 'dist': 2.0}
    c.distill.dist.update(beta=1.0, gamma=1.0, tau=1.0)
  c.epochs, c.batch_size, c.eval_batch_size = 100, 512, 128
  c.optimizer.update(name='sgd', lr=0.2, momentum=0.9, weight_decay=1e-4)
  c.schedule.update(name='step', decay_epochs=(30, 60, 90), decay_factor=0.1)
  c.dtype = 'bfloat16'
  if mock:  # CI: the pipeline, the teacher trained first and the method on a tiny JPEG folder, in a minute on a CPU
    c.student.model, c.student.kwargs = 'mlp', {'hidden': (16,)}
    c.teacher.model, c.teacher.kwargs = 'mlp', {'hidden': (32,)}
    c.teacher.recipe = {'epochs': 1}
    c.data.update(name='folder', image_size=32, resize=36, workers=0)
    c.epochs, c.batch_size, c.eval_batch_size = 1, 8, 8
    c.optimizer.lr = 0.05
    c.dtype = 'float32'
    c.num_devices = 1
    c.tensorboard = c.figures = False
  return c
