"""Checks a whole configuration before anything is compiled, and reports every problem in one message."""

import math
import numbers

import ml_collections

from icl_jax import data
from icl_jax import datasets
from icl_jax import models
from icl_jax import optim
from icl_jax import train_step
from icl_jax.analysis import algorithms
from icl_jax.analysis import probes


ONLINE_GD = ("projection", "fixed_step")  # config.eval.online_gd: Fu et al.'s paper's variant, or their code's.


class ConfigError(ValueError):
  """An invalid configuration; the message names each offending field and its allowed values."""


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
  """A finite number (not a bool): inf and nan pass no check."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _non_finite_errors(node, prefix: str = "config") -> dict[str, str]:
  """{field: error} for every float field (or float in a tuple field) anywhere in the config that is inf or
  nan: no field of any section means anything with those, and they would otherwise compile and fail (or, as
  adam_eps = inf, train with zero updates)."""
  errors = {}
  for name, value in (node.items() if isinstance(node, ml_collections.ConfigDict) else ()):
    path = f"{prefix}.{name}"
    if isinstance(value, ml_collections.ConfigDict):
      errors.update(_non_finite_errors(value, path))
    elif isinstance(value, (tuple, list)) and any(isinstance(v, float) and not math.isfinite(v) for v in value):
      errors[path] = f"{path} = {value!r}: every number must be finite"
    elif isinstance(value, float) and not math.isfinite(value):
      errors[path] = f"{path} = {value!r}: must be a finite number"
  return errors


def _check_int(errors, config, path, minimum):
  value = _get(config, path)
  if not _is_int(value) or value < minimum:
    errors.append(f"config.{path} = {value!r}: must be an integer >= {minimum}")


def _check_real(errors, config, path, minimum, strict=False):
  value = _get(config, path)
  ok = _is_real(value) and (value > minimum if strict else value >= minimum)
  if not ok:
    errors.append(f"config.{path} = {value!r}: must be a number {'>' if strict else '>='} {minimum}")


def _check_choice(errors, config, path, allowed):
  value = _get(config, path)
  if value not in allowed:
    errors.append(f"config.{path} = {value!r}: allowed values are {', '.join(map(repr, allowed))}")


def _get(config, path):
  node = config
  for part in path.split("."):
    node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
  return node


def _task_errors(config) -> list[str]:
  errors = []
  _check_int(errors, config, "seed", 0)
  _check_int(errors, config, "task.n_dims", 1)
  _check_int(errors, config, "task.n_points", 1)
  _check_real(errors, config, "task.kappa", 1.0)
  _check_real(errors, config, "task.noise_std", 0.0)
  _check_choice(errors, config, "task.spectrum", data.SPECTRA)
  _check_choice(errors, config, "task.rotation", data.ROTATIONS)
  _check_choice(errors, config, "task.normalize_trace", (True, False))
  _check_choice(errors, config, "task.curriculum.enabled", (True, False))
  if config.task.curriculum.enabled:
    for prefix, end in (("dims", "n_dims"), ("points", "n_points")):
      _check_int(errors, config, f"task.curriculum.{prefix}_start", 1)
      _check_int(errors, config, f"task.curriculum.{prefix}_increment", 0)
      _check_int(errors, config, f"task.curriculum.{prefix}_interval", 1)
      start, stop = _get(config, f"task.curriculum.{prefix}_start"), _get(config, f"task.{end}")
      if _is_int(start) and _is_int(stop) and start > stop:
        errors.append(f"config.task.curriculum.{prefix}_start = {start} exceeds config.task.{end} = {stop}: "
                      f"allowed values are 1..{stop}")
  return errors


# jax.default_matmul_precision's names for float32 matmuls: platform default, 3 bfloat16 passes, full float32.
MATMUL_PRECISIONS = ("default", "high", "highest")


def _train_errors(config, num_devices: int) -> list[str]:
  errors = []
  for field in ("num_steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints",
                "steps_per_dispatch"):
    _check_int(errors, config, f"train.{field}", 1)
  _check_int(errors, config, "train.keep_period", 0)
  _check_int(errors, config, "train.warmup_steps", 0)
  _check_real(errors, config, "train.learning_rate", 0.0, strict=True)
  _check_real(errors, config, "train.grad_clip_norm", 0.0)
  _check_real(errors, config, "train.weight_decay", 0.0)
  _check_real(errors, config, "train.adam_eps", 0.0, strict=True)
  for beta in ("adam_b1", "adam_b2"):
    value = config.train.get(beta)
    if not (_is_real(value) and 0 <= value < 1):
      errors.append(f"config.train.{beta} = {value!r}: must be a number in [0, 1)")
  _check_choice(errors, config, "train.schedule", optim.SCHEDULES)
  _check_choice(errors, config, "train.matmul_precision", MATMUL_PRECISIONS)
  batch = config.train.batch_size
  if _is_int(batch) and batch >= 1 and batch % num_devices:
    errors.append(f"config.train.batch_size = {batch} is not divisible by the {num_devices} devices: allowed "
                  f"values are multiples of {num_devices}")
  return errors


def _present(config, path) -> bool:
  """Whether the field exists: the options below are optional, and absent means their default."""
  section, _, name = path.rpartition(".")
  node = _get(config, section)
  return isinstance(node, ml_collections.ConfigDict) and name in node


def _ahn_errors(config) -> list[str]:
  """The options of Ahn et al.'s setting (configs/lsa.py): explicit spectrum, per-run eigenbasis, w ~ N(0,
  Sigma^-1), batches resampled every k steps, last-position loss, per-matrix clipping, step-decay schedule."""
  errors = []
  if _present(config, "task.w_distribution"):
    _check_choice(errors, config, "task.w_distribution", data.W_DISTRIBUTIONS)
  if _present(config, "task.resample_every"):
    _check_int(errors, config, "task.resample_every", 1)
  if _get(config, "task.spectrum") == "explicit":
    values, n_dims = _get(config, "task.eigenvalues"), _get(config, "task.n_dims")
    if not (isinstance(values, (tuple, list)) and len(values) == n_dims and
            all(_is_real(v) and v > 0 for v in values)):
      errors.append(f"config.task.eigenvalues = {values!r}: with config.task.spectrum = 'explicit' must be a tuple "
                    f"of config.task.n_dims = {n_dims!r} numbers > 0 (the eigenvalues of Cov(x))")
  if _get(config, "task.rotation") == "per_run":
    _check_int(errors, config, "task.rotation_seed", 0)
  if _present(config, "train.loss_positions"):
    _check_choice(errors, config, "train.loss_positions", train_step.LOSS_POSITIONS)
  if _present(config, "train.clip_per_matrix"):
    _check_real(errors, config, "train.clip_per_matrix", 0.0)
  if _get(config, "train.schedule") == "step_decay":
    _check_int(errors, config, "train.decay_every", 1)
    factor = _get(config, "train.decay_factor")
    if not (_is_real(factor) and 0 < factor <= 1):
      errors.append(f"config.train.decay_factor = {factor!r}: with config.train.schedule = 'step_decay' must be "
                    "a number in (0, 1]")
  return errors


def _eval_errors(config) -> list[str]:
  errors = []
  for field in ("num_prompts", "batch_size", "bootstrap_samples", "probe_prompts", "probe_steps", "probe_batch_size",
                "newton_steps", "cg_steps", "bfgs_steps", "lbfgs_steps", "lbfgs_memory", "sim_w_prompts"):
    _check_int(errors, config, f"eval.{field}", 1)
  _check_real(errors, config, "eval.probe_ridge", 0.0)
  _check_real(errors, config, "eval.ridge", 0.0)
  _check_choice(errors, config, "eval.online_gd", ONLINE_GD)
  _check_real(errors, config, "eval.online_gd_learning_rate", 0.0, strict=True)
  _check_real(errors, config, "eval.probe_learning_rate", 0.0, strict=True)
  _check_real(errors, config, "eval.gd_learning_rate", 0.0, strict=True)
  confidence = config.eval.get("confidence")
  if not (_is_real(confidence) and 0 < confidence < 1):
    errors.append(f"config.eval.confidence = {confidence!r}: must be a number in (0, 1)")
  _check_choice(errors, config, "eval.readout", probes.READOUTS)
  _check_choice(errors, config, "eval.probe_init", probes.PROBE_INITS)
  _check_choice(errors, config, "eval.newton_alpha", algorithms.NEWTON_ALPHAS)
  _check_choice(errors, config, "eval.gd_gradient_scale", algorithms.GRADIENT_SCALES)
  for flag in ("after_training", "sim_e_include_first"):
    _check_choice(errors, config, f"eval.{flag}", (True, False))
  for grid in ("gd_steps", "gd_log_steps"):
    steps = config.eval.get(grid)
    if not (isinstance(steps, (tuple, list)) and steps and all(_is_int(s) and s >= 1 for s in steps)):
      errors.append(f"config.eval.{grid} = {steps!r}: must be a non-empty tuple of integers >= 1")
  queries, n_dims = config.eval.get("sim_w_queries"), config.task.get("n_dims")
  if _is_int(n_dims) and not (_is_int(queries) and queries >= n_dims):
    errors.append(f"config.eval.sim_w_queries = {queries!r}: must be an integer >= config.task.n_dims = {n_dims} "
                  "(the induced weights are a least-squares fit to the queries)")
  # Only the form: whether the layers exist is checked against the evaluated model (`probing.fit_layers`), so
  # that a checkpoint of any depth can be converted with the paper's configuration.
  layers = config.eval.get("fit_layers")
  if layers is not None and not (isinstance(layers, (tuple, list)) and len(layers) == 2 and
                                 all(_is_int(v) for v in layers) and 1 <= layers[0] <= layers[1]):
    errors.append(f"config.eval.fit_layers = {layers!r}: must be (first, last) with 1 <= first <= last <= the "
                  "number of layers, or None for the middle layers")
  return errors + dataset_errors(config)


def dataset_errors(config) -> list[str]:
  """Problems with the frozen evaluation set named by config.eval.dataset_dir and dataset_setting: it must
  be built, read back whole with its hashes, be of the task's d and n, and hold at least eval.num_prompts
  prompts."""
  directory, setting = config.eval.get("dataset_dir"), config.eval.get("dataset_setting")
  if not isinstance(directory, str):
    return [f"config.eval.dataset_dir = {directory!r}: must be a directory, or '' for fresh prompts"]
  if not directory:
    return []
  if setting not in datasets.SETTINGS:
    return [f"config.eval.dataset_setting = {setting!r}: allowed values are {', '.join(map(repr, datasets.SETTINGS))}"]
  try:  # Reads every file and checks the hashes (0.3 s for 1280 prompts), before any compute.
    xs_BxNxD, _, _ = datasets.load_prompts(directory, setting)
  except (FileNotFoundError, datasets.DatasetError) as e:
    return [f"config.eval.dataset_dir = {directory!r}: {e}"]
  info = dict(zip(("num_prompts", "n_points", "n_dims"), xs_BxNxD.shape))
  errors = []
  where = (f"the set {setting!r} in {datasets.directory(directory, setting)} (config.eval.dataset_setting, "
           "dataset_dir)")
  for field in ("n_dims", "n_points"):
    value = config.task.get(field)
    if value != info[field]:
      errors.append(f"config.task.{field} = {value!r} differs from the {field} = {info[field]} of {where}")
  prompts = config.eval.get("num_prompts")
  if _is_int(prompts) and prompts > info["num_prompts"]:
    errors.append(f"config.eval.num_prompts = {prompts} exceeds the {info['num_prompts']} prompts of {where}: "
                  f"allowed values are 1..{info['num_prompts']}")
  return errors


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises ConfigError listing every invalid field of `config` for a run on `num_devices` devices."""
  errors = _task_errors(config) + _train_errors(config, num_devices) + _eval_errors(config) + _ahn_errors(config)
  family = config.model.get("family")
  if family not in models.REGISTRY:
    errors.append(f"config.model.family = {family!r}: allowed values are {', '.join(map(repr, models.REGISTRY))}")
  elif not any(e.startswith(("config.task.n_points", "config.task.n_dims")) for e in errors):
    errors += models.REGISTRY[family].validate(config.model, config.task)
  # A non-finite field's own message replaces what the field's other checks say of it.
  non_finite = _non_finite_errors(config)
  errors = list(non_finite.values()) + [e for e in errors if e.partition(" = ")[0] not in non_finite]
  if errors:
    raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
