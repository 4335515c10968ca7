"""What a run writes besides checkpoints: WORKDIR/config.json, WORKDIR/metrics.jsonl, WORKDIR/provenance.json,
TensorBoard events (training scalars; an evaluation's summary numbers, figures and hyper-parameters).

Only process 0 writes, and logs progress. metrics.jsonl holds one JSON object per logged step so that a run can
be read without TensorBoard; when a run resumes from step s, records after s (from the interrupted attempt, which
will be recomputed) are dropped so the file stays one clean curve.
"""

import datetime
import importlib.metadata
import json
import logging as std_logging
import os
import pathlib
import platform
import subprocess
import time

import jax
from absl import logging

from icl_jax.runtime import errors
from icl_jax.runtime import storage
from icl_jax.runtime import workdir_lock

# Packages whose versions go into every provenance record.
VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml-collections", "numpy", "tensorflow-datasets")


def quiet_orbax() -> None:
  """Keeps only Orbax's warnings and errors in the absl log: it logs dozens of INFO lines per checkpoint.

  The filter sits on absl's logger, not its handler, so it works in notebooks too (no `app.run`). gcsfs and
  fsspec, which log an INFO line per file read from a gs:// workdir, are set to warnings too, and each of their
  warnings is logged once (gcsfs repeats its bucket-type warning at every file operation).
  """
  logging.get_absl_logger().addFilter(_orbax_filter)
  for name in ("gcsfs", "fsspec"):
    logger = std_logging.getLogger(name)
    logger.setLevel(std_logging.WARNING)
    if not any(isinstance(f, OnceFilter) for f in logger.filters):
      logger.addFilter(OnceFilter())


def _orbax_filter(record: std_logging.LogRecord) -> bool:
  """Drops Orbax's INFO lines and shortens its errors' tracebacks to one line: a failed save is reported once,
  by the program's own error line, and the exception Orbax logs has passed through this package's frames."""
  if "/orbax/" not in record.pathname:
    return True
  if record.levelno < std_logging.WARNING:
    return False
  if record.exc_info and record.exc_info[1] is not None:
    record.msg = f"{record.getMessage()} ({errors.one_line(record.exc_info[1])})"
    record.args, record.exc_info, record.exc_text = None, None, None
  return True


class OnceFilter(std_logging.Filter):
  """Passes each distinct message once."""

  def __init__(self):
    super().__init__()
    self._seen = set()

  def filter(self, record: std_logging.LogRecord) -> bool:
    message = record.getMessage()
    if message in self._seen:
      return False
    self._seen.add(message)
    return True


def is_writer() -> bool:
  return jax.process_index() == 0


def _git(*args: str) -> str | None:
  """A git command's output in the package's checkout, or None outside one (an installed wheel) or without git."""
  try:
    result = subprocess.run(
      ["git", *args],
      cwd=pathlib.Path(__file__).resolve().parent,
      capture_output=True,
      text=True,
      timeout=10,
      check=True,
    )
  except (OSError, subprocess.SubprocessError):
    return None
  return result.stdout.strip()


def provenance() -> dict:
  """Where a result comes from: package versions, the git commit (and whether tracked files differ from it), the
  devices and the date."""
  versions = {"python": platform.python_version()}
  for name in VERSIONED:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  commit = _git("rev-parse", "HEAD")
  status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
  devices = jax.devices()
  return {
    "versions": versions,
    "git_commit": commit,
    "git_dirty": None if status is None else bool(status),
    "platform": jax.default_backend(),
    "device_kind": devices[0].device_kind,
    "device_count": len(devices),
    "process_count": jax.process_count(),
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def write_evaluation_summary(
  workdir: storage.Path, step: int, scalars: dict[str, float], figures: list[storage.Path], hparams: dict
) -> None:
  """An evaluation's numbers as TensorBoard scalars, its PNG figures as images and the run's hyper-parameters
  (with those numbers as their metrics), in WORKDIR/tensorboard next to the training scalars."""
  import tensorboardX  # Deferred: only the writing process needs it.

  with (
    storage.LocalMirror(workdir / "tensorboard") as mirror,
    tensorboardX.SummaryWriter(os.fspath(mirror.local)) as writer,
  ):
    for tag, value in scalars.items():
      writer.add_scalar(tag, value, step)
    for path in figures:
      writer.add_image(f"eval/{path.stem}", storage.read_png(path)[..., :3], step, dataformats="HWC")
    writer.add_hparams(hparams, scalars, name="hparams", global_step=step)


def write_atomically(path: storage.Path, text: str | bytes) -> None:
  """Replaces `path` with `text` (or bytes), whole or not at all (storage.write_text_atomically), or raises WorkdirError
  naming it: the old file stays as it was."""
  try:
    storage.write_text_atomically(path, text)
  except OSError as e:  # A full disk, a read-only file system, a missing bucket.
    raise workdir_lock.WorkdirError(f"cannot write {path}: {e.strerror or e}") from e


def _complete_records(path: storage.Path) -> list[str]:
  """The lines of metrics.jsonl up to a torn tail: a process killed mid-write leaves a last line without its
  end, which is dropped with a warning (its step is trained again on resume)."""
  lines = [line for line in path.read_text().splitlines() if line]
  for i, line in enumerate(lines):
    try:
      json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
      dropped = len(lines) - i
      logging.warning(
        "%s: line %d is not a complete record (%r); dropping it and the %d line(s) after it.",
        path,
        i + 1,
        line[:80],
        dropped - 1,
      )
      return lines[:i]
  return lines


# A run projected to take longer than this on a CPU gets a warning: a GPU or TPU build of JAX may be missing.
CPU_WARNING_HOURS = 1.0


# On a gs:// workdir, TensorBoard's event files are uploaded at most this often (and when the run ends): each
# upload sends the whole growing file.
TENSORBOARD_SYNC_S = 120.0


class MetricsLog:
  """Appends records to metrics.jsonl and TensorBoard, and logs progress (steps/s, ETA) with absl. A context
  manager: its exit closes the events.

  On a gs:// workdir, where an object cannot be appended to, metrics.jsonl is uploaded whole at each record
  (a few hundred bytes per record; a 500k-step run logged every 100 steps ends near 1 MB)."""

  def __init__(self, workdir: storage.Path, start_step: int, num_steps: int):
    self._path = workdir / "metrics.jsonl"
    self._num_steps = num_steps
    self._writes = 0
    self._last = (start_step, time.perf_counter())
    self._tensorboard = self._mirror = None
    self._events = workdir / "tensorboard"
    self._remote = storage.is_remote(workdir)
    self._lines = []  # The records so far: a remote file is uploaded whole from them.
    if not is_writer():
      return
    if self._path.exists():
      self._lines = [line for line in _complete_records(self._path) if json.loads(line)["step"] <= start_step]
      write_atomically(self._path, "".join(line + "\n" for line in self._lines))
    import tensorboardX  # Deferred: only the writing process needs it.

    self._mirror = storage.LocalMirror(self._events, min_interval_s=TENSORBOARD_SYNC_S)
    self._tensorboard = tensorboardX.SummaryWriter(os.fspath(self._mirror.local))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    last_step, last_time = self._last
    now = time.perf_counter()
    steps_per_s = (step - last_step) / max(now - last_time, 1e-9)
    self._last = (step, now)
    record = {"step": step, **metrics, "steps_per_s": steps_per_s}
    if not is_writer():
      return
    eta_min = (self._num_steps - step) / max(steps_per_s, 1e-9) / 60
    self._writes += 1
    # The second record: the first interval includes compilation.
    if self._writes == 2 and jax.default_backend() == "cpu" and eta_min > 60 * CPU_WARNING_HOURS:
      logging.warning(
        "Training on CPU: at %.1f steps/s the remaining %d steps take about %.1f h. For a GPU or "
        "TPU install the matching JAX (README, 'Installs': jax[cuda12] or jax[tpu]).",
        steps_per_s,
        self._num_steps - step,
        eta_min / 60,
      )
    logging.info(
      "step %d/%d  loss %.5g  loss/d %.5g  |grad| %.3g  lr %.3g  dims %d  points %d  %.1f steps/s  ETA %.1f min",
      step,
      self._num_steps,
      metrics["loss"],
      metrics["loss_per_dim"],
      metrics["grad_norm"],
      metrics["learning_rate"],
      metrics["n_dims"],
      metrics["n_points"],
      steps_per_s,
      eta_min,
    )
    line = json.dumps(record)
    if self._remote:
      self._lines.append(line)
      write_atomically(self._path, "".join(line + "\n" for line in self._lines))
    else:
      try:
        with self._path.open("a") as f:
          f.write(line + "\n")
      except OSError as e:
        raise workdir_lock.WorkdirError(f"cannot append to {self._path}: {e.strerror or e}") from e
    try:
      for name, value in record.items():
        if name != "step":
          self._tensorboard.add_scalar(_TENSORBOARD_TAGS.get(name, name), value, step)
      if self._remote:
        self._tensorboard.flush()
        self._mirror.sync()
    except OSError as e:
      raise self._events_error(e) from e

  def __enter__(self) -> "MetricsLog":
    return self

  def __exit__(self, exc_type, exc, traceback) -> None:
    self.close(error_in_flight=exc_type is not None)

  def close(self, error_in_flight: bool = False) -> None:
    """Flushes and closes the TensorBoard events (uploads them, on gs://). A failure (a full disk) raises
    WorkdirError naming the directory; with `error_in_flight` (another error is already ending the run, often of
    the same cause) it is only logged, so that the first error is the one reported."""
    if self._tensorboard is None:
      return

    def close():
      self._tensorboard.close()
      self._mirror.close()

    try:
      if error_in_flight and self._remote:  # The storage may be what failed: its retries must not hold the exit.
        storage.within(storage.CLEANUP_TIMEOUT_S, close)
      else:
        close()
    except (OSError, TimeoutError) as e:
      if not error_in_flight:
        raise self._events_error(e) from e
      logging.warning("%s", self._events_error(e))
      self._mirror.discard()  # The storage did not take the events: the local copy would outlive the process.

  def _events_error(self, error: Exception) -> workdir_lock.WorkdirError:
    return workdir_lock.WorkdirError(
      f"cannot write the TensorBoard events in {self._events}: {getattr(error, 'strerror', None) or error}"
    )


_TENSORBOARD_TAGS = {
  "loss_per_dim": "loss/d",
  "n_dims": "curriculum/n_dims",
  "n_points": "curriculum/n_points",
  "learning_rate": "optim/learning_rate",
  "grad_norm": "optim/grad_norm",
  "steps_per_s": "perf/steps_per_s",
}
