"""One process at a time per workdir: WORKDIR/lock.json names the holder (host, pid, start time, what it does).

Two trainings on one workdir would otherwise interleave their checkpoints and metrics.jsonl, and one could
delete the other's checkpoint in progress. The lock file is created only if none exists, atomically
(`storage.create_exclusively`: a hard link on a local disk, a conditional upload on gs://): exactly one of two
processes starting together gets it, and no reader sees a partial record. A lock whose holder is on this host
and no longer alive (a `kill -9`) is stale: it is removed, one taker winning (`storage.remove_if_unchanged`),
and taken over with a warning. A holder on another host cannot be checked from here: the error says how to
remove the file if that process is gone.

The same process may take the lock again (training that evaluates at its end); the file goes when the
outermost holder releases it. In a multi-process run, process 0 alone holds the lock (it is the one that
writes the run's files; the others write only their checkpoint shards).
"""

import contextlib
import datetime
import json
import os
import socket

from absl import logging

from icl_jax.runtime import errors
from icl_jax.runtime import storage

LOCK_FILE = "lock.json"
_held: dict[str, int] = {}  # Workdirs this process holds, with their nesting depth.


class WorkdirError(errors.UserError, RuntimeError):
  """A workdir that cannot be used (a file, read-only, full); the message names the path and the reason."""


class WorkdirLockedError(WorkdirError):
  """Another live process holds the workdir; the message names it."""


def prepare(workdir: storage.Path) -> None:
  """Creates `workdir` (and its parents) or raises WorkdirError saying why it cannot be one; a gs:// one is
  first checked to be writable by every client of the run (`storage.preflight`)."""
  workdir = storage.path(workdir)
  storage.preflight(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise WorkdirError(f"--workdir={workdir} is a file, not a directory")
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"--workdir={workdir}: cannot create it ({e.strerror or e})") from e


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Alive, but another user's.
    return True
  return True


def _read(path: storage.Path) -> tuple[dict, str] | None:
  """The lock's record and its text, or None if there is none."""
  try:
    text = path.read_text()
  except FileNotFoundError:
    return None
  try:
    return json.loads(text), text
  except (json.JSONDecodeError, UnicodeDecodeError):
    return {"purpose": "an unreadable lock file"}, text  # Not written by this module: never taken as stale.


def _describe(holder: dict) -> str:
  return (
    f"{holder.get('purpose', '?')} by pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
    f"started {holder.get('started', '?')}"
  )


def _acquire(workdir: storage.Path, purpose: str) -> None:
  path = workdir / LOCK_FILE
  record = {
    "host": socket.gethostname(),
    "pid": os.getpid(),
    "purpose": purpose,
    "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  for _ in range(2):  # A second try after taking over a stale lock.
    try:
      if storage.create_exclusively(path, json.dumps(record) + "\n"):
        return
    except OSError as e:
      raise WorkdirError(f"--workdir={workdir}: cannot create {path} ({e.strerror or e})") from e
    found = _read(path)
    if found is None:
      continue  # Released in between.
    holder, text = found
    same_host = holder.get("host") == record["host"]
    if not same_host or "pid" not in holder or _alive(int(holder["pid"])):
      remove = "" if same_host else f"; if that process is gone, delete {path}"
      raise WorkdirLockedError(
        f"{workdir} is in use: {_describe(holder)}{remove}. Wait for it, or use another --workdir."
      )
    if not storage.remove_if_unchanged(path, text):  # Another taker was first.
      continue
    logging.warning("%s: took over the stale lock of %s (no such process).", workdir, _describe(holder))
  raise WorkdirLockedError(f"{workdir}: could not take {path}; another process is taking it at the same moment.")


@contextlib.contextmanager
def hold(workdir: storage.Path, purpose: str, writer: bool = True):
  """Holds WORKDIR's lock for the `with` block (only if `writer`: process 0 of a multi-process run), after
  checking that a gs:// one is writable (`storage.preflight`)."""
  workdir = storage.path(workdir)
  storage.preflight(workdir)
  if not writer:
    yield
    return
  key = str(workdir)
  if key in _held:
    _held[key] += 1
  else:
    _acquire(workdir, purpose)
    _held[key] = 1
  error_in_flight = False
  try:
    yield
  except BaseException:
    error_in_flight = True
    raise
  finally:
    _held[key] -= 1
    if not _held[key]:
      del _held[key]
      _release(workdir, error_in_flight)


def _release(workdir: storage.Path, error_in_flight: bool) -> None:
  """Removes the lock; while an error ends the run on a gs:// workdir, within storage.CLEANUP_TIMEOUT_S (the
  storage may be what failed), else it is left for the next run to take over as stale."""
  unlink = lambda: (workdir / LOCK_FILE).unlink(missing_ok=True)
  if not (error_in_flight and storage.is_remote(workdir)):
    unlink()
    return
  try:
    storage.within(storage.CLEANUP_TIMEOUT_S, unlink)
  except (OSError, TimeoutError) as e:
    logging.warning("Left %s in place (%s); the next run takes it over.", workdir / LOCK_FILE, errors.one_line(e))
