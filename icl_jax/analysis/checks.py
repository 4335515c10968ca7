"""The evaluation's fields (`config.eval`) checked before anything is compiled; `evaluate.validate` reports them
with the training side's in one message."""

from icl_jax.analysis import algorithms
from icl_jax.analysis import probes
from icl_jax.runtime.config_fields import check_choice
from icl_jax.runtime.config_fields import check_int
from icl_jax.runtime.config_fields import check_real
from icl_jax.runtime.config_fields import is_int
from icl_jax.runtime.config_fields import is_real

ONLINE_GD = ("projection", "fixed_step")  # config.eval.online_gd: Fu et al.'s paper's variant, or their code's.


def eval_errors(config) -> list[str]:
  """One line for each invalid field of `config.eval`."""
  found = []
  for field in (
    "num_prompts",
    "batch_size",
    "bootstrap_samples",
    "probe_prompts",
    "probe_steps",
    "probe_batch_size",
    "newton_steps",
    "cg_steps",
    "bfgs_steps",
    "lbfgs_steps",
    "lbfgs_memory",
    "sim_w_prompts",
  ):
    check_int(found, config, f"eval.{field}", 1)
  check_real(found, config, "eval.probe_ridge", 0.0)
  check_real(found, config, "eval.ridge", 0.0)
  check_choice(found, config, "eval.online_gd", ONLINE_GD)
  check_real(found, config, "eval.online_gd_learning_rate", 0.0, strict=True)
  check_real(found, config, "eval.probe_learning_rate", 0.0, strict=True)
  check_real(found, config, "eval.gd_learning_rate", 0.0, strict=True)
  confidence = config.eval.get("confidence")
  if not (is_real(confidence) and 0 < confidence < 1):
    found.append(f"config.eval.confidence = {confidence!r}: must be a number in (0, 1)")
  check_choice(found, config, "eval.readout", probes.READOUTS)
  check_choice(found, config, "eval.probe_init", probes.PROBE_INITS)
  check_choice(found, config, "eval.newton_alpha", algorithms.NEWTON_ALPHAS)
  check_choice(found, config, "eval.gd_gradient_scale", algorithms.GRADIENT_SCALES)
  for flag in ("after_training", "sim_e_include_first"):
    check_choice(found, config, f"eval.{flag}", (True, False))
  for grid in ("gd_steps", "gd_log_steps"):
    steps = config.eval.get(grid)
    if not (isinstance(steps, (tuple, list)) and steps and all(is_int(s) and s >= 1 for s in steps)):
      found.append(f"config.eval.{grid} = {steps!r}: must be a non-empty tuple of integers >= 1")
  queries, n_dims = config.eval.get("sim_w_queries"), config.task.get("n_dims")
  if is_int(n_dims) and not (is_int(queries) and queries >= n_dims):
    found.append(
      f"config.eval.sim_w_queries = {queries!r}: must be an integer >= config.task.n_dims = {n_dims} "
      "(the induced weights are a least-squares fit to the queries)"
    )
  # Only the form: whether the layers exist is checked against the evaluated model (`probing.fit_layers`), so
  # that a checkpoint of any depth can be converted with the paper's configuration.
  layers = config.eval.get("fit_layers")
  if layers is not None and not (
    isinstance(layers, (tuple, list))
    and len(layers) == 2
    and all(is_int(v) for v in layers)
    and 1 <= layers[0] <= layers[1]
  ):
    found.append(
      f"config.eval.fit_layers = {layers!r}: must be (first, last) with 1 <= first <= last <= the "
      "number of layers, or None for the middle layers"
    )
  return found
