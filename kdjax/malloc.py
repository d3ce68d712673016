"""glibc's malloc set to keep large freed blocks for reuse (no `mmap` for them, no trimming of the heap): why, in
kdjax/platform.py's docstring, which applies it with JAX's matching setting. No JAX here, so that a process that
does not run JAX (benchmarks/step_speed.py's PyTorch contender) can apply the same setting."""

import ctypes
import os
import platform


def malloc_settings() -> bool:
  """Sets glibc's malloc to reuse large freed blocks (no mmap, no trimming); True when it did."""
  if os.environ.get('KDJAX_MALLOC', '').strip().lower() == 'default' or platform.libc_ver()[0] != 'glibc':
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h; a threshold of -1 never trims
  return mallopt(m_mmap_max, 0) == 1 and mallopt(m_trim_threshold, -1) == 1
