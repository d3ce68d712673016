"""Choose the JAX platform and the XLA:CPU settings before JAX initialises.

`jax[cuda12]` installs a CUDA plugin that prints a traceback when it finds no GPU before falling back to CPU.
On a machine with no NVIDIA device nodes (and no TPU) we ask for the CPU outright, which keeps that path quiet.

XLA:CPU hands convolutions to YNNPACK by default; on the x86 CPUs measured here (AVX2) its convolutions ran the
CIFAR ResNets' training step at half the speed of XLA's own (Eigen) convolutions, while YNNPACK's dot and
elementwise fusions helped the MLPs (benchmarks/README.md, "The CPU gap"). So kdjax removes the convolution fusion
type from YNNPACK's list unless XLA_FLAGS already sets that list. `KDJAX_CPU_CONV=ynn` keeps XLA's default.
The change is in the convolutions' summation order only: float32 round-off, no change of method.

XLA:CPU allocates each call's temporary buffers as one block (1.2 GB for the DeiT-Ti-sized ViT pair's training
step, about 100 MB for one of its blocks' forward and backward). With JAX's asynchronous CPU dispatch that block is
allocated on one of the client's threads, whose glibc arena cannot hold a block over 64 MB, so glibc maps it afresh
with `mmap` and unmaps it after the call: every step faulted in and zeroed its whole arena again (27,000 page faults
a call for the one block, a third of its time). `heap_settings` runs single-device CPU programs on the calling
thread (`jax_cpu_enable_async_dispatch=False`, JAX's own option: on the CPU the host and the "device" share the
same cores, so there is little to overlap; multi-device programs stay asynchronous) and sets glibc's main arena to
keep freed memory for reuse (no `mmap`, no trimming), so the block is reused from call to call. The process's
resident memory then stays at its high-water mark instead of falling between steps. Giving all threads one arena
would cover the asynchronous case too but made XLA's (multi-threaded) compilation about 15 % slower, so it is not
done. Only when the CPU is the platform; `KDJAX_MALLOC=default` keeps glibc's and JAX's defaults; other C libraries
are left alone.

Import this module before anything initialises a JAX backend.
"""

import glob
import os

from kdjax.malloc import malloc_settings

YNN_FLAG = '--xla_cpu_experimental_ynn_fusion_type'
CPU_CONV_SETTING = '-individual_convolution'  # YNNPACK keeps its dot, elementwise and reduce fusions


def cpu_flags() -> None:
  """Adds kdjax's XLA:CPU setting to XLA_FLAGS, unless the user set that flag or asked for XLA's default."""
  flags = os.environ.get('XLA_FLAGS', '')
  if YNN_FLAG in flags or os.environ.get('KDJAX_CPU_CONV', '').strip().lower() == 'ynn':
    return
  os.environ['XLA_FLAGS'] = f'{flags} {YNN_FLAG}={CPU_CONV_SETTING}'.strip()


def heap_settings() -> None:
  """A program's temporaries allocated on the calling thread and reused from call to call (the module's docstring).
  Imports JAX: call it after the environment JAX reads at import is set."""
  if malloc_settings():
    import jax
    jax.config.update('jax_cpu_enable_async_dispatch', False)


def select() -> None:
  cpu_flags()
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  if not os.environ.get('JAX_PLATFORMS'):  # else the user chose
    has_gpu = bool(glob.glob('/dev/nvidia[0-9]*'))
    has_tpu = bool(glob.glob('/dev/accel[0-9]*') or glob.glob('/dev/vfio/[0-9]*'))
    if not (has_gpu or has_tpu):
      os.environ['JAX_PLATFORMS'] = 'cpu'
  first_platform = os.environ.get('JAX_PLATFORMS', '').split(',')[0].strip().lower()
  if first_platform == 'cpu':  # an accelerator's temporaries are its own
    heap_settings()


select()
