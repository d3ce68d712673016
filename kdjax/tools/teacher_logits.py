"""Make the teacher replay store of a config (kdjax/replay.py): the teacher's top-k logits on every augmented batch
of `config.epochs` epochs, for the runs and sweeps that set `--config.distill.teacher_store` to it.

  python -m kdjax.tools.teacher_logits --config=configs/FILE.py[:ARGS] --workdir=DIR [--config.FIELD=VALUE ...]

The store goes to `config.distill.teacher_store`, or DIR/teacher_store when that is empty. The teacher is read
(or trained first and cached) as a run of the config reads it; DIR holds nothing else unless a teacher is trained.
"""

import kdjax.platform  # noqa: F401  (before jax: CPU quietly when there is no GPU)

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from kdjax.errors import KDError



def define_flags():
  """The command line's flags: defined when run as a program only, so that importing `run` (tests, launch.py's
  process) defines no flag of the same name twice."""
  config_flags.DEFINE_config_file('config', None, 'Experiment config file (path[:config string]).',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory of the store when config.distill.teacher_store is empty.')
  flags.mark_flags_as_required(['config', 'workdir'])


def run(cfg, workdir: str, log=print) -> dict:
  """Makes the store of `cfg`; returns its meta (kdjax/replay.py `make`)."""
  from kdjax import compile_cache
  from kdjax import data as data_lib
  from kdjax import replay
  from kdjax import reporting
  from kdjax import sharding
  from kdjax import teacher as teacher_lib
  from kdjax import train
  from kdjax import validate
  from kdjax.data import stream as stream_data
  from kdjax.errors import ConfigError
  reporting.quiet_library_logs()
  validate.check(cfg)
  if not cfg.teacher.model:
    raise ConfigError('config.teacher.model is empty: there is no teacher to store')
  if stream_data.choose(cfg.data) == 'stream':
    replay.check_config(cfg, streaming=True)
  replay.check_config(cfg, streaming=False)
  compile_cache.enable(cfg.compilation_cache)
  path = os.path.abspath(os.path.expanduser(cfg.distill.teacher_store or os.path.join(workdir, 'teacher_store')))
  ds = data_lib.load(cfg.data)
  mesh = sharding.make_mesh(cfg.num_devices, 1, 1, cfg.batch_size)
  teacher, teacher_vars = teacher_lib.prepare_all(cfg, ds, mesh, train.train_and_evaluate)
  log(f'teacher_logits: {cfg.teacher.model} on {ds.name} ({len(ds.train)} training images, augment {ds.augment}), '
      f'{cfg.epochs} epochs, into {path}')
  return replay.make(cfg, ds, mesh, teacher, teacher_vars, path, log)


def main(argv):
  del argv
  try:
    run(flags.FLAGS.config, flags.FLAGS.workdir)
  except KDError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  define_flags()
  app.run(main)
