"""Choose the JAX platform and the XLA:CPU settings before JAX initialises.

`jax[cuda12]` installs a CUDA plugin that prints a traceback when it finds no GPU before falling back to CPU.
On a machine with no NVIDIA device nodes (and no TPU) we ask for the CPU outright, which keeps that path quiet.

XLA:CPU hands convolutions to YNNPACK by default; on the x86 CPUs measured here (AVX2) its convolutions ran the
CIFAR ResNets' training step at half the speed of XLA's own (Eigen) convolutions, while YNNPACK's dot and
elementwise fusions helped the MLPs (benchmarks/README.md, "The CPU gap"). So kdjax removes the convolution fusion
type from YNNPACK's list unless XLA_FLAGS already sets that list. `KDJAX_CPU_CONV=ynn` keeps XLA's default.
The change is in the convolutions' summation order only: float32 round-off, no change of method.

Import this module before anything initialises a JAX backend.
"""

import glob
import os

YNN_FLAG = '--xla_cpu_experimental_ynn_fusion_type'
CPU_CONV_SETTING = '-individual_convolution'  # YNNPACK keeps its dot, elementwise and reduce fusions


def cpu_flags() -> None:
  """Adds kdjax's XLA:CPU setting to XLA_FLAGS, unless the user set that flag or asked for XLA's default."""
  flags = os.environ.get('XLA_FLAGS', '')
  if YNN_FLAG in flags or os.environ.get('KDJAX_CPU_CONV', '').strip().lower() == 'ynn':
    return
  os.environ['XLA_FLAGS'] = f'{flags} {YNN_FLAG}={CPU_CONV_SETTING}'.strip()


def select() -> None:
  cpu_flags()
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  if os.environ.get('JAX_PLATFORMS'):
    return  # the user chose
  has_gpu = bool(glob.glob('/dev/nvidia[0-9]*'))
  has_tpu = bool(glob.glob('/dev/accel[0-9]*') or glob.glob('/dev/vfio/[0-9]*'))
  if not (has_gpu or has_tpu):
    os.environ['JAX_PLATFORMS'] = 'cpu'


select()
