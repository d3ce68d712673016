r"""Throughput of one Hinton-KD train step, kdjax against a PyTorch eager baseline, in one run on one machine.

Same networks (RepDistiller's CIFAR resnet20 teacher in eval mode, resnet8 student), same batch (64 CIFAR-shaped
images), same loss (0.1 CE + 0.9 KD at T = 4) and optimizer (SGD momentum 0.9, wd 5e-4). The PyTorch side is the
reference codebases' loop body: teacher forward under no_grad, student forward, loss, backward, step. kdjax is
timed as it trains: the jitted dispatch of K steps (batch gathering and augmentation included), for K = 1 and 8.

  python benchmarks/kd_step.py --steps=50
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kdjax.platform  # noqa: E402,F401  (before jax)

import time  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from kdjax import config_lib  # noqa: E402
from kdjax import data as data_lib  # noqa: E402
from kdjax import models  # noqa: E402
from kdjax import sharding  # noqa: E402
from kdjax import train  # noqa: E402

flags.DEFINE_integer('steps', 50, 'Timed steps per contender (after warm-up).')
flags.DEFINE_integer('batch', 64, 'Batch size.')
FLAGS = flags.FLAGS


def synthetic_cifar(n=2048, classes=100):
  rng = np.random.default_rng(0)
  split = lambda: data_lib.Split(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                                 rng.integers(0, classes, n).astype(np.int32))
  return data_lib.Dataset('cifar100', classes, split(), split(), None, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                          'crop_flip')


def time_kdjax(k: int) -> float:
  c = config_lib.base()
  c.student.model, c.teacher.model = 'resnet8', 'resnet20'
  c.distill.losses = {'ce': 0.1, 'kd': 0.9}
  c.batch_size, c.steps_per_dispatch, c.num_devices, c.epochs = FLAGS.batch, k, 1, 1
  ds = synthetic_cifar()
  teacher = models.create('resnet20', 100)
  teacher_vars = jax.jit(teacher.init)(jax.random.key(1), np.zeros((1, 32, 32, 3), np.float32))
  exp = train.Experiment(c, ds, sharding.make_mesh(1), teacher, teacher_vars)
  ts = exp.init_state()
  ts, m = exp.train_chunk(ts, 0, 0)  # compile
  jax.block_until_ready(m)
  dispatches = max(1, FLAGS.steps // k)
  t0 = time.perf_counter()
  for i in range(dispatches):
    ts, m = exp.train_chunk(ts, 0, (i * k) % (exp.steps_per_epoch - k + 1))
  jax.block_until_ready(m)
  return dispatches * k * FLAGS.batch / (time.perf_counter() - t0)


def time_torch() -> float:
  import torch
  from torch.nn import functional as F
  from kdjax.tools.torch_reference import CifarResNet

  torch.manual_seed(0)
  teacher = CifarResNet(20, (16, 16, 32, 64), 100).eval()
  student = CifarResNet(8, (16, 16, 32, 64), 100).train()
  opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
  x = torch.randn(FLAGS.batch, 3, 32, 32)
  y = torch.randint(0, 100, (FLAGS.batch,))

  def step():
    with torch.no_grad():
      t_logits = teacher(x)
    s_logits = student(x)
    kd = F.kl_div(F.log_softmax(s_logits / 4, -1), F.softmax(t_logits / 4, -1), reduction='batchmean') * 16
    loss = 0.1 * F.cross_entropy(s_logits, y) + 0.9 * kd
    opt.zero_grad()
    loss.backward()
    opt.step()

  for _ in range(3):
    step()
  t0 = time.perf_counter()
  for _ in range(FLAGS.steps):
    step()
  return FLAGS.steps * FLAGS.batch / (time.perf_counter() - t0)


def main(argv):
  del argv
  print(f'Hinton KD step, resnet20 -> resnet8, batch {FLAGS.batch}, 32x32x3; backend {jax.default_backend()} '
        f'({jax.devices()[0].device_kind}), {os.cpu_count()} CPU cores')
  results = {}
  try:
    results['PyTorch eager (baseline)'] = time_torch()
  except ImportError:
    print('PyTorch is not installed: no baseline (pip install torch==2.13.0)')
  for k in (1, 8):
    results[f'kdjax, {k} step(s) per dispatch'] = time_kdjax(k)
  base = results.get('PyTorch eager (baseline)')
  print('| contender | img/s | vs baseline |\n|---|---|---|')
  for name, ips in results.items():
    print(f'| {name} | {ips:,.0f} | {ips / base:.2f}x |' if base else f'| {name} | {ips:,.0f} | — |')


if __name__ == '__main__':
  app.run(main)
