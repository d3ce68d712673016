"""Files rewritten whole (config.json, sweep.json, summary.json, results.csv, figures, cache entries) are written
through `writing`: a reader, or a run resumed after a crash, sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import uuid


@contextlib.contextmanager
def writing(path: str, mode: str = 'w', **open_kwargs):
  """Yields a file open for writing in place of `path`: a temporary file in the same directory that, once the block
  ends without an exception, is flushed, synced to disk and renamed over `path` (one atomic step on POSIX). On an
  exception the temporary file is removed and `path` is left as it was. `open_kwargs` go to `open` (`newline=''`
  for the csv module)."""
  directory = os.path.dirname(os.path.abspath(path))
  tmp = os.path.join(directory, f'.{os.path.basename(path)}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp')
  # os.open's mode goes through the umask: the file gets the permissions `open` would give it (mkstemp's are 0600).
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with open(fd, mode, **open_kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise
  _sync_directory(directory)


def _sync_directory(directory: str):
  """Makes the rename itself durable (a crash right after it could otherwise bring back the old file)."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:  # some filesystems refuse to sync a directory; the rename is then as durable as they make it
    pass
  finally:
    os.close(fd)
