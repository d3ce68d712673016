"""Choose the JAX platform before JAX initialises.

`jax[cuda12]` installs a CUDA plugin that prints a traceback when it finds no GPU before falling back to CPU.
On a machine with no NVIDIA device nodes (and no TPU) we ask for the CPU outright, which keeps that path quiet.
Import this module before anything imports jax.
"""

import glob
import os


def select() -> None:
  if os.environ.get('JAX_PLATFORMS'):
    return  # the user chose
  has_gpu = bool(glob.glob('/dev/nvidia[0-9]*'))
  has_tpu = bool(glob.glob('/dev/accel[0-9]*') or glob.glob('/dev/vfio/[0-9]*'))
  if not (has_gpu or has_tpu):
    os.environ['JAX_PLATFORMS'] = 'cpu'
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')


select()
