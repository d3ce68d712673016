r"""Pretrained-teacher transfer: an ImageNet-style ResNet50V2 teacher, initialised from a pretrained checkpoint and
fine-tuned on an image-folder dataset (MHIST's layout: images/ + annotations.csv), distilled into MobileNetV2
(224x224 inputs; Hinton's loss, alpha and T as fields).

The dataset and the pretrained weights are the user's: point data.folder.root at the MHIST copy and
teacher.init_checkpoint at a kdjax checkpoint of resnet50v2_imagenet (its head is replaced when the class counts
differ).

  python launch.py --config=configs/transfer.py --workdir=runs/mhist \
      --config.data.folder.root=/data/mhist --config.teacher.init_checkpoint=/ckpt/resnet50v2_imagenet
  python launch.py --config=configs/transfer.py:digits --workdir=/tmp/transfer_digits   # CPU: the mechanics

Keras' pretrained weights: the item 'keras' builds both networks in Keras' layout (padding, BatchNorm epsilon), and
teacher.init_checkpoint / student.init_checkpoint may then name Keras weight files directly (`.h5`, e.g.
`resnet50v2_weights_tf_dim_ordering_tf_kernels.h5`, or a Keras 3 `.weights.h5`; kdjax.tools.import_keras converts
them on the fly), or checkpoints written by `python -m kdjax.tools.import_keras`:

  python launch.py --config=configs/transfer.py:keras --workdir=runs/mhist_keras \
      --config.data.folder.root=/data/mhist \
      --config.teacher.init_checkpoint=/keras/resnet50v2_weights_tf_dim_ordering_tf_kernels.h5 \
      --config.student.init_checkpoint=/keras/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5

The item 'temperature' trains the student for T in {1, 2, 4, 8, 16} as five students of one program (the transfer
study's accuracy over T), e.g. `configs/transfer.py:temperature` or `configs/transfer.py:digits,temperature`.
"""

import ml_collections

from kdjax import config_lib


TEMPERATURES = '1,2,4,8,16'


def student_run() -> ml_collections.ConfigDict:
  c = config_lib.base()
  c.teacher.model, c.student.model = 'resnet50v2_imagenet', 'mobilenetv2_imagenet'
  config_lib.alpha_losses(c, 0.9)
  c.distill.temperature = 4.0
  c.data.folder.image_size = 224
  c.data.augment = 'none'
  return config_lib.cosine_recipe(c, 'folder', epochs=50, batch_size=32, lr=0.01, weight_decay=1e-4,
                                 teacher=dict(epochs=20, optimizer=dict(lr=0.001)))


def get_config(arg=None):
  items = config_lib.parse_flags(arg, ('digits', 'temperature', 'keras'), 'configs/transfer.py')
  sweep = f'distill.temperature={TEMPERATURES}' if items['temperature'] else ''
  if not items['digits']:
    c = student_run()
    c.sweep, c.sweep_labels = sweep, 'distill.temperature=T'
    if items['keras']:
      c.teacher.kwargs = c.student.kwargs = {'layout': 'keras'}
    return c
  # On CPU: 'pretrain' stands for the pretrained checkpoint; 'finetune' starts from it with a frozen backbone
  # (only a new head is trained); 'student' distills the fine-tuned teacher into a small CNN.
  pretrain = config_lib.digits_recipe(config_lib.base())
  pretrain.student.model = 'resnet8'
  finetune = config_lib.digits_recipe(config_lib.base(), epochs=4)
  finetune.student.update(model='resnet8', init_checkpoint='{workdir}/pretrain', freeze_backbone=True)
  student = config_lib.digits_recipe(config_lib.base())
  student.student.model = 'cnn2'
  student.teacher.update(model='resnet8', checkpoint='{workdir}/finetune')
  student.distill.losses = {'ce': 0.1, 'kd': 0.9}
  student.sweep, student.sweep_labels = sweep, 'distill.temperature=T'
  c = ml_collections.ConfigDict()
  c.suite_order = ('pretrain', 'finetune', 'student')
  c.suite = {'pretrain': pretrain, 'finetune': finetune, 'student': student}
  return c
