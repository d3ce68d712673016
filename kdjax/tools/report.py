"""Redraw the results of finished or unfinished runs: results.csv, the table and the figures of each workdir.

  python -m kdjax.tools.report runs/sweep_a [runs/sweep_b ...] [--out DIR]

Prints each run's table and, given several workdirs, a comparison table. Files go into each workdir (results.csv,
figures/) unless --out is given; then into DIR/<workdir basename>/, which leaves the workdirs untouched.
"""

from __future__ import annotations

import argparse
import os
import sys

from kdjax import results
from kdjax.errors import KDError


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='python -m kdjax.tools.report', description=__doc__.split('\n')[0])
  parser.add_argument('workdirs', nargs='+', metavar='WORKDIR', help='a kdjax run or sweep directory')
  parser.add_argument('--out', metavar='DIR', help='write results.csv and figures to DIR/<basename>/ instead')
  return parser


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    # Every workdir is read before anything is written, so a typo in the last one leaves no half-done output.
    runs = [results.load_run(w) for w in args.workdirs]
    for run in runs:
      if not run.history and not os.path.exists(os.path.join(run.workdir, 'sweep.json')):
        raise KDError(f'{run.workdir} holds no complete epoch record yet (metrics.jsonl has none, and there is no '
                      'sweep.json): nothing to report')
    names = [os.path.basename(r.workdir) for r in runs]
    if args.out and len(set(names)) < len(names):
      raise KDError(f'--out {args.out}: several workdirs are named {next(n for n in names if names.count(n) > 1)!r}; '
                    'their files would overwrite each other')
    tables = []
    for name, run in zip(names, runs):
      outdir = os.path.join(args.out, name) if args.out else None
      results.write_csv(run, os.path.join(outdir, 'results.csv') if outdir else None)
      results.figures(run, outdir)
      tables.append(results.report_text(run, outdir))
  except (KDError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print('\n\n'.join(tables))
  if len(runs) > 1:
    print('\n' + results.compare(runs))
  return 0


if __name__ == '__main__':
  sys.exit(main())
