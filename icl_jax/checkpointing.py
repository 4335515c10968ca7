"""Orbax checkpoints of the whole training state under WORKDIR/checkpoints.

Saves are asynchronous, and `Checkpoints` is a context manager whose exit waits for them: an async save that
the process outlives unfinished is never committed (ecosystem.md §7). Restores take the current state as the
template, so a checkpoint written on one device count restores onto another.
"""

import pathlib

import jax
import ml_collections
import orbax.checkpoint as ocp


class Checkpoints:
  """Keeps the last `keep_checkpoints` states plus every multiple of `keep_period`."""

  def __init__(self, directory: pathlib.Path, train: ml_collections.ConfigDict):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=train.keep_checkpoints, keep_period=train.keep_period or None,
                                           enable_async_checkpointing=True, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def __enter__(self) -> "Checkpoints":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state) -> None:
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def restore(self, step: int, like):
    """The state saved at `step`, laid out like `like` (same tree, shapes, dtypes and shardings)."""
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), like)
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise RuntimeError(f"cannot restore the checkpoint {self.directory / str(step)} into this configuration's "
                         f"state (was it written by a different model or optimiser?): {e}") from e
