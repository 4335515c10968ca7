"""One process at a time per workdir: WORKDIR/lock.json names the holder (host, pid, start time, what it does).

Two trainings on one workdir would otherwise interleave their checkpoints and metrics.jsonl, and one could
delete the other's checkpoint in progress. The lock is written whole under a temporary name, then hard-linked
to lock.json, which fails if lock.json exists: exactly one of two processes starting together gets it, and no
reader sees a partial record. A lock whose holder is on this host and no longer alive (a `kill -9`) is
stale: it is renamed away, one taker winning the rename, and taken over with a warning. A holder on another
host cannot be checked from here: the error says how to remove the file if that process is gone.

The same process may take the lock again (training that evaluates at its end); the file goes when the
outermost holder releases it. In a multi-process run, process 0 alone holds the lock (it is the one that
writes the run's files; the others write only their checkpoint shards).
"""

import contextlib
import datetime
import json
import os
import pathlib
import socket

from absl import logging

LOCK_FILE = "lock.json"
_held: dict[pathlib.Path, int] = {}  # Workdirs this process holds, with their nesting depth.


class WorkdirError(RuntimeError):
  """A workdir that cannot be used (a file, read-only, full); the message names the path and the reason."""


class WorkdirLockedError(WorkdirError):
  """Another live process holds the workdir; the message names it."""


def prepare(workdir: pathlib.Path) -> None:
  """Creates `workdir` (and its parents) or raises WorkdirError saying why it cannot be one."""
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


def _read(path: pathlib.Path) -> dict | None:
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    return None
  except (json.JSONDecodeError, UnicodeDecodeError):
    return {"purpose": "an unreadable lock file"}  # Not written by this module: never taken as stale.


def _describe(holder: dict) -> str:
  return (f"{holder.get('purpose', '?')} by pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
          f"started {holder.get('started', '?')}")


def _try_create(path: pathlib.Path, record: dict) -> bool:
  staged = path.with_name(f"{path.name}.{os.getpid()}.new")
  staged.write_text(json.dumps(record) + "\n")
  try:
    os.link(staged, path)  # Atomic, and fails if the lock exists.
  except FileExistsError:
    return False
  finally:
    staged.unlink(missing_ok=True)
  return True


def _acquire(workdir: pathlib.Path, purpose: str) -> None:
  path = workdir / LOCK_FILE
  record = {"host": socket.gethostname(), "pid": os.getpid(), "purpose": purpose,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  for _ in range(2):  # A second try after taking over a stale lock.
    if _try_create(path, record):
      return
    holder = _read(path)
    if holder is None:
      continue  # Released in between.
    same_host = holder.get("host") == record["host"]
    if not same_host or "pid" not in holder or _alive(int(holder["pid"])):
      remove = "" if same_host else f"; if that process is gone, delete {path}"
      raise WorkdirLockedError(f"{workdir} is in use: {_describe(holder)}{remove}. Wait for it, or use another "
                               "--workdir.")
    stale = path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
    try:
      path.rename(stale)  # Exactly one of several takers renames it.
    except FileNotFoundError:
      continue
    stale.unlink(missing_ok=True)
    logging.warning("%s: took over the stale lock of %s (no such process).", workdir, _describe(holder))
  raise WorkdirLockedError(f"{workdir}: could not take {path}; another process is taking it at the same moment.")


@contextlib.contextmanager
def hold(workdir: pathlib.Path, purpose: str, writer: bool = True):
  """Holds WORKDIR's lock for the `with` block (only if `writer`: process 0 of a multi-process run)."""
  workdir = pathlib.Path(workdir).absolute()
  if not writer:
    yield
    return
  if workdir in _held:
    _held[workdir] += 1
  else:
    _acquire(workdir, purpose)
    _held[workdir] = 1
  try:
    yield
  finally:
    _held[workdir] -= 1
    if not _held[workdir]:
      del _held[workdir]
      (workdir / LOCK_FILE).unlink(missing_ok=True)
