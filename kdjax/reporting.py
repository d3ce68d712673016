"""Console progress, `metrics.jsonl` and TensorBoard event files for a run."""

from __future__ import annotations

import json
import logging as logging_std
import os
import sys
import time

from absl import logging

from kdjax import atomic


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


def _truncate(path: str, step: int):
  """Keeps the per-epoch records of `path` up to `step` (the restored checkpoint's): an attempt killed after its
  last checkpoint wrote records that the resumed run writes again, and the summary comes again at the end."""
  if not os.path.exists(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:  # a line cut by a kill
        continue
      if 'summary' not in record and record.get('step', 0) <= step:
        kept.append(line if line.endswith('\n') else line + '\n')
  with atomic.writing(path) as f:
    f.writelines(kept)


class Reporter:
  """Per epoch: one console line, and one `metrics.jsonl` record and TensorBoard scalars per student (a sweep's
  students write TensorBoard runs of their own, `tensorboard/student_<i>`)."""

  def __init__(self, workdir: str, total_epochs: int, steps_per_epoch: int, names=('run',),
               tensorboard: bool = True, resume_step: int = 0, write: bool = True):
    """`write=False` (the processes other than 0 of a multi-host run): no files, no console lines."""
    self.total_epochs = total_epochs
    self.steps_per_epoch = steps_per_epoch
    self.names = list(names)
    self.enabled = write
    self.jsonl = None
    self.tb = []
    if write:
      path = os.path.join(workdir, 'metrics.jsonl')
      _truncate(path, resume_step)
      self.jsonl = open(path, 'a')
    if tensorboard and write:
      from tensorboardX import SummaryWriter
      root = os.path.join(workdir, 'tensorboard')
      # purge_step drops the events an earlier attempt wrote past the restored step.
      self.tb = [SummaryWriter(root if len(self.names) == 1 else os.path.join(root, f'student_{i}'),
                               purge_step=resume_step + 1 if resume_step else None)
                 for i in range(len(self.names))]
    self.tty = sys.stderr.isatty() and write
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

  def epoch(self, epoch: int, step: int, records: list, epoch_seconds: float, images: int):
    """Logs the epoch line and writes one record per student. `epoch` counts from 0; `images` is the number of
    training images of the epoch (each student saw them all)."""
    self.epoch_times.append(epoch_seconds)
    if not self.enabled:
      return
    recent = self.epoch_times[-5:] if len(self.epoch_times) > 1 else self.epoch_times
    # The first epoch includes compilation; once later epochs exist, the ETA ignores it.
    per_epoch = sum(recent[1:] or recent) / len(recent[1:] or recent)
    eta = per_epoch * (self.total_epochs - epoch - 1)
    img_per_s = images / max(epoch_seconds, 1e-9)
    # None: a student that no longer trains (its group of a table is shorter than the program): no record.
    records = [dict(r, epoch=epoch + 1, step=step, student=i, img_per_s=img_per_s, epoch_seconds=epoch_seconds)
               for i, r in enumerate(records) if r is not None]

    def stat(key):
      v = [r[key] for r in records]
      return f'{v[0]:.4f}' if len(v) == 1 else f'{sum(v) / len(v):.4f} ({min(v):.4f}-{max(v):.4f})'

    parts = [f'epoch {epoch + 1}/{self.total_epochs}']
    if len(records) > 1:
      parts.append(f'{len(records)} students, mean (min-max)')
    parts += [f"loss {stat('train_loss')}", f"train acc {stat('train_accuracy')}"]
    for split in ('val', 'test'):
      if f'{split}_accuracy' in records[0]:
        parts.append(f"{split} acc {stat(f'{split}_accuracy')}")
    rate = f'{img_per_s:.0f} img/s' + (f' ({img_per_s * len(records):.0f} student-img/s)' if len(records) > 1
                                       else '')
    parts += [rate, f'ETA {_fmt_time(eta)}']
    logging.info(' | '.join(parts))
    for r in records:
      self.write(r, r['student'])

  def write(self, record: dict, student: int = 0):
    if self.jsonl is None:
      return
    self.jsonl.write(json.dumps(record) + '\n')
    self.jsonl.flush()
    if self.tb and 'step' in record:
      tb = self.tb[student]
      for k, v in record.items():
        if isinstance(v, (int, float)) and k not in ('step', 'epoch', 'student'):
          tb.add_scalar(k, v, record['step'])
      tb.flush()

  def close(self):
    if self.jsonl is not None:
      self.jsonl.close()
    for tb in self.tb:
      tb.close()
