"""`python tests/crash_driver.py ARGS`: launch.py with ARGS, as a user runs it, with one fault placed where a test
wants it (environment variables; unset ones place none):

  KDJAX_TEST_KILL_MID_EPOCH=n  SIGKILL to this process itself at its n-th dispatch or later that starts inside an
                               epoch (not at its first step): a crash mid-epoch, no handler or `finally` runs, and an
                               asynchronous checkpoint save may be in flight. The ids of this process's children
                               (Grain workers) are first written to KDJAX_TEST_MARKER when it is set.
  KDJAX_TEST_HANG_AT_SAVE=n    the n-th checkpoint save of this process stops in Orbax's commit, after its files are
                               written to the temporary '<step>.orbax-checkpoint-tmp-*' directory and before the rename
                               that finalizes it; the path of that directory is then written to
                               KDJAX_TEST_MARKER, and the test that waits for it sends SIGKILL: a kill inside a
                               checkpoint write, at a moment that does not depend on timing.
"""

import os
import runpy
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def children() -> list[int]:
  """The ids of this process's live child processes (from /proc)."""
  out = []
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      stat = open(f'/proc/{pid}/stat').read()
    except OSError:
      continue
    fields = stat.rsplit(')', 1)[1].split()  # after the command name: state, ppid, ...
    if int(fields[1]) == os.getpid() and fields[0] != 'Z':
      out.append(int(pid))
  return out


def _kill_mid_epoch(n: int, marker: str | None):
  from kdjax import trainer as trainer_lib
  original = trainer_lib.Trainer.train_chunk
  calls = {'n': 0}

  def chunk(self, ts, epoch, start):
    calls['n'] += 1
    if calls['n'] >= n and start > 0:
      if marker:
        with open(marker + '.tmp', 'w') as f:
          f.write(' '.join(map(str, children())))
        os.rename(marker + '.tmp', marker)
      os.kill(os.getpid(), signal.SIGKILL)
    return original(self, ts, epoch, start)

  trainer_lib.Trainer.train_chunk = chunk


def _hang_at_save(n: int, marker: str):
  from orbax.checkpoint._src.path import atomicity
  calls = {'n': 0}
  for cls in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
    original = cls.finalize

    async def finalize(self, *args, _original=original, **kw):
      step_level = os.path.basename(os.path.dirname(str(self.get()))) == 'checkpoints'  # not an item inside it
      calls['n'] += step_level
      if step_level and calls['n'] == n:
        with open(marker + '.tmp', 'w') as f:
          f.write(str(self.get()))
        os.rename(marker + '.tmp', marker)
        while True:  # the test's SIGKILL ends the process here
          time.sleep(1)
      return await _original(self, *args, **kw)

    cls.finalize = finalize


if __name__ == '__main__':
  sys.path.insert(0, ROOT)
  if os.environ.get('KDJAX_TEST_KILL_MID_EPOCH'):
    _kill_mid_epoch(int(os.environ['KDJAX_TEST_KILL_MID_EPOCH']), os.environ.get('KDJAX_TEST_MARKER'))
  if os.environ.get('KDJAX_TEST_HANG_AT_SAVE'):
    _hang_at_save(int(os.environ['KDJAX_TEST_HANG_AT_SAVE']), os.environ['KDJAX_TEST_MARKER'])
  sys.argv = [os.path.join(ROOT, 'launch.py'), *sys.argv[1:]]
  runpy.run_path(sys.argv[0], run_name='__main__')
