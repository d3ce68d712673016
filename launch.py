"""kdjax entry point.

  python launch.py --config=configs/quickstart.py --workdir=/tmp/kd
  python launch.py --config=configs/simkd_cifar100.py:resnet32x4,resnet8x4 --workdir=runs/simkd \
      --config.optimizer.lr=0.05
"""

import kdjax.platform  # noqa: F401  (must run before jax is imported: selects CPU quietly when there is no GPU)

import json
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Experiment config file (path[:config string]).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and metrics; rerun to resume.')
flags.mark_flags_as_required(['config', 'workdir'])


def parse_flags(argv):
  """absl's parser, with a bad config override (e.g. a misspelt field) reported as one line naming it."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {e}\nUsage: python launch.py --config=configs/FILE.py[:ARGS] --workdir=DIR '
             '[--config.FIELD=VALUE ...]')
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # raised by config_flags for unknown fields
    bad = [a for a in argv[1:] if a.startswith('--config.')]
    detail = str(e.args[0] if e.args else e).replace('\n', ' ').strip('"')
    sys.exit(f'error: invalid config override {" ".join(bad)}: no such field {detail}')


def main(argv):
  del argv
  import jax
  from kdjax import runner
  logging.info('JAX %s on %s: %d device(s) (%s)', jax.__version__, jax.default_backend(), jax.device_count(),
               ', '.join(sorted({d.device_kind for d in jax.devices()})))
  try:
    runner.run(flags.FLAGS.config, flags.FLAGS.workdir)
  except runner.EXPECTED_ERRORS as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(runner.exit_code(e))


if __name__ == '__main__':
  logging.set_verbosity(logging.INFO)
  app.run(main, flags_parser=parse_flags)
