"""Errors that mean "the input is wrong", reported as one line by launch.py (no traceback)."""


class KDError(Exception):
  """Base of the errors a user can fix from the message alone."""


class ConfigError(KDError, ValueError):
  pass


class DatasetNotFoundError(KDError, RuntimeError):
  pass


class CheckpointNotFoundError(KDError, FileNotFoundError):
  pass


class CheckpointMismatchError(KDError, ValueError):
  """A checkpoint holds another network than the one the config names."""


class Preempted(KDError):
  """A SIGTERM arrived; the checkpoint of the current step is on disk."""


class NonFiniteError(KDError):
  """A training step produced a non-finite loss or gradient; nothing after the last good checkpoint was saved."""


class WorkdirInUse(KDError):
  """Another live process holds the workdir's lock."""
