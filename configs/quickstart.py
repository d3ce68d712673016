r"""Quickstart on scikit-learn's digits (offline, CPU, about a minute): a CNN teacher, then an MLP student trained
from scratch and the same MLP distilled from the teacher (Hinton KD); prints their test accuracy.

  python launch.py --config=configs/quickstart.py --workdir=/tmp/kd_quickstart
"""

import ml_collections

from kdjax import config_lib


def run_config(model: str, losses: dict, **kw) -> ml_collections.ConfigDict:
  c = config_lib.base()
  c.data.name = 'digits'
  c.student.model = model
  if model == 'mlp':
    c.student.kwargs = {'hidden': (64,)}
  c.distill.losses = losses
  c.distill.temperature = 4.0
  c.epochs = 30
  c.batch_size = 64
  c.optimizer.lr = 0.05
  c.schedule.name = 'cosine'
  c.eval_every_epochs = 10
  c.checkpoint_every_epochs = 10
  for k, v in kw.items():
    c[k] = v
  return c


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.suite_order = ('teacher', 'scratch', 'kd')
  kd = run_config('mlp', {'ce': 0.1, 'kd': 0.9})
  kd.teacher.model = 'cnn_small'
  kd.teacher.checkpoint = '{workdir}/teacher'
  c.suite = {'teacher': run_config('cnn_small', {'ce': 1.0}),
             'scratch': run_config('mlp', {'ce': 1.0}),
             'kd': kd}
  return c
