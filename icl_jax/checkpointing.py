"""Orbax checkpoints: the training state under WORKDIR/checkpoints, and the parameters an evaluation reads.

Saves are asynchronous, and `Checkpoints` is a context manager whose exit waits for them: an async save that
the process outlives unfinished is never committed. Restores take the current state as the template, so a
checkpoint written on one device count restores onto another. `load_params` reads a run's latest checkpoint or
a converted Garg et al. checkpoint (WORKDIR/garg_params, written by `python -m icl_jax.garg_checkpoint`).
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from icl_jax import models
from icl_jax import optim
from icl_jax import train_step

GARG_PARAMS_DIR = "garg_params"  # A converted Garg et al. checkpoint's parameters, inside its workdir.


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


def load_params(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> tuple[dict, int | None]:
  """The parameters of the latest checkpoint in `workdir` and its step, or of a converted Garg et al.
  checkpoint (step None)."""
  workdir = pathlib.Path(workdir)
  if (workdir / GARG_PARAMS_DIR).exists():
    return load_garg_params(workdir), None
  directory = workdir / "checkpoints"
  with Checkpoints(directory, config.train) as checkpoints:
    step = checkpoints.latest_step()
    if step is None:
      raise FileNotFoundError(f"{directory}: no checkpoint to evaluate; train first, or convert Garg et al.'s "
                              "checkpoint with `python -m icl_jax.garg_checkpoint`.")
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), (train_step.AXIS,))
    like = train_step.init_state(config, models.build_model(config.model), optim.make_optimizer(config.train), mesh)
    return checkpoints.restore(step, like).params, step


def load_saved_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
  """The configuration saved in WORKDIR/config.json."""
  path = pathlib.Path(workdir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file; is {workdir} a workdir of icl_jax.main or "
                            "icl_jax.garg_checkpoint?")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_garg_params(workdir: str | pathlib.Path) -> dict:
  """The parameters that `python -m icl_jax.garg_checkpoint` wrote to WORKDIR, as float32 numpy arrays in the
  tree of `models.build_model(load_saved_config(WORKDIR).model)`."""
  config = load_saved_config(workdir)
  path = (pathlib.Path(workdir) / GARG_PARAMS_DIR).absolute()
  if not path.is_dir():
    raise FileNotFoundError(f"{path}: no such directory; is {workdir} a workdir written by icl_jax.garg_checkpoint?")
  model = models.build_model(config.model)
  xs_1xNxD = jnp.zeros((1, config.task.n_points, config.task.n_dims))
  like = jax.eval_shape(model.init, jax.random.key(0), xs_1xNxD, xs_1xNxD[..., 0])["params"]
  try:
    # Shapes without a sharding restore as numpy arrays: the caller places them on its own devices.
    return ocp.StandardCheckpointer().restore(path, like)
  except (ValueError, KeyError) as e:
    raise ValueError(f"{path} does not hold the parameters of the model in {pathlib.Path(workdir) / 'config.json'}: "
                     f"{e}") from e
