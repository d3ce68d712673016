"""Many hosts: JAX's multi-controller runtime (`jax.distributed`), and the few places a run must agree across it.

Every process runs the same program on the same config. `initialize` joins them before JAX starts its backend, so
`jax.devices()` then lists every process's devices and the mesh (`kdjax.sharding`) spans them all; the train step
is unchanged (the batch gather inside jit yields each process's part of the global batch). Process 0 writes the
run's files; checkpoints are written by all, as Orbax requires (`kdjax.train`).

`jax.distributed.initialize` ends the process from C++ with a stack trace when the coordinator cannot be reached or
the processes do not all join (jax/_src/distributed.py: the client's `connect()` times out and aborts), so a
watchdog thread reports that first, as one line naming the address, within the stated timeout.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

import jax
import numpy as np

from kdjax.errors import ConfigError

_KEY = 'kdjax/num_processes/'
# JAX's own initialisation timeout is set past ours, so that the watchdog's one line comes first.
_JAX_TIMEOUT_MARGIN = 30


def _reachable(address: str) -> bool:
  host, _, port = address.rpartition(':')
  try:
    with socket.create_connection((host.strip('[]'), int(port)), timeout=1):
      return True
  except (OSError, ValueError):
    return False


def _watchdog(address: str, num_processes: int, timeout: float):
  """Ends the process with one line if the processes have not all joined within `timeout` seconds."""
  done = threading.Event()

  def expire():
    end, seen = time.monotonic() + timeout, not address  # whether the coordinator ever answered while we waited
    while not done.wait(min(0.5, max(end - time.monotonic(), 0))):
      seen = seen or _reachable(address)
      if time.monotonic() >= end:
        break
    if done.is_set():
      return
    where = f'the coordinator at {address}' if address else 'the auto-detected coordinator'
    if not seen:
      line = (f'cannot reach {where} within {timeout:g}s (--distributed_timeout): start process 0 there, or fix '
              '--coordinator_address')
    else:
      line = (f'the {num_processes or "expected"} processes did not all join {where} within {timeout:g}s '
              '(--distributed_timeout): start every process with the same --num_processes and its own '
              '--process_id in 0..num_processes-1')
    print(f'error: {line}', file=sys.stderr, flush=True)
    os._exit(2)

  threading.Thread(target=expire, daemon=True, name='kdjax-distributed-watchdog').start()
  return done


def initialize(coordinator_address: str = '', num_processes: int = 0, process_id: int = -1, auto: bool = False,
               timeout: float = 300) -> bool:
  """Joins the processes of a multi-host run: explicitly (all three of `coordinator_address`, `num_processes`,
  `process_id`) or, with `auto`, by JAX's cluster auto-detection (SLURM, TPU pods, Open MPI, ...). Returns whether
  it did; a bad combination is a ConfigError, one line naming the flag."""
  explicit = [bool(coordinator_address), num_processes > 0, process_id >= 0]
  if not auto and not any(explicit):
    return False
  if not auto and not all(explicit):
    raise ConfigError('--coordinator_address, --num_processes and --process_id go together (or pass --distributed '
                      "for JAX's auto-detection)")
  if not auto and not 0 <= process_id < num_processes:
    raise ConfigError(f'--process_id={process_id} is out of range for --num_processes={num_processes} (0..'
                      f'{num_processes - 1})')
  if timeout <= 0:
    raise ConfigError(f'--distributed_timeout must be > 0, got {timeout:g}')
  done = _watchdog(coordinator_address, num_processes, timeout)
  kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                process_id=process_id) if not auto else {}
  try:
    jax.distributed.initialize(**kwargs, initialization_timeout=int(timeout) + _JAX_TIMEOUT_MARGIN)
  except (ValueError, RuntimeError) as e:  # auto-detection found no cluster, a bad address, ...
    done.set()
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ConfigError(f'jax.distributed.initialize failed: {first}') from None
  _check_process_count(timeout)
  jax.devices()  # the global topology, exchanged by every process: still under the watchdog
  done.set()
  return True


def _check_process_count(timeout: float):
  """Every process must have been told the same number of processes: JAX's coordinator checks only the ids."""
  from jax._src import distributed as jax_distributed
  client = jax_distributed.global_state.client
  me, n = jax.process_index(), jax.process_count()
  client.key_value_set(f'{_KEY}{me}', str(n))
  for other in range(n):
    try:
      theirs = int(client.blocking_key_value_get(f'{_KEY}{other}', int(timeout * 1000)))
    except Exception:  # not there in time: process `other` does not exist (a count too large here)
      theirs = None
    if theirs != n:
      seen = f'--num_processes={theirs}' if theirs is not None else 'no such process joined'
      raise ConfigError(f'process {me} was started with --num_processes={n} but process {other} reports {seen}; '
                        'start every process with the same --num_processes')


def is_primary() -> bool:
  """Process 0 writes the run's files (logs, metrics, TensorBoard, figures, summary.json, the teacher cache's
  records); on one host this is always true."""
  return jax.process_index() == 0


def multi() -> bool:
  return jax.process_count() > 1


def barrier(name: str):
  """Every process waits here for the others (no-op on one host)."""
  if multi():
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def agree_signal(signum: int | None) -> int | None:
  """The signal any process has received (the largest number), the same answer on every process: a SIGTERM sent to
  one process stops them all at the same step. One tiny collective; on one host the value itself."""
  if not multi():
    return signum
  from jax.experimental import multihost_utils
  seen = int(np.max(multihost_utils.process_allgather(np.int32(signum or 0))))
  return seen or None

