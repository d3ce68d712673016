"""JAX's persistent compilation cache, on by default: a rerun, a resume or a relaunched sweep loads the compiled
train step (and the init, evaluation and teacher-table programs) from disk instead of compiling them again.

Where it lives, first match wins:
  `config.compilation_cache`            a directory, or 'off'
  $KDJAX_COMPILATION_CACHE              a directory, or 'off' (for every run of a machine or a job)
  ~/.cache/kdjax/jax                    the default ($XDG_CACHE_HOME/kdjax/jax when that is set)
It is JAX's own cache (`jax_compilation_cache_dir`): entries are keyed by the program, the compiler options, the
JAX/XLA versions and the devices, so a stale entry is never used; deleting the directory only costs compile time.
A cache directory chosen before kdjax (by the user's code or tests/conftest.py) is kept as it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import inspect
import json
import os
import pickle
import sys
import threading
import uuid

from absl import logging
import jax
from jax.experimental import serialize_executable
import numpy as np

from kdjax import atomic

OFF = ('off', 'none', 'false', '0', 'no')
ENV = 'KDJAX_COMPILATION_CACHE'
# Programs that compile faster than this are not written (the many tiny eager-op programs); every program of a
# run's start-up that is worth loading takes longer.
MIN_COMPILE_SECS = 0.2


def default_dir() -> str:
  root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(root, 'kdjax', 'jax')


def resolve(setting: str = '') -> str | None:
  """The cache directory a run with `config.compilation_cache = setting` uses; None when switched off."""
  where = setting or os.environ.get(ENV, '') or default_dir()
  if where.strip().lower() in OFF:
    return None
  return os.path.abspath(os.path.expanduser(where))


def enable(setting: str = '') -> str | None:
  """Points JAX's persistent compilation cache at `resolve(setting)` (before anything compiles); returns the
  directory in use, or None."""
  current = jax.config.jax_compilation_cache_dir
  if current:  # chosen before us (the user's code, tests/conftest.py): theirs
    return current
  path = resolve(setting)
  if path is None:
    logging.info('persistent compilation cache: off')
    return None
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:  # an unwritable cache only costs compile time
    logging.warning('persistent compilation cache: cannot use %s (%s); compiling every time', path, e)
    return None
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', MIN_COMPILE_SECS)
  logging.info('persistent compilation cache: %s (config.compilation_cache or $%s; "off" disables)', path, ENV)
  return path


# ----------------------------------------------------------------------------------------- compiled executables
# JAX's cache above still traces and lowers every program in every process to compute its key (the lowered HLO's
# hash): for a CIFAR ResNet pair 2-3 s of a warm start, plus the shape evaluation of the initial state. kdjax
# therefore also keeps the compiled executables themselves (`jax.experimental.serialize_executable`), in
# `<cache dir>/kdjax_executables/`, under a key it computes without tracing (`program_key`): a hash of everything
# that can change the program. A wrong hit would train silently wrongly, so the key errs on the side of a miss
# (a miss costs only the lowering; JAX's cache then still holds the compiled code).
EXECUTABLES = 'kdjax_executables'
EXECUTABLES_ENV = 'KDJAX_EXECUTABLE_CACHE'  # a directory of its own, or 'off' (JAX's cache stays on)
FORMAT = 1  # of the files written here; a file of another format is a miss
_warned = set()


def executables_dir() -> str | None:
  """Where compiled executables are kept: $KDJAX_EXECUTABLE_CACHE, else `kdjax_executables/` in the persistent
  cache's directory. None (not kept) when that is 'off' or the persistent cache is, or on many processes (every
  process would have to take the same hit-or-miss decision, and their executables differ: not attempted)."""
  root = jax.config.jax_compilation_cache_dir
  where = os.environ.get(EXECUTABLES_ENV, '')
  if not root or where.strip().lower() in OFF or jax.process_count() != 1:
    return None
  return os.path.abspath(os.path.expanduser(where)) if where else os.path.join(root, EXECUTABLES)


def _warn_once(what: str, msg: str, *args):
  if what not in _warned:
    _warned.add(what)
    logging.warning(msg, *args)


def _files_digest(paths) -> str:
  h = hashlib.sha256()
  for path in sorted(set(paths)):
    h.update(path.encode() + b'\0')
    with open(path, 'rb') as f:
      h.update(hashlib.sha256(f.read()).digest())
  return h.hexdigest()


def package_digest(root: str) -> str:
  """A hash of every Python source file under `root`."""
  return _files_digest([os.path.join(d, n) for d, _, names in os.walk(root) for n in names if n.endswith('.py')])


@functools.cache
def kdjax_source_digest() -> str:
  """A hash of every Python source file of the kdjax package (its code is the program's code), once a process."""
  return package_digest(os.path.dirname(os.path.abspath(__file__)))


def source_digest(*objects, functions=()) -> str:
  """kdjax's source hash, with the source files outside kdjax that define `objects`' classes and their bases (a
  model or a Trainer subclass of the user's own, Flax's Module) and `functions` (a method registered from
  outside kdjax). Only those files: code they import from elsewhere is not followed. A class or function whose
  file cannot be found (defined in an interactive session) makes the digest new in every process: its programs
  are never cached."""
  root = os.path.dirname(os.path.abspath(__file__)) + os.sep
  extra, unknown = set(), ''
  defining = [c for obj in objects for c in type(obj).__mro__ if c.__module__ != 'builtins']
  for obj in defining + [getattr(f, 'func', f) for f in functions]:  # functools.partial: its function
    try:
      path = inspect.getsourcefile(obj)
    except (TypeError, OSError):
      path = None
    if not path or not os.path.isfile(path):
      unknown = uuid.uuid4().hex
    elif not os.path.abspath(path).startswith(root):
      extra.add(os.path.abspath(path))
  return hashlib.sha256((kdjax_source_digest() + _files_digest(extra) + unknown).encode()).hexdigest()


@functools.cache
def _versions() -> dict:
  versions = {}
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'ml_collections', 'chex'):
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def environment() -> dict:
  """What besides kdjax's code and the run makes the program: library versions, XLA flags, JAX's options and
  the devices (kind, ids, processes)."""
  versions = _versions()
  devices = jax.devices()
  options = {k: repr(v) for k, v in sorted(jax.config.values.items())  # (how a program is dispatched is not
             if 'cache' not in k and 'log' not in k and 'explain' not in k and 'dispatch' not in k}  # the program)
  return {'versions': versions, 'python': sys.version, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
          'jax_options': options, 'backend': jax.default_backend(),
          'platform_version': devices[0].client.platform_version,
          'devices': [(d.id, d.platform, d.device_kind, d.process_index) for d in devices],
          'process_count': jax.process_count()}


def signature(tree) -> list:
  """A pytree's structure and its leaves' shapes, dtypes and shardings (what a program is compiled for)."""
  leaves, treedef = jax.tree.flatten(tree)
  return [str(treedef)] + [(tuple(np.shape(x)), str(getattr(x, 'dtype', type(x).__name__)),
                            repr(getattr(x, 'sharding', None))) for x in leaves]


def program_key(name: str, ingredients) -> str:
  """The key of program `name`: a hash of `ingredients` (a JSON-able description of everything that can change
  the program: config, data, shapes, mesh, ...) and of `environment()`."""
  text = json.dumps({'format': FORMAT, 'program': name, 'ingredients': ingredients, 'environment': environment()},
                    sort_keys=True, default=repr)
  return f'{name}-{hashlib.sha256(text.encode()).hexdigest()[:40]}'


def load(key: str | None, devices):
  """The compiled executable stored under `key`, loaded onto `devices` (the mesh's, in its order), or None (a
  miss; a damaged or unreadable entry is a miss too, with one warning, and is removed so that it is written
  again). A None key (the cache off) is a miss."""
  where = executables_dir()
  if where is None or key is None:
    return None
  path = os.path.join(where, key)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, 'rb') as f:
      entry = pickle.load(f)
    if entry.get('format') != FORMAT or entry.get('key') != key:
      raise ValueError('written for another key or by another kdjax')
    return serialize_executable.deserialize_and_load(entry['executable'], entry['in_tree'], entry['out_tree'],
                                                     execution_devices=list(devices))
  except Exception as e:  # a truncated file, another jaxlib's format: compiled again and rewritten
    _warn_once('load', 'compiled-executable cache: ignoring the damaged or stale entry %s (%s); compiling again',
               path, (str(e).strip().splitlines() or [type(e).__name__])[0][:200])
    with contextlib.suppress(OSError):
      os.remove(path)
    return None


def store(key: str, compiled) -> bool:
  """Writes `compiled` under `key` (atomically: a reader never sees half a file); False when not written."""
  where = executables_dir()
  if where is None:
    return False
  try:
    blob, in_tree, out_tree = serialize_executable.serialize(compiled)
  except Exception as e:  # an executable that cannot be serialised: only costs the next start
    _warn_once('serialise', 'compiled-executable cache: cannot serialise %s (%s)', key,
               (str(e).strip().splitlines() or [type(e).__name__])[0][:200])
    return False
  return _write(os.path.join(where, key), key, {'executable': blob, 'in_tree': in_tree, 'out_tree': out_tree})


def load_or_compile(key: str | None, devices, compile_fn):
  """(the executable under `key` if stored (loaded onto `devices`), else `compile_fn(name)` stored under it; True
  when it was loaded). `compile_fn(name)` lowers and compiles the program as `named(fn, name)`.

  Serialising an executable that JAX's cache loaded gives one that fails to run on XLA:CPU (jaxlib 0.10.2:
  "Function wrapped_slice not found"), so only a program compiled here is kept. The program's name holds `key`,
  so JAX's cache holds it under a key of its own, and hits only when this cache lost its entry (a damaged file
  removed, the folder deleted): then the program is compiled once more under a name no cache knows, and kept."""
  if key is None:
    return compile_fn(None), False
  compiled = load(key, devices)
  if compiled is not None:
    logging.info('compiled-executable cache: loaded %s', key)
    return compiled, True
  with _no_jax_cache_write():  # kept here: a second copy in JAX's cache would never be of use (see above)
    compiled, from_jax_cache = _compile_watched(lambda: compile_fn(key))
  if from_jax_cache:
    logging.info('compiled-executable cache: %s came from JAX\'s cache, which cannot be serialised again; '
                 'compiling it afresh to keep it', key)
    with _no_jax_cache_write():
      compiled, from_jax_cache = _compile_watched(lambda: compile_fn(f'{key}-{uuid.uuid4().hex[:8]}'))
  if not from_jax_cache:
    store(key, compiled)
  return compiled, False


def named(fn, name: str | None):
  """`fn` under `name` (None: its own), which becomes the lowered program's name (see `load_or_compile`)."""
  if name is None:
    return fn

  def program(*args, **kwargs):
    return fn(*args, **kwargs)

  program.__name__ = program.__qualname__ = 'kdjax_' + name.replace('-', '_')
  return program


def _no_jax_cache_write():
  """A context (this thread's) in which JAX's persistent cache writes nothing: an executable this cache keeps
  (as large as the training images compiled into it) is not stored twice. JAX's own option, set thread-locally
  through its internal config module; a no-op where that is not available."""
  try:
    from jax._src import config as jax_config
    return jax_config.persistent_cache_min_compile_time_secs(float('inf'))
  except Exception:  # another JAX: both caches keep the program
    return contextlib.nullcontext()


_watch = threading.local()
_listening = []


def _on_event(event: str, **kwargs):
  if event == '/jax/compilation_cache/cache_hits' and getattr(_watch, 'on', False):
    _watch.hits += 1


def _compile_watched(compile_fn):
  """(compile_fn(), whether JAX's persistent cache supplied the executable), the latter from JAX's monitoring
  events of this thread."""
  if not _listening:
    jax.monitoring.register_event_listener(_on_event)
    _listening.append(True)
  _watch.on, _watch.hits = True, 0
  try:
    compiled = compile_fn()
  finally:
    _watch.on = False
  return compiled, _watch.hits > 0


# Config fields that no program reads (what and how often a run logs, evaluates, checkpoints; where files live:
# the data a program closes over is hashed by content instead, and the teacher's variables are every program's
# argument, their shapes in the key). Every other field is part of the key.
NOT_PROGRAM = ('eval_every_epochs', 'checkpoint_every_epochs', 'keep_checkpoints', 'tensorboard', 'figures',
               'compilation_cache', 'data.data_dir', 'data.dir', 'data.cache_dir', 'teacher.cache_dir',
               'teacher.checkpoint', 'memory_budget_gb')


def config_ingredient(cfg) -> dict:
  """`cfg` as JSON (every field, nested), less NOT_PROGRAM."""
  out = json.loads(cfg.to_json_best_effort(sort_keys=True))
  for path in NOT_PROGRAM:
    *parents, leaf = path.split('.')
    node = out
    for p in parents:
      node = node.get(p) if isinstance(node, dict) else None
    if isinstance(node, dict):
      node.pop(leaf, None)
  return out


def describe(module) -> list:
  """A Flax module's class and fields, functions by name (their repr holds an address that changes every run)."""
  fields = {}
  for f in dataclasses.fields(module) if dataclasses.is_dataclass(module) else ():
    if f.name in ('parent', 'name'):
      continue
    v = getattr(module, f.name, None)
    fields[f.name] = (f'{getattr(v, "__module__", "")}.{v.__qualname__}' if callable(v) and hasattr(v, '__qualname__')
                      else repr(v))
  return [f'{type(module).__module__}.{type(module).__qualname__}', fields]


def cached_shapes(name: str, ingredients, fn):
  """`fn()`, a pytree of shapes and dtypes (`jax.eval_shape`'s), kept beside the executables under the key of
  (`name`, `ingredients`): a warm start does not trace the function again (a network's init, ~1 s for a ResNet)."""
  key = program_key(name, ingredients) if executables_dir() is not None else None
  path = key and os.path.join(executables_dir(), key)
  if path and os.path.isfile(path):
    try:
      with open(path, 'rb') as f:
        entry = pickle.load(f)
      if entry.get('format') != FORMAT or entry.get('key') != key:
        raise ValueError('written for another key or by another kdjax')
      return jax.tree.unflatten(entry['treedef'], [jax.ShapeDtypeStruct(s, np.dtype(d)) for s, d in entry['leaves']])
    except Exception as e:
      _warn_once('load', 'compiled-executable cache: ignoring the damaged or stale entry %s (%s); computing again',
                 path, (str(e).strip().splitlines() or [type(e).__name__])[0][:200])
  out = fn()
  if path:
    leaves, treedef = jax.tree.flatten(out)
    _write(path, key, {'treedef': treedef, 'leaves': [(tuple(l.shape), str(l.dtype)) for l in leaves]})
  return out


def _write(path: str, key: str, entry: dict) -> bool:
  """Writes a cache entry atomically (a reader never sees half a file); False when not written."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic.writing(path, 'wb') as f:
      pickle.dump({'format': FORMAT, 'key': key, **entry}, f, protocol=pickle.HIGHEST_PROTOCOL)
    return True
  except Exception as e:  # a full disk, an unpicklable tree: only costs the next start
    _warn_once('store', 'compiled-executable cache: cannot write %s (%s)', path,
               (str(e).strip().splitlines() or [type(e).__name__])[0][:200])
    return False
