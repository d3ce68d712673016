"""Many hosts: JAX's multi-controller runtime (`jax.distributed`), and the few places a run must agree across it.

Every process runs the same program on the same config. `initialize` joins them before JAX starts its backend, so
`jax.devices()` then lists every process's devices and the mesh (`kdjax.sharding`) spans them all; the train step
is unchanged (the batch gather inside jit yields each process's part of the global batch). Process 0 writes the
run's files; checkpoints are written by all, as Orbax requires (`kdjax.train`).

`jax.distributed.initialize` ends the process from C++ with a stack trace when the coordinator cannot be reached or
the processes do not all join (jax/_src/distributed.py: the client's `connect()` times out and aborts), so a
watchdog thread reports that first, as one line naming the address, within the stated timeout.

JAX's coordinator checks neither that the processes were given the same `--num_processes` (process 0's count is
the one it waits for: started with 2 and 3, both processes train) nor that their ids are distinct: a second process
with a taken id registers as a restart of the first ("a different incarnation"), and the coordinator then ends every
other process from C++ (client.h: "Terminating process because the JAX distributed service detected fatal
errors"), before any check of ours could run and whenever the duplicate arrives, mid-training too. So with the
explicit flags the processes first meet in kdjax's own handshake (`_handshake`), on the coordinator's port before
JAX's service takes it: process 0 collects every process's (num_processes, process_id, random token) and answers
each with the verdict, so that a mismatch or a duplicate is one line on every process, exit status 2, and a process
that arrives after the run has started never registers with JAX (it cannot end the run).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import socket
import sys
import threading
import time

import jax
import numpy as np

from kdjax.errors import ConfigError

_KEY = 'kdjax/join/'
# JAX's own initialisation timeout is set past ours, so that the watchdog's one line comes first.
_JAX_TIMEOUT_MARGIN = 30
# JAX passes its timeouts to C++ as 32-bit milliseconds (about 24.8 days): longer is refused with one line.
MAX_TIMEOUT = 1e6
# The handshake's messages are one line of JSON each way; a connection that sends nothing within this many seconds
# (not a kdjax process) is dropped.
_HELLO_SECONDS = 5.0


def _split_address(address: str) -> tuple[str, int]:
  """(host, port) of HOST:PORT ([IPv6]:PORT), or a ConfigError naming --coordinator_address."""
  host, sep, port = address.rpartition(':')
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ConfigError(f'--coordinator_address={address!r} must be HOST:PORT with a port in 1..65535, e.g. '
                      '10.0.0.1:1234 (an IPv6 host in brackets: [::1]:1234)')
  if ':' in host and not (host.startswith('[') and host.endswith(']')):
    raise ConfigError(f'--coordinator_address={address!r}: write an IPv6 host in brackets, e.g. [::1]:1234')
  return host.strip('[]'), int(port)


def _check_timeout(timeout):
  if not isinstance(timeout, (int, float)) or not (math.isfinite(timeout) and 0 < timeout <= MAX_TIMEOUT):
    raise ConfigError(f'--distributed_timeout must be a number of seconds in (0, {MAX_TIMEOUT:g}], got {timeout}')


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
  _check_timeout(timeout)
  explicit = [bool(coordinator_address), num_processes > 0, process_id >= 0]
  if not auto and not any(explicit):
    return False
  if not auto and not all(explicit):
    raise ConfigError('--coordinator_address, --num_processes and --process_id go together (or pass --distributed '
                      "for JAX's auto-detection)")
  if not auto and not 0 <= process_id < num_processes:
    raise ConfigError(f'--process_id={process_id} is out of range for --num_processes={num_processes} (0..'
                      f'{num_processes - 1})')
  if coordinator_address:
    _split_address(coordinator_address)
  token = secrets.token_hex(8)  # tells this process from another given the same id
  if not auto:
    _handshake(coordinator_address, num_processes, process_id, token, timeout)
  done = _watchdog(coordinator_address, num_processes, timeout)
  kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                process_id=process_id) if not auto else {}
  try:
    jax.distributed.initialize(**kwargs, initialization_timeout=int(timeout) + _JAX_TIMEOUT_MARGIN)
  except (ValueError, RuntimeError) as e:  # auto-detection found no cluster, a bad address, ...
    done.set()
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ConfigError(f'jax.distributed.initialize failed: {first}') from None
  _check_peers(token, timeout)
  jax.devices()  # the global topology, exchanged by every process: still under the watchdog
  done.set()
  return True


def _verdict(claims: dict, claim: dict, num_processes: int) -> str | None:
  """Process 0's judgement of one more process's claim: an error line, or None when it fits."""
  try:
    n, i, token = int(claim['num_processes']), int(claim['process_id']), str(claim['token'])
  except (KeyError, TypeError, ValueError):
    return 'a process sent a malformed join request (not this version of kdjax?)'
  if n != num_processes:
    return (f'process {i} was started with --num_processes={n} but process 0 with --num_processes={num_processes}; '
            'start every process with the same --num_processes')
  if i in claims and claims[i] != token:
    return (f'two processes were started with --process_id={i}; give each process its own --process_id in '
            f'0..{num_processes - 1}')
  return None


def _serve(listener, num_processes: int, token: str, address: str, timeout: float):
  """Process 0's side of the handshake: waits (at most `timeout` seconds) until every id 0..num_processes-1 has
  claimed its place, or until a claim does not fit; then answers every waiting process with the same verdict."""
  claims, conns, error = {0: token}, [], None
  end = time.monotonic() + timeout
  listener.settimeout(0.2)
  while len(claims) < num_processes and error is None:
    if time.monotonic() >= end:
      error = (f'the {num_processes} processes did not all join the coordinator at {address} within {timeout:g}s '
               '(--distributed_timeout): start every process with the same --num_processes and its own '
               f'--process_id in 0..{num_processes - 1}')
      break
    try:
      conn, _ = listener.accept()
    except (socket.timeout, BlockingIOError):
      continue
    conn.settimeout(_HELLO_SECONDS)
    try:
      claim = json.loads(conn.makefile('r').readline(4096))
    except (OSError, ValueError):  # not a kdjax process: ignored
      conn.close()
      continue
    conns.append(conn)
    error = _verdict(claims, claim if isinstance(claim, dict) else {}, num_processes)
    if error is None:
      claims[int(claim['process_id'])] = str(claim['token'])
  answer = (json.dumps({'error': error} if error else {'ok': True}) + '\n').encode()
  for conn in conns:
    try:
      conn.sendall(answer)
      conn.recv(1)  # the other side closes first: no TIME_WAIT on this port before JAX's service takes it
    except OSError:
      pass
    conn.close()
  listener.close()
  if error:
    raise ConfigError(error)


def _claim(address: str, num_processes: int, process_id: int, token: str, timeout: float):
  """Every other process's side: sends its claim to process 0 and waits for the verdict (bounded by `timeout`)."""
  host, port = _split_address(address)
  end = time.monotonic() + timeout
  while True:
    try:
      sock = socket.create_connection((host, port), timeout=1)
      break
    except OSError:
      if time.monotonic() >= end:
        raise ConfigError(f'cannot reach the coordinator at {address} within {timeout:g}s (--distributed_timeout): '
                          'start process 0 there, or fix --coordinator_address') from None
      time.sleep(0.2)
  with sock:
    sock.settimeout(max(end - time.monotonic(), 0) + _HELLO_SECONDS)
    try:
      sock.sendall((json.dumps({'num_processes': num_processes, 'process_id': process_id, 'token': token}) +
                    '\n').encode())
      answer = json.loads(sock.makefile('r').readline(65536))
    except socket.timeout:
      raise ConfigError(f'the {num_processes} processes did not all join the coordinator at {address} within '
                        f'{timeout:g}s (--distributed_timeout): start every process with the same --num_processes '
                        f'and its own --process_id in 0..{num_processes - 1}') from None
    except (OSError, ValueError):
      raise ConfigError(f'the coordinator at {address} did not answer as the process 0 of a kdjax run starting: a '
                        f'run may already be going on there, with a process of --process_id={process_id}; or another '
                        'program holds that port') from None
  if not isinstance(answer, dict) or not answer.get('ok'):
    raise ConfigError(str(answer.get('error') if isinstance(answer, dict) else answer))


def _handshake(address: str, num_processes: int, process_id: int, token: str, timeout: float):
  """kdjax's join before JAX's (see the module's docstring): process 0 listens on the coordinator's port, which
  JAX's service takes next; a process 0 that finds the port taken joins as the others do (and is refused as a
  duplicate by the process 0 listening there)."""
  listener = None
  if process_id == 0:
    port = _split_address(address)[1]
    try:
      if socket.has_dualstack_ipv6():  # as JAX's service, which binds [::]:PORT
        listener = socket.create_server(('', port), family=socket.AF_INET6, dualstack_ipv6=True)
      else:
        listener = socket.create_server(('', port))
    except OSError:
      listener = None
  if listener is not None:
    _serve(listener, num_processes, token, address, timeout)
  else:
    _claim(address, num_processes, process_id, token, timeout)


def _check_peers(token: str, timeout: float):
  """After JAX's join, every process reads every other's (num_processes, process_id, token) as each was given them:
  the same check as the handshake's, also for JAX's auto-detection."""
  from jax._src import distributed as jax_distributed
  state = jax_distributed.global_state
  me, n, given = jax.process_index(), state.num_processes, state.process_id
  try:
    state.client.key_value_set(f'{_KEY}{me}', json.dumps([n, given, token]))
  except Exception:  # noqa: BLE001  (the key is taken: another process has this index)
    raise ConfigError(f'two processes were started with --process_id={given}; give each process its own '
                      f'--process_id in 0..{n - 1}') from None
  for other in range(jax.process_count()):
    try:
      theirs, their_id, their_token = json.loads(state.client.blocking_key_value_get(f'{_KEY}{other}',
                                                                                     int(timeout * 1000)))
    except Exception:  # noqa: BLE001  (not there in time: that process stopped)
      raise ConfigError(f'process {other} did not report its --num_processes within {timeout:g}s '
                        '(--distributed_timeout)') from None
    if theirs != n:
      raise ConfigError(f'process {other} was started with --num_processes={theirs} but process {me} with '
                        f'--num_processes={n}; start every process with the same --num_processes')
    if other == me and their_token != token:
      raise ConfigError(f'two processes were started with --process_id={given}; give each process its own '
                        f'--process_id in 0..{n - 1}')


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

