"""Orbax checkpoints: the training state under WORKDIR/checkpoints, and the parameters an evaluation reads.

Saves are asynchronous, and `Checkpoints` is a context manager whose exit waits for them: an async save that the
process outlives unfinished is never committed. Restores take the current state as the template, so a checkpoint
written on one device count restores onto another. `restore_latest` falls back past a newest checkpoint that does
not restore, moving it aside. `load_params` reads a run's latest checkpoint or a converted Garg et al. checkpoint
(WORKDIR/garg_params, written by `python -m icl_jax.garg_checkpoint`).
"""

import concurrent.futures
import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from icl_jax import models
from icl_jax.runtime import errors
from icl_jax.runtime import storage

_ITEM = "default"  # The directory of the state inside a step's directory (the manager's one item).
_COMMITTED = "commit_success.txt"  # Orbax's mark of a complete step folder on Cloud Storage (no atomic rename).
GARG_PARAMS_DIR = "garg_params"  # A converted Garg et al. checkpoint's parameters, inside its workdir.


class CheckpointSaveError(errors.UserError, RuntimeError):
  """A checkpoint could not be written (permissions, a full disk, a path in the way, a save past its deadline,
  a stop requested while one was stuck). Orbax's save threads may stay blocked after it, so a program should
  exit at once (os._exit) with `exit_status` rather than wait for them; the checkpoints already committed are
  untouched."""

  def __init__(self, message: str, exit_status: int = 1):
    super().__init__(message)
    self.exit_status = exit_status


# A save may take train.checkpoint_timeout_s plus its size at this rate: the slowest link a run is expected on.
MIN_SAVE_BYTES_PER_S = 1e6
# Once a stop is requested (SIGTERM: a preemption leaves about 30 s), a save still running after this is
# abandoned: the run ends with the checkpoints already committed, rather than be killed in the middle.
STOP_GRACE_S = 15.0


class CheckpointRestoreError(errors.UserError, RuntimeError):
  """No checkpoint of the directory restores into the requested state; the message says which and why."""


class _Manager(ocp.CheckpointManager):
  """Orbax's manager, kept out of JAX's preemption service.

  The training loop asks the service about every step, in order (`train.poll_preemption`), and saves with
  force=True when the service answers. Orbax's own questions come from its finalize thread too, with the step of
  the checkpoint being committed: that moves the service's step count backwards at a moment no process controls,
  and if every process reports such an old step when a SIGTERM comes, the agreed step is one already passed and
  the run never stops.
  """

  def reached_preemption(self, step: int) -> bool:
    return False


class Checkpoints:
  """Keeps the last `keep_checkpoints` states plus every multiple of `keep_period`.

  No save waits forever: a save, and the wait for an earlier asynchronous one, has a deadline of
  `train.checkpoint_timeout_s` plus the state's size at MIN_SAVE_BYTES_PER_S, and once `stop_requested()` is true
  STOP_GRACE_S at most; past either the save is abandoned with CheckpointSaveError.
  """

  def __init__(self, directory: storage.Path, train: ml_collections.ConfigDict, stop_requested=lambda: False):
    self.directory = storage.path(directory)
    self._timeout_s = float(train.get("checkpoint_timeout_s", 600.0))
    self._stop_requested = stop_requested
    self._state_bytes = 0
    self._abandoned = False
    # One worker thread runs the manager's blocking calls (a standard-library thread: no frame of this package
    # appears in the tracebacks Orbax logs from it).
    self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoints")
    options = ocp.CheckpointManagerOptions(
      max_to_keep=train.keep_checkpoints,
      keep_period=train.keep_period or None,
      enable_async_checkpointing=True,
      create=True,
    )
    # The handler named, so that `item_metadata` can read a checkpoint's shapes before a restore is tried.
    self._manager = _Manager(self.directory, options=options, item_handlers=ocp.StandardCheckpointHandler())
    self._check_listing()

  def _check_listing(self) -> None:
    """CheckpointRestoreError if a committed step folder is missing from the manager's steps, read twice.

    Orbax decides that a directory holds no checkpoint when gcsfs's `isdir` is false, and gcsfs answers false
    to any OSError, a refused connection included: a run resuming through a storage error would start over
    beside its checkpoints and write over them. This listing raises instead."""
    try:
      missed = self._unlisted_committed_steps()
      if missed:
        self._manager.reload()
        missed = self._unlisted_committed_steps()
      if missed:
        raise CheckpointRestoreError(
          f"{self.directory} holds the committed checkpoints of steps {missed}, which Orbax did not list (a "
          "storage error while it looked?); nothing was started over: rerun once the storage answers"
        )
    except CheckpointRestoreError:
      self._manager.close()
      raise

  def _unlisted_committed_steps(self) -> list[int]:
    """Committed step folders (on gs://, with Orbax's commit_success.txt; on a disk, renamed into place) that
    the manager does not list."""
    known = set(self._manager.all_steps())
    try:
      names = [p.name for p in self.directory.iterdir()]
      candidates = sorted(int(n) for n in names if n.isdigit() and int(n) not in known)
      if storage.is_remote(self.directory):
        candidates = [s for s in candidates if _COMMITTED in {p.name for p in (self.directory / str(s)).iterdir()}]
    except FileNotFoundError:
      return []
    except Exception as e:  # noqa: BLE001  (gcsfs raises many types once its retries end)
      raise CheckpointRestoreError(f"cannot list the checkpoints in {self.directory}: {errors.one_line(e)}") from e
    return candidates

  def __enter__(self) -> "Checkpoints":
    return self

  def __exit__(self, exc_type, exc, traceback) -> None:
    if exc is None:
      self.close()
      return
    try:  # An error is already leaving the block: a failure to close must not replace it, nor wait long.
      self.close(deadline_s=STOP_GRACE_S)
    except CheckpointSaveError as close_error:
      # A save stuck or failed, and the manager could not close: Orbax's threads are in an unknown state (after a
      # failed save to an unreachable bucket they can hold the interpreter's shutdown for minutes), so the program
      # must leave at once (os._exit, cli.exit_with_error), with both errors in its one line.
      raise CheckpointSaveError(f"{errors.one_line(exc)}; then {close_error}", close_error.exit_status) from exc
    except Exception as close_error:  # noqa: BLE001
      logging.warning(
        "Closing the checkpoints in %s after an error failed too: %s", self.directory, errors.one_line(close_error)
      )

  def close(self, deadline_s: float | None = None) -> None:
    """Waits for the last asynchronous save and closes the manager, both within the save deadline (or
    `deadline_s`)."""
    if self._abandoned:  # Its threads are stuck: nothing more is asked of the manager.
      return
    # The manager's close waits for the last save first, and raises its error.
    error = self._bounded("saving a checkpoint", deadline_s, self._manager.close)
    if error is not None:  # The background save of the last step failed.
      raise CheckpointSaveError(f"saving a checkpoint in {self.directory} failed: {errors.one_line(error)}")
    self._worker.shutdown(wait=False)

  def _bounded(self, what: str, deadline_s: float | None, fn, *args, **kwargs) -> BaseException | None:
    """fn(*args, **kwargs) on the checkpoints' worker thread, waited for in the caller's thread until the save
    deadline (or `deadline_s`), and STOP_GRACE_S at most after a stop request; past either, or on Ctrl-C,
    CheckpointSaveError and the manager abandoned. Returns fn's error (None if it succeeded) without raising it:
    Orbax logs that same exception object later, and raising it here would add this package's frames to it.
    (Orbax's synchronous part of a save blocks for as long as its storage retries: the caller never does.)"""
    why = "while the run was ending on an error"
    if deadline_s is None:
      deadline_s = self._timeout_s + self._state_bytes / MIN_SAVE_BYTES_PER_S
      why = (
        f"(train.checkpoint_timeout_s = {self._timeout_s:g} plus {self._state_bytes / 1e6:.1f} MB at "
        f"{MIN_SAVE_BYTES_PER_S / 1e6:g} MB/s); is the storage still reachable?"
      )
    future = self._worker.submit(fn, *args, **kwargs)
    start, stop_seen = time.monotonic(), None
    try:
      while True:
        done, _ = concurrent.futures.wait([future], timeout=0.2)
        if done:
          return future.exception()
        now = time.monotonic()
        if stop_seen is None and self._stop_requested():
          stop_seen = now
        if stop_seen is not None and now - stop_seen > STOP_GRACE_S:
          self._abandon(
            f"{what} in {self.directory} was still running {STOP_GRACE_S:g} s after SIGTERM", errors.EXIT_PREEMPTED
          )
        if now - start > deadline_s:
          self._abandon(f"{what} in {self.directory} did not finish within {deadline_s:.0f} s {why}", 1)
    except KeyboardInterrupt:
      self._abandon(f"{what} in {self.directory} was interrupted (Ctrl-C)", errors.EXIT_INTERRUPTED)

  def _abandon(self, reason: str, exit_status: int) -> None:
    self._abandoned = True
    raise CheckpointSaveError(
      f"{reason}: abandoned it; the checkpoints committed before it are kept and a rerun resumes from the newest",
      exit_status,
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state) -> None:
    self._state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    # Also fails with the previous, asynchronous save (which it waits for first).
    error = self._bounded(
      f"saving step {step}", None, self._manager.save, step, args=ocp.args.StandardSave(state), force=True
    )
    if error is not None:
      raise CheckpointSaveError(
        f"saving a checkpoint in {self.directory} (step {step} or the one before) failed: {errors.one_line(error)}"
      )

  def restore(self, step: int, like, partial: bool = False):
    """The state saved at `step`, laid out like `like` (same tree, shapes, dtypes and shardings). With `partial`,
    `like` is a dict of some of the saved top-level entries (e.g. {"params": ...}) and only those are read, so
    that an evaluation builds no optimiser state."""
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), like)
    try:
      metadata = self._manager.item_metadata(step)
      if partial:
        _check_layout({k: v for k, v in dict(metadata).items() if k in abstract}, abstract)
        restore_args = jax.tree.map(
          lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype), abstract
        )
        return ocp.PyTreeCheckpointer().restore(
          self.directory / str(step) / _ITEM,
          args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True),
        )
      _check_layout(metadata, abstract)
      return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # Orbax and TensorStore raise many types for a mismatched or damaged checkpoint.
      raise CheckpointRestoreError(
        f"cannot restore the checkpoint {self.directory / str(step)} into this "
        "configuration's state (damaged, or written by a different model or optimiser?): "
        f"{errors.one_line(e)}"
      ) from e

  def restore_latest(self, like, partial: bool = False) -> tuple[object, int | None]:
    """(state, step) of the newest checkpoint that restores, or (like, None) when there is none.

    An unreadable newer checkpoint (truncated, junk, a failed copy) is moved aside to STEP.unreadable-TIME,
    kept for inspection, with a warning naming it and the reason; the one below it is tried next. When
    none restores, the newest one's error is raised (a different model or optimiser fails at every step).
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    first_error = None
    for step in steps:
      try:
        state = self.restore(step, like, partial)
      except CheckpointRestoreError as e:
        first_error = first_error or e
        continue
      if step != steps[0]:
        self._set_aside([s for s in steps if s > step], first_error)
      return state, step
    if first_error is not None:
      raise first_error
    return like, None

  def _set_aside(self, steps: list[int], reason: Exception) -> None:
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for step in steps:
      aside = self.directory / f"{step}.unreadable-{stamp}"
      if jax.process_index() == 0:
        (self.directory / str(step)).rename(aside)
      logging.warning(
        "The checkpoint %s does not restore; moved it to %s and resumed from an older one. The newest failure: %s",
        self.directory / str(step),
        aside,
        errors.one_line(reason),
      )
    self._manager.reload()


def _leaf_names(tree) -> dict:
  """{dotted path: leaf}, the path spelled as Orbax names a checkpoint's arrays (`opt_state.0.mu.h_0...`)."""
  return {
    jax.tree_util.keystr(path, simple=True, separator="."): leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _check_layout(saved, abstract) -> None:
  """Raises ValueError naming the first array whose shape or dtype differs between a checkpoint's metadata and
  the state it would restore into, or the arrays only one of them has. Checked before Orbax's restore, whose
  error for a different model size is one of TensorStore's, and whose asyncio threads print tracebacks while it
  unwinds."""
  saved_leaves, wanted_leaves = _leaf_names(saved), _leaf_names(abstract)
  for only_in, leaves in (
    ("the checkpoint", set(saved_leaves) - set(wanted_leaves)),
    ("this configuration's state", set(wanted_leaves) - set(saved_leaves)),
  ):
    if leaves:
      raise ValueError(f"only {only_in} has {len(leaves)} arrays, e.g. {sorted(leaves)[0]}")
  differ = [
    name
    for name, want in wanted_leaves.items()
    if (tuple(saved_leaves[name].shape), np.dtype(saved_leaves[name].dtype)) != (want.shape, want.dtype)
  ]
  if differ:
    saved_leaf, want = saved_leaves[differ[0]], wanted_leaves[differ[0]]
    raise ValueError(
      f"{differ[0]} is saved as {np.dtype(saved_leaf.dtype)}{list(saved_leaf.shape)}, this "
      f"configuration's state has {np.dtype(want.dtype)}{list(want.shape)}"
      + (f" ({len(differ) - 1} more arrays differ)" if len(differ) > 1 else "")
    )


def latest_step(config: ml_collections.ConfigDict, workdir: storage.Path) -> int | None:
  """The step of the latest checkpoint in WORKDIR/checkpoints (None without one)."""
  directory = storage.path(workdir) / "checkpoints"
  if not directory.exists():
    return None
  with Checkpoints(directory, config.train) as checkpoints:
    return checkpoints.latest_step()


def load_params(config: ml_collections.ConfigDict, workdir: storage.Path) -> tuple[dict, int | None]:
  """The parameters of the latest checkpoint in `workdir` and its step, or of a converted Garg et al.
  checkpoint (step None), on the first local device; no optimiser state is built or read."""
  workdir = storage.path(workdir)
  if (workdir / GARG_PARAMS_DIR).exists():
    return load_garg_params(workdir), None
  directory = workdir / "checkpoints"
  with Checkpoints(directory, config.train) as checkpoints:
    if checkpoints.latest_step() is None:
      raise errors.MissingFileError(
        f"{directory}: no checkpoint to evaluate; train first, or convert Garg et al.'s "
        "checkpoint with `python -m icl_jax.garg_checkpoint`."
      )
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    like = {
      "params": jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), _abstract_params(config)
      )
    }
    state, step = checkpoints.restore_latest(like, partial=True)
    return state["params"], step


def _abstract_params(config: ml_collections.ConfigDict):
  """Shapes and dtypes of the parameters of `config.model` for `config.task`, computed without any array."""
  model = models.build_model(config.model)
  xs_1xNxD = jax.ShapeDtypeStruct((1, config.task.n_points, config.task.n_dims), jnp.float32)
  ys_1xN = jax.ShapeDtypeStruct((1, config.task.n_points), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), xs_1xNxD, ys_1xN)["params"]


def load_saved_config(workdir: str | storage.Path) -> ml_collections.ConfigDict:
  """The configuration saved in WORKDIR/config.json."""
  path = storage.path(workdir) / "config.json"
  if not path.is_file():
    raise errors.MissingFileError(
      f"{path}: no such file; is {workdir} a workdir of icl_jax.main or icl_jax.garg_checkpoint?"
    )
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_garg_params(workdir: str | storage.Path) -> dict:
  """The parameters that `python -m icl_jax.garg_checkpoint` wrote to WORKDIR, as float32 numpy arrays in the
  tree of `models.build_model(load_saved_config(WORKDIR).model)`."""
  config = load_saved_config(workdir)
  path = storage.path(workdir) / GARG_PARAMS_DIR
  if not path.is_dir():
    raise errors.MissingFileError(
      f"{path}: no such directory; is {workdir} a workdir written by icl_jax.garg_checkpoint?"
    )
  like = _abstract_params(config)
  try:
    # Shapes without a sharding restore as numpy arrays: the caller places them on its own devices.
    return ocp.StandardCheckpointer().restore(path, like)
  except (ValueError, KeyError) as e:
    raise ValueError(
      f"{path} does not hold the parameters of the model in {storage.path(workdir) / 'config.json'}: {e}"
    ) from e
