"""Small configs shared by the tests: one student shape and few distinct programs, so compilations are shared."""

import ml_collections

from kdjax import config_lib


def digits_config(model='cnn_small', losses=None, epochs=3, **overrides) -> ml_collections.ConfigDict:
  c = config_lib.base()
  c.data.name = 'digits'
  c.student.model = model
  if model == 'mlp':
    c.student.kwargs = {'hidden': (32,)}
  c.distill.losses = losses or {'ce': 1.0}
  c.epochs = epochs
  c.batch_size = 64
  c.eval_batch_size = 100  # 360 test images: the last batch is padded and masked
  c.optimizer.lr = 0.05
  c.schedule.name = 'cosine'
  c.num_devices = 1
  c.tensorboard = False
  for key, value in overrides.items():
    section, _, field = key.rpartition('__')
    target = c[section] if section else c
    target[field] = value
  return c
