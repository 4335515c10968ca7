"""The training side of a configuration checked before anything is compiled: task, model, training and the
frozen evaluation set. `analysis.evaluate.validate` adds the evaluation's fields and reports every problem of
both in one message."""

import ml_collections

from icl_jax import data
from icl_jax import datasets
from icl_jax import models
from icl_jax import optim
from icl_jax import train_step
from icl_jax.runtime.config_fields import check_choice
from icl_jax.runtime.config_fields import check_int
from icl_jax.runtime.config_fields import check_real
from icl_jax.runtime.config_fields import get
from icl_jax.runtime.config_fields import is_int
from icl_jax.runtime.config_fields import is_real
from icl_jax.runtime.config_fields import present


def _task_errors(config) -> list[str]:
  found = []
  check_int(found, config, "seed", 0)
  check_int(found, config, "task.n_dims", 1)
  check_int(found, config, "task.n_points", 1)
  check_real(found, config, "task.kappa", 1.0)
  check_real(found, config, "task.noise_std", 0.0)
  check_choice(found, config, "task.spectrum", data.SPECTRA)
  check_choice(found, config, "task.rotation", data.ROTATIONS)
  check_choice(found, config, "task.normalize_trace", (True, False))
  check_choice(found, config, "task.curriculum.enabled", (True, False))
  if config.task.curriculum.enabled:
    for prefix, end in (("dims", "n_dims"), ("points", "n_points")):
      check_int(found, config, f"task.curriculum.{prefix}_start", 1)
      check_int(found, config, f"task.curriculum.{prefix}_increment", 0)
      check_int(found, config, f"task.curriculum.{prefix}_interval", 1)
      start, stop = get(config, f"task.curriculum.{prefix}_start"), get(config, f"task.{end}")
      if is_int(start) and is_int(stop) and start > stop:
        found.append(
          f"config.task.curriculum.{prefix}_start = {start} exceeds config.task.{end} = {stop}: "
          f"allowed values are 1..{stop}"
        )
  return found


# jax.default_matmul_precision's names for float32 matmuls: platform default, 3 bfloat16 passes, full float32.
MATMUL_PRECISIONS = ("default", "high", "highest")


def _train_errors(config, num_devices: int) -> list[str]:
  found = []
  for field in ("num_steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints", "steps_per_dispatch"):
    check_int(found, config, f"train.{field}", 1)
  check_int(found, config, "train.keep_period", 0)
  check_int(found, config, "train.warmup_steps", 0)
  check_real(found, config, "train.learning_rate", 0.0, strict=True)
  if present(config, "train.checkpoint_timeout_s"):
    check_real(found, config, "train.checkpoint_timeout_s", 0.0, strict=True)
  check_real(found, config, "train.grad_clip_norm", 0.0)
  check_real(found, config, "train.weight_decay", 0.0)
  check_real(found, config, "train.adam_eps", 0.0, strict=True)
  for beta in ("adam_b1", "adam_b2"):
    value = config.train.get(beta)
    if not (is_real(value) and 0 <= value < 1):
      found.append(f"config.train.{beta} = {value!r}: must be a number in [0, 1)")
  check_choice(found, config, "train.schedule", optim.SCHEDULES)
  check_choice(found, config, "train.matmul_precision", MATMUL_PRECISIONS)
  batch = config.train.batch_size
  if is_int(batch) and batch >= 1 and batch % num_devices:
    found.append(
      f"config.train.batch_size = {batch} is not divisible by the {num_devices} devices: allowed "
      f"values are multiples of {num_devices}"
    )
  return found


def _ahn_errors(config) -> list[str]:
  """The options of Ahn et al.'s setting (configs/lsa.py): explicit spectrum, per-run eigenbasis, w ~ N(0,
  Sigma^-1), batches resampled every k steps, last-position loss, per-matrix clipping, step-decay schedule."""
  found = []
  if present(config, "task.w_distribution"):
    check_choice(found, config, "task.w_distribution", data.W_DISTRIBUTIONS)
  if present(config, "task.resample_every"):
    check_int(found, config, "task.resample_every", 1)
  if get(config, "task.spectrum") == "explicit":
    values, n_dims = get(config, "task.eigenvalues"), get(config, "task.n_dims")
    if not (isinstance(values, (tuple, list)) and len(values) == n_dims and all(is_real(v) and v > 0 for v in values)):
      found.append(
        f"config.task.eigenvalues = {values!r}: with config.task.spectrum = 'explicit' must be a tuple "
        f"of config.task.n_dims = {n_dims!r} numbers > 0 (the eigenvalues of Cov(x))"
      )
  if get(config, "task.rotation") == "per_run":
    check_int(found, config, "task.rotation_seed", 0)
  if present(config, "train.loss_positions"):
    check_choice(found, config, "train.loss_positions", train_step.LOSS_POSITIONS)
  if present(config, "train.clip_per_matrix"):
    check_real(found, config, "train.clip_per_matrix", 0.0)
  if get(config, "train.schedule") == "step_decay":
    check_int(found, config, "train.decay_every", 1)
    factor = get(config, "train.decay_factor")
    if not (is_real(factor) and 0 < factor <= 1):
      found.append(
        f"config.train.decay_factor = {factor!r}: with config.train.schedule = 'step_decay' must be a number in (0, 1]"
      )
  return found


def errors(config: ml_collections.ConfigDict, num_devices: int) -> list[str]:
  """One line for each invalid training-side field of `config` for a run on `num_devices` devices."""
  found = _task_errors(config) + _train_errors(config, num_devices) + _ahn_errors(config)
  family = config.model.get("family")
  if family not in models.REGISTRY:
    found.append(f"config.model.family = {family!r}: allowed values are {', '.join(map(repr, models.REGISTRY))}")
  elif not any(e.startswith(("config.task.n_points", "config.task.n_dims")) for e in found):
    found += models.REGISTRY[family].validate(config.model, config.task)
  return found + datasets.config_errors(config)
