"""The errors a user causes and can fix, and one-line descriptions of any exception.

Every program catches `UserError` alone and prints its message as one `error:` line with exit status 1; any
other exception is a bug and keeps its traceback.
"""

# Exit status of a run stopped by SIGTERM with its checkpoints kept: EX_TEMPFAIL of sysexits.h ("try again
# later"), distinct from 0 (finished) and 1 (failed), so that a scheduler can requeue exactly these runs.
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports it.


class UserError(Exception):
  """An error the user can fix (a field, a file, a flag, a workdir); the message names it and says how."""


class ConfigError(UserError, ValueError):
  """An invalid configuration; the message names each offending field and its allowed values."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or directory the run needs is not there; the message says which program writes it."""


class NonFiniteError(UserError, FloatingPointError):
  """A loss or prediction that is inf or nan; the message says where and what was kept."""


def one_line(error: BaseException, limit: int = 300) -> str:
  """ "Type: first line of the message", at most ~`limit` characters of it: its start and its end, where
  TensorStore and ArrayRecord put the operating system's reason ("No space left on device")."""
  text = str(error).strip()
  if not text:
    return type(error).__name__
  line = text.splitlines()[0]
  if len(line) > limit:
    line = line[: limit // 2 - 10] + " ... " + line[-(limit // 2 + 10) :]
  return f"{type(error).__name__}: {line}"
