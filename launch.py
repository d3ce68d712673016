"""kdjax entry point.

  python launch.py --config=configs/quickstart.py --workdir=/tmp/kd
  python launch.py --config=configs/simkd_cifar100.py:resnet32x4,resnet8x4 --workdir=runs/simkd \
      --config.optimizer.lr=0.05
"""

import kdjax.platform  # noqa: F401  (must run before jax is imported: selects CPU quietly when there is no GPU)

import json
import os
import re
import signal
import sys

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from kdjax.errors import KDError, Preempted

config_flags.DEFINE_config_file('config', None, 'Experiment config file (path[:config string]).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and metrics; rerun to resume.')
flags.DEFINE_bool('restart', False, 'Start anew in a workdir that holds a run: its files are moved into '
                  'WORKDIR/previous-<time> (nothing is deleted).')
flags.DEFINE_string('coordinator_address', '', 'Many hosts: HOST:PORT of process 0 (with --num_processes and '
                    '--process_id); every process runs the same command.')
flags.DEFINE_integer('num_processes', 0, 'Many hosts: the number of processes (one per host, or per GPU).')
flags.DEFINE_integer('process_id', -1, 'Many hosts: this process, 0..num_processes-1 (0 writes the files).')
flags.DEFINE_bool('distributed', False, "Many hosts: join by JAX's auto-detection (SLURM, TPU pods, Open MPI) "
                  'instead of the three flags above.')
flags.DEFINE_float('distributed_timeout', 300, 'Seconds for every process to join the coordinator; past them a '
                   'process stops with one line naming the address.')
flags.mark_flags_as_required(['config', 'workdir'])


USAGE = 'usage: python launch.py --config=configs/FILE.py[:ARGS] --workdir=DIR [--config.FIELD=VALUE ...]'


def _fail(message: str):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def parse_flags(argv):
  """absl's parser, with every bad command line (a missing config file, a bad config string, a misspelt
  override) reported as one line naming it, exit status 2."""
  for arg in argv[1:]:
    if arg.startswith('--config='):
      path = arg[len('--config='):].split(':', 1)[0]
      if not os.path.isfile(path):
        _fail(f'config file {path} does not exist ({USAGE})')
  try:
    rest = flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001  (sorted by _fail_parse: the config file's own error, a flag, an override)
    _fail_parse(argv, e)
  config = flags.FLAGS['config'].value
  if not isinstance(config, ml_collections.ConfigDict):
    path = argv_config(argv)[len('--config='):].split(':', 1)[0]
    try:
      error = object.__getattribute__(config, '_error')  # config_flags keeps an unreadable file's error for later
    except AttributeError:  # e.g. a get_config() without its return statement
      _fail(f'config file {path}: get_config() returned {type(config).__name__}, not a ml_collections.ConfigDict '
            f'({USAGE})')
    _fail(f'config file {path} could not be read: {(str(error).strip().splitlines() or [""])[-1]}')
  return rest


def _fail_parse(argv, e: Exception):
  """The one line for an exception raised while parsing the command line."""
  text = str(e)
  if 'Error whilst parsing config file' in text:  # config_flags' rewrap of get_config's own error: its last line
    lines = [l for l in text.splitlines() if l.strip()]
    _fail(f"{argv_config(argv)}: {lines[-1].split(': ', 1)[-1]}")
  if _raised_by_config_file(e):  # not Python (a text or YAML file), or its code or get_config() failed
    path = argv_config(argv)[len('--config='):].split(':', 1)[0]
    if isinstance(e, SyntaxError):
      where = f' (line {e.lineno})' if e.lineno else ''
      _fail(f'config file {path} is not a Python config file: {e.msg}{where}; a config is a .py file whose '
            f'get_config() returns a ConfigDict ({USAGE})')
    first = (text.strip().splitlines() or [''])[0]
    _fail(f'config file {path} could not be loaded: {type(e).__name__}: {first}')
  if isinstance(e, flags.Error):
    _fail(f"{text.splitlines()[0]} ({USAGE})")
  if isinstance(e, (AttributeError, KeyError, TypeError, ValueError)):  # raised by config_flags for unknown fields
    detail = str(e.args[0] if e.args else e).replace('\n', ' ').strip('"')
    field = re.search(r"'([^']+)'", detail)
    bad = [a for a in argv[1:] if a.startswith('--config.')]
    if field:  # name the override with the unknown field, not every override given
      bad = [a for a in bad if f'.{field.group(1)}' in a.split('=', 1)[0]] or bad
    _fail(f'invalid config override {" ".join(bad)}: no such field {detail}')
  raise e


def _raised_by_config_file(e: Exception) -> bool:
  """Whether `e` came from loading the config file or calling its get_config() (config_flags' file parser is on its
  traceback), and not from absl's parsing of the other flags or of a config override. The TypeErrors and
  ValueErrors that config_flags rewraps as flags.Error ("Error whilst parsing config file") are handled apart."""
  if isinstance(e, flags.Error):
    return False
  parse = config_flags.config_flags.ConfigFileFlagParser.parse.__code__
  tb = e.__traceback__
  while tb is not None:
    if tb.tb_frame.f_code is parse:
      return True
    tb = tb.tb_next
  return False


def argv_config(argv) -> str:
  return next((a for a in argv[1:] if a.startswith('--config=')), '--config')


def _startup_signal(signum, frame):
  del frame
  # Before training starts (parsing, imports, data, teacher, compilation) nothing is worth saving, and an exception
  # raised here could land inside a library that swallows it: say so and leave at once. The loop installs its own
  # handler, which saves the step it is at.
  print(f'error: stopped by signal {signum} before training started; nothing was saved, rerun the same command to '
        'start', file=sys.stderr, flush=True)
  os._exit(143)


def _fail_with(e: KDError):
  logging.error('%s', e)
  print(f'error: {e}', file=sys.stderr)
  sys.exit(143 if isinstance(e, Preempted) else 2)


def main(argv):
  del argv
  try:
    import jax
    from kdjax import distributed
    f = flags.FLAGS
    if distributed.initialize(f.coordinator_address, f.num_processes, f.process_id, f.distributed,
                              f.distributed_timeout):
      if not distributed.is_primary():  # process 0 logs for the run; the others only warn
        logging.set_verbosity(logging.WARNING)
      logging.info('process %d of %d', jax.process_index(), jax.process_count())
    from kdjax import runner
    logging.info('JAX %s on %s: %d device(s) (%s)%s', jax.__version__, jax.default_backend(), jax.device_count(),
                 ', '.join(sorted({d.device_kind for d in jax.devices()})),
                 f', {jax.process_count()} processes' if jax.process_count() > 1 else '')
    runner.run(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.restart)
  except KDError as e:
    _fail_with(e)


if __name__ == '__main__':
  signal.signal(signal.SIGTERM, _startup_signal)
  logging.set_verbosity(logging.INFO)
  app.run(main, flags_parser=parse_flags)
