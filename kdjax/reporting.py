"""Console progress, `metrics.jsonl` and TensorBoard event files for a run."""

from __future__ import annotations

import json
import logging as logging_std
import os
import sys
import time

from absl import logging


class _QuietLibraries(logging_std.Filter):
  """Orbax logs every save and restore at INFO; keep only its warnings so the progress lines stay readable, less
  the two our use makes routine: opening a checkpoint read-only, and saving an epoch that was not evaluated."""

  _ROUTINE = ('read_only', 'read only', 'did not provide metrics')

  def filter(self, record):
    if '/orbax/' not in record.pathname:
      return True
    return record.levelno >= logging_std.WARNING and not any(s in record.getMessage() for s in self._ROUTINE)


def quiet_library_logs():
  logger = logging_std.getLogger('absl')
  if not any(isinstance(f, _QuietLibraries) for f in logger.filters):
    logger.addFilter(_QuietLibraries())


def _fmt_time(seconds: float) -> str:
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'


class Reporter:

  def __init__(self, workdir: str, total_epochs: int, steps_per_epoch: int, tensorboard: bool = True):
    self.total_epochs = total_epochs
    self.steps_per_epoch = steps_per_epoch
    self.jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    self.tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    self.tty = sys.stderr.isatty()
    self.epoch_times = []

  def progress(self, epoch: int, step_in_epoch: int, loss: float | None = None):
    """A one-line progress bar within the epoch (only on a terminal; logs get the per-epoch line)."""
    if not self.tty:
      return
    frac = step_in_epoch / self.steps_per_epoch
    bar = '#' * int(30 * frac) + '.' * (30 - int(30 * frac))
    extra = f' loss {loss:.4f}' if loss is not None else ''
    sys.stderr.write(f'\r  epoch {epoch + 1}/{self.total_epochs} [{bar}] {step_in_epoch}/{self.steps_per_epoch}'
                     f'{extra}')
    sys.stderr.flush()
    if step_in_epoch >= self.steps_per_epoch:
      sys.stderr.write('\r' + ' ' * 90 + '\r')

  def epoch(self, epoch: int, step: int, record: dict, epoch_seconds: float, images: int):
    """Logs the epoch line, appends to metrics.jsonl and TensorBoard. `epoch` counts from 0."""
    self.epoch_times.append(epoch_seconds)
    recent = self.epoch_times[-5:] if len(self.epoch_times) > 1 else self.epoch_times
    # The first epoch includes compilation; once later epochs exist, the ETA ignores it.
    per_epoch = sum(recent[1:] or recent) / len(recent[1:] or recent)
    eta = per_epoch * (self.total_epochs - epoch - 1)
    record = dict(record, epoch=epoch + 1, step=step, img_per_s=images / max(epoch_seconds, 1e-9),
                  epoch_seconds=epoch_seconds)
    parts = [f'epoch {epoch + 1}/{self.total_epochs}', f"loss {record['train_loss']:.4f}",
             f"train acc {record['train_accuracy']:.4f}"]
    for split in ('val', 'test'):
      if f'{split}_accuracy' in record:
        parts.append(f"{split} acc {record[f'{split}_accuracy']:.4f}")
    parts += [f"{record['img_per_s']:.0f} img/s", f'ETA {_fmt_time(eta)}']
    logging.info(' | '.join(parts))
    self.write(record)

  def write(self, record: dict):
    self.jsonl.write(json.dumps(record) + '\n')
    self.jsonl.flush()
    if self.tb is not None and 'step' in record:
      for k, v in record.items():
        if isinstance(v, (int, float)) and k not in ('step', 'epoch'):
          self.tb.add_scalar(k, v, record['step'])
      self.tb.flush()

  def close(self):
    self.jsonl.close()
    if self.tb is not None:
      self.tb.close()
