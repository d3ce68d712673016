"""Runs a config: one training run, or a suite of runs (e.g. teacher, scratch student, KD student) and a table.

A suite config has `suite` (name -> full run config) and `suite_order`; each run gets `workdir/<name>`, and the
string '{workdir}' inside a run's `teacher.checkpoint`, `student.init_checkpoint` or `distill.extras_checkpoint` is
replaced by the suite's workdir, so one run can distill from (or start from) another.
"""

from __future__ import annotations

import os

from absl import logging
import jax

from kdjax import train
from kdjax.errors import ConfigError

def run(cfg, workdir: str, restart: bool = False) -> dict:
  if not workdir:
    raise ConfigError('--workdir is empty: name the directory for checkpoints, logs and metrics')
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if not cfg.get('suite'):
    return train.train_and_evaluate(cfg, workdir, restart)
  results = {}
  for name in cfg.suite_order:
    sub = cfg.suite[name]
    with sub.unlocked():
      for section, key in (('teacher', 'checkpoint'), ('student', 'init_checkpoint'),
                           ('distill', 'extras_checkpoint')):
        if sub[section][key]:
          sub[section][key] = sub[section][key].replace('{workdir}', workdir)
    logging.info('=== suite run %r ===', name)
    results[name] = train.train_and_evaluate(sub, os.path.join(workdir, name), restart)
  if jax.process_index() == 0:  # on many hosts, process 0 prints
    print(format_table(cfg, results))
  return results


def format_table(cfg, results: dict) -> str:
  rows = [('run', 'model', 'losses', 'test acc')]
  for name, s in results.items():
    sub = cfg.suite[name]
    losses = ', '.join(f'{k} {v:g}' for k, v in sub.distill.losses.items())
    rows.append((name, sub.student.model, losses, f"{s['test_accuracy']:.4f}"))
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  lines = ['  '.join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
  lines.insert(1, '  '.join('-' * w for w in widths))
  return '\n'.join(lines)
