"""Fu et al. 2024's per-layer protocol: which algorithm each layer's predictions follow (README, "Evaluation").

Each layer's read-out (`probes`) and each algorithm setting (`algorithm_weights`) predict every position of
`eval.num_prompts` fresh prompts from the points before it; `Evaluator` compares them (error/d, SimE, SimW, best
matches and their fits) and returns the dict that `evaluate` writes as WORKDIR/eval/results.json.
"""

import functools
import hashlib
import io
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from icl_jax import data
from icl_jax import datasets
from icl_jax import models
from icl_jax.analysis import algorithms
from icl_jax.analysis import forgetting
from icl_jax.analysis import linearity
from icl_jax.analysis import probes
from icl_jax.analysis import rates
from icl_jax.analysis import separability
from icl_jax.analysis import similarity
from icl_jax.analysis.precision import highest_precision
from icl_jax.runtime import config_fields
from icl_jax.runtime import config_files
from icl_jax.runtime import errors

# Algorithm families with a grid of steps: each layer gets a best match on each.
GRIDS = ("newton", "gd", "gd_log", "cg", "bfgs", "lbfgs")
SINGLE = ("least_squares", "online_gd")  # Algorithms without steps.
# Best matches fit against the layer index over the fit layers: steps linearly, GD's log grid in log2.
LINEAR_FITS = ("newton", "cg", "bfgs", "lbfgs")
# Fu et al.'s Table 1 (SimE with Newton, GD, online GD). Which quantity it reports is not pinned down by their
# text or released code (README, "Evaluation"), so it is never printed as equal to any number here.
PAPER_TABLE1 = {
  "gpt2": {"newton": 0.991, "gd": 0.957, "online_gd": 0.806},
  "lstm": {"newton": 0.920, "gd": 0.916, "online_gd": 0.954},
}


def eval_keys(seed: int) -> dict[str, jax.Array]:
  """Independent streams: evaluation prompts, probe-fitting prompts, SimW prompts, bootstrap draws, and the
  random start of fixed-step online GD."""
  evaluation = data.run_keys(seed)["eval"]
  names = ("prompts", "probes", "sim_w", "bootstrap")
  return {
    **dict(zip(names, jax.random.split(evaluation, len(names)))),
    "online_gd": jax.random.fold_in(evaluation, 100),
  }


def fit_layers(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """`eval.fit_layers`, or by default the layers after the first fifth up to three quarters of the depth
  (3-9 of 12, Fu et al.'s linear stretch); ConfigError naming the field if it does not fit the model."""
  num_layers, layers = config.model.num_layers, config.eval.fit_layers
  if layers is None:
    return num_layers // 5 + 1, max(num_layers // 5 + 1, -(-3 * num_layers // 4))
  first, last = layers
  if last > num_layers:
    raise errors.ConfigError(
      f"config.eval.fit_layers = {tuple(layers)}: the model has {num_layers} layers; allowed values are "
      f"(first, last) with 1 <= first <= last <= {num_layers}, or None for the middle layers"
    )
  return int(first), int(last)


class _Programs:
  """The jitted model programs of one configuration, compiled once for any number of evaluations."""

  def __init__(self, config: ml_collections.ConfigDict, model):
    self.config, self.model = config, model
    self.fit_probes = probes.make_fitter(config, model)
    self._samplers = {}

    @highest_precision
    @jax.jit
    def layer_chunk(params, readouts, xs_BxNxD, ys_BxN):
      preds_BxN, hidden = model.apply({"params": params}, xs_BxNxD, ys_BxN, return_hidden=True)
      return probes.apply(readouts, probes.x_position_states(hidden)), preds_BxN

    @highest_precision
    @jax.jit
    def sim_w_chunk(params, readouts, xs_BxNxD, ys_BxN, queries_BxNxQxD):
      out = model.apply({"params": params}, xs_BxNxD, ys_BxN, queries=queries_BxNxQxD)
      preds_LxBxNxQ = (
        jnp.einsum("lbnqw,lw->lbnq", out.query_hidden_Lx[1:], readouts["kernel"])
        + readouts["bias"][:, None, None, None]
      )
      return preds_LxBxNxQ

    @highest_precision
    @jax.jit
    def output_chunk(params, xs_BxNxD, ys_BxN):
      return model.apply({"params": params}, xs_BxNxD, ys_BxN)

    self.layer_chunk, self.sim_w_chunk, self.output_chunk = layer_chunk, sim_w_chunk, output_chunk

  def prompts(self, key: jax.Array, count: int, n_points: int) -> data.Batch:
    """`count` full-size prompts of `n_points` points, made in batches of `eval.batch_size`."""
    batch = min(self.config.eval.batch_size, count)
    if (batch, n_points) not in self._samplers:
      task = self.config.task.copy_and_resolve_references()
      task.n_points = n_points
      self._samplers[batch, n_points] = jax.jit(
        lambda key, first: data.sample_batch(data.step_key(key, 0), first, batch, task, task.n_dims)
      )
    # Prompt j is example j of the stream of `key`, whatever the batch size.
    parts = [self._samplers[batch, n_points](key, first) for first in range(0, count, batch)]
    return jax.tree.map(lambda *a: jnp.concatenate(a)[:count], *parts)

  def layer_predictions(self, params, readouts, prompts: data.Batch) -> tuple[np.ndarray, np.ndarray]:
    """Each layer's read-out predictions [L, B, N] and the model's own output [B, N]."""
    batch = self.config.eval.batch_size
    parts = [
      self.layer_chunk(params, readouts, prompts.xs_BxNxD[i : i + batch], prompts.ys_BxN[i : i + batch])
      for i in range(0, prompts.ys_BxN.shape[0], batch)
    ]
    return (
      np.concatenate([np.asarray(p[0]) for p in parts], axis=1),
      np.concatenate([np.asarray(p[1]) for p in parts], axis=0),
    )

  def outputs(self, params, xs_BxNxD, ys_BxN) -> np.ndarray:
    """The model's own output [B, N] for prompts, in batches of eval.batch_size."""
    batch = self.config.eval.batch_size
    return np.concatenate(
      [
        np.asarray(self.output_chunk(params, xs_BxNxD[i : i + batch], ys_BxN[i : i + batch]))
        for i in range(0, ys_BxN.shape[0], batch)
      ]
    )

  def sim_w_inputs(self, key: jax.Array) -> tuple[data.Batch, jax.Array]:
    """The `sim_w_prompts` prompts of SimW and their queries [B, N, Q, D]: extra points of each prompt (same
    Sigma and w), sim_w_queries per prefix."""
    e, n, d = self.config.eval, self.config.task.n_points, self.config.task.n_dims
    b = e.sim_w_prompts
    extended = self.prompts(key, b, n + n * e.sim_w_queries)
    prompts = data.Batch(extended.xs_BxNxD[:, :n], extended.ys_BxN[:, :n], extended.ws_BxD)
    return prompts, extended.xs_BxNxD[:, n:].reshape(b, n, e.sim_w_queries, d)

  def layer_query_predictions(self, params, readouts, prompts: data.Batch, queries_BxNxQxD) -> np.ndarray:
    """Each layer's read-out predictions [L, B, N, Q] for the SimW queries of every prefix (`sim_w_inputs`). The
    queries are fed as a query stream that sees only the prefix before it (the model called with `queries`), so
    one pass covers every prefix."""
    b = prompts.ys_BxN.shape[0]
    # Every query is a token at every layer: a few prompts per call bound the memory.
    step = min(b, 4)
    parts = [
      self.sim_w_chunk(
        params, readouts, prompts.xs_BxNxD[i : i + step], prompts.ys_BxN[i : i + step], queries_BxNxQxD[i : i + step]
      )
      for i in range(0, b, step)
    ]
    return np.concatenate([np.asarray(p) for p in parts], axis=1)


def _gd(config: ml_collections.ConfigDict, xs_BxNxD, ys_BxN, steps) -> jax.Array:
  """The evaluation's gradient descent (eval.gd_learning_rate, gd_gradient_scale, ridge) after each of `steps`."""
  e = config.eval
  return algorithms.gradient_descent(xs_BxNxD, ys_BxN, steps, e.gd_learning_rate, e.gd_gradient_scale, ridge=e.ridge)


def algorithm_weights(config: ml_collections.ConfigDict, xs_BxNxD, ys_BxN) -> dict[str, jax.Array]:
  """Every algorithm setting's estimate on every prefix, [B, K, T, D] (K = 1 for those without steps)."""
  e = config.eval
  gd = functools.partial(_gd, config, xs_BxNxD, ys_BxN)
  return {
    "newton": algorithms.iterative_newton(xs_BxNxD, ys_BxN, e.newton_steps, e.newton_alpha, e.ridge)[:, 1:],
    "gd": gd(e.gd_steps),
    "gd_log": gd(e.gd_log_steps),
    "cg": algorithms.conjugate_gradient(xs_BxNxD, ys_BxN, e.cg_steps, e.ridge)[:, 1:],
    "bfgs": algorithms.bfgs(xs_BxNxD, ys_BxN, e.bfgs_steps, e.ridge)[:, 1:],
    "lbfgs": algorithms.lbfgs(xs_BxNxD, ys_BxN, e.lbfgs_steps, e.lbfgs_memory, e.ridge)[:, 1:],
    "least_squares": algorithms.least_squares(xs_BxNxD, ys_BxN, e.ridge)[:, None],
    "online_gd": online_gd(config, xs_BxNxD, ys_BxN)[:, None],
  }


def online_gd(config: ml_collections.ConfigDict, xs_BxNxD, ys_BxN) -> jax.Array:
  """The evaluation's online GD (eval.online_gd) on every prefix: [B, T, D]."""
  if config.eval.online_gd == "projection":
    return algorithms.online_gradient_descent(xs_BxNxD, ys_BxN)
  # Fu et al.'s code: a fixed step from w_0 ~ U[0, 1)^d, drawn here once per prompt.
  w0_BxD = jax.random.uniform(eval_keys(config.seed)["online_gd"], xs_BxNxD.shape[::2], xs_BxNxD.dtype)
  return algorithms.online_gradient_descent(xs_BxNxD, ys_BxN, config.eval.online_gd_learning_rate, w0_BxD)


def check_gd_stability(config: ml_collections.ConfigDict, xs_BxNxD) -> None:
  """ConfigError unless every GD step of the evaluation contracts: eta lambda_max(H) < 2 for the Hessian H of
  every prefix of every prompt (S_t + ridge I, divided by t for "mean"), else GD diverges there and its
  similarities are meaningless."""
  e = config.eval
  mask_TxN = jnp.arange(xs_BxNxD.shape[1])[None, :] < jnp.arange(1, xs_BxNxD.shape[1] + 1)[:, None]
  lambda_max_B = _largest_hessian_eigenvalue(
    xs_BxNxD, mask_TxN.astype(xs_BxNxD.dtype), e.ridge, e.gd_gradient_scale == "mean"
  )
  worst_B = e.gd_learning_rate * np.asarray(lambda_max_B, np.float64)
  if np.any(worst_B >= 2):
    raise errors.ConfigError(
      f"config.eval.gd_learning_rate = {e.gd_learning_rate:g} makes gradient descent diverge on "
      f"{np.mean(worst_B >= 2):.1%} of the {len(worst_B)} evaluation prompts (eta * lambda_max of the "
      f"Hessian up to {worst_B.max():.3g} >= 2); allowed values are below {2 / worst_B.max() * e.gd_learning_rate:.3g} "
      f"for these prompts (configs/linreg_ill_conditioned.py uses 0.005 at kappa = 100)"
    )


@highest_precision
@functools.partial(jax.jit, static_argnames=("ridge", "mean"))
def _largest_hessian_eigenvalue(xs_BxNxD, mask_TxN, ridge: float, mean: bool) -> jax.Array:
  """max over the prefixes t = 1..N of lambda_max(S_t + ridge I) (divided by t if `mean`): [B]."""
  s_TxBxDxD = jnp.einsum("tn,bni,bnj->tbij", mask_TxN, xs_BxNxD, xs_BxNxD)
  top_TxB = jnp.linalg.eigvalsh(s_TxBxDxD)[..., -1] + ridge
  if mean:
    top_TxB = top_TxB / jnp.arange(1, mask_TxN.shape[0] + 1, dtype=xs_BxNxD.dtype)[:, None]
  return jnp.max(top_TxB, axis=0)


def check_finite(labels_K: list[str], preds_KxBxN: np.ndarray) -> None:
  """NonFiniteError naming the first predictor (of `labels_K`) with a non-finite prediction and the share of
  prompts affected: nothing non-finite reaches a similarity, a best match or a figure."""
  bad_KxB = ~np.all(np.isfinite(preds_KxBxN), axis=-1)
  if np.any(bad_KxB):
    k = int(np.flatnonzero(bad_KxB.any(axis=1))[0])
    raise errors.NonFiniteError(
      f"{labels_K[k]}: non-finite predictions on {bad_KxB[k].mean():.1%} of the "
      f"{bad_KxB.shape[1]} evaluation prompts; nothing was written"
    )


def _predictions(ws_BxKxTxD, xs_BxNxD) -> np.ndarray:
  """Predictions [K, B, N] of the settings whose estimates are `ws_BxKxTxD`."""
  return np.asarray(jnp.swapaxes(algorithms.predict(ws_BxKxTxD, xs_BxNxD), 0, 1))


def algorithm_predictions(config: ml_collections.ConfigDict, xs_BxNxD, ys_BxN) -> dict[str, np.ndarray]:
  """Predictions [K, B, N] of every algorithm setting, from its weights."""
  return {name: _predictions(ws, xs_BxNxD) for name, ws in algorithm_weights(config, xs_BxNxD, ys_BxN).items()}


def algorithm_induced_weights(config: ml_collections.ConfigDict, xs_BxNxD, ys_BxN) -> dict[str, np.ndarray]:
  """Every algorithm setting's estimate before each position t = 0..N-1, [K, B, N, D]: its induced weights,
  exactly (the fit of Fu et al.'s eq. 7 recovers them from >= d queries, as the algorithms are linear in the
  query)."""
  return {
    name: np.asarray(jnp.swapaxes(ws[:, :, :-1], 0, 1))
    for name, ws in algorithm_weights(config, xs_BxNxD, ys_BxN).items()
  }


def _steps(config, name) -> list[int]:
  """The grid of `name`: the step counts its settings stand for ([1] for the algorithms without steps)."""
  e = config.eval
  grids = {
    "newton": range(1, e.newton_steps + 1),
    "gd": e.gd_steps,
    "gd_log": e.gd_log_steps,
    "cg": range(1, e.cg_steps + 1),
    "bfgs": range(1, e.bfgs_steps + 1),
    "lbfgs": range(1, e.lbfgs_steps + 1),
  }
  return list(grids.get(name, [1]))


# The adaptive fit window ends at the first layer (at least two after the first) whose best-matching Newton step
# reaches this fraction of the last layer's: on Fu et al.'s own Fig. 7(b) sequence it gives their layers 3-9.
PLATEAU_FRACTION = 0.9


def adaptive_fit_layers(config, newton_steps_L) -> tuple[int, int]:
  """The fit layers' first, up to where the best-matching Newton steps reach their plateau (PLATEAU_FRACTION
  of the last layer's), or the last layer: a window that adapts to the model and to d."""
  first, _ = fit_layers(config)
  steps = np.asarray(newton_steps_L, np.float64)
  reached = [layer for layer in range(first + 2, len(steps) + 1) if steps[layer - 1] >= PLATEAU_FRACTION * steps[-1]]
  return first, min(reached, default=len(steps))


def _fits(config, best_by_grid: dict, window: tuple[int, int]) -> dict:
  """Best-matching steps against the layer over the layers of `window`, with the slope's bootstrap interval
  (from each bootstrap sample's best matches)."""
  first, last = window
  layers = np.arange(first, last + 1)
  fits = {"layers": [first, last]}
  for grid in LINEAR_FITS + ("gd_log",):
    transform = np.log2 if grid == "gd_log" else np.asarray
    best = best_by_grid[grid]
    fit = similarity.linear_fit(layers, transform(np.asarray(best["steps"], np.float64))[layers - 1])
    resampled = transform(np.asarray(best["resampled_steps"], np.float64))[:, layers - 1]
    fit["slope_interval"] = list(similarity.slope_interval(layers, resampled, config.eval.confidence))
    fit["doublings_per_layer" if grid == "gd_log" else "steps_per_layer"] = fit["slope"]
    fits[grid] = fit
  return fits


def _tolist(tree):
  return jax.tree.map(lambda a: np.asarray(a).tolist(), tree)


def dataset_prompts(config: ml_collections.ConfigDict) -> data.Batch:
  """The first `eval.num_prompts` prompts, by index, of the frozen set `eval.dataset_setting` in
  `eval.dataset_dir` (icl_jax/datasets)."""
  config_fields.raise_if_any(datasets.config_errors(config))
  arrays = datasets.load_prompts(config.eval.dataset_dir, config.eval.dataset_setting)
  return data.Batch(*(jnp.asarray(a[: config.eval.num_prompts]) for a in arrays))


class ModelOutputs(NamedTuple):
  """Everything an evaluation takes from the model; the rest is computed from the prompts, which the config
  determines. Saved beside a run's summary, it lets any claim be graded again without a checkpoint."""

  layers_LxBxN: np.ndarray  # Each layer's read-out prediction at every position of the evaluation prompts.
  model_BxN: np.ndarray  # The model's own output there.
  query_preds_LxBxNxQ: np.ndarray  # Each layer's predictions for the SimW queries of every prefix.
  probe_fit_mse_L: np.ndarray | None  # The read-outs' residual on their own fitting prompts (None: not fit).
  prompts_sha256: str  # `prompts_hash` of the evaluation prompts the predictions are for.
  # The model's recall of example n - g after n examples, per gap g and evaluation prompt (`forgetting.prompts`);
  # None in outputs saved before the test existed.
  forgetting_GxB: np.ndarray | None = None


def prompts_hash(prompts: data.Batch) -> str:
  """SHA-256 of the prompts' x and y (float32 bytes): which prompts a set of predictions belongs to."""
  digest = hashlib.sha256()
  for a in (prompts.xs_BxNxD, prompts.ys_BxN):
    digest.update(np.ascontiguousarray(np.asarray(a, np.float32)).tobytes())
  return digest.hexdigest()


def outputs_to_npz(outputs: ModelOutputs) -> bytes:
  """`outputs` as a compressed .npz file's bytes (float32 arrays; the prompts' hash as a string)."""
  buffer = io.BytesIO()
  arrays = {
    k: np.asarray(v, np.float32) for k, v in outputs._asdict().items() if k != "prompts_sha256" and v is not None
  }
  np.savez_compressed(buffer, prompts_sha256=np.asarray(outputs.prompts_sha256), **arrays)
  return buffer.getvalue()


def outputs_from_npz(data_bytes: bytes) -> ModelOutputs:
  """The `ModelOutputs` of `outputs_to_npz`'s bytes."""
  with np.load(io.BytesIO(data_bytes)) as npz:
    found = {k: npz[k] for k in npz.files}
  return ModelOutputs(
    **{k: found.get(k) for k in ModelOutputs._fields if k != "prompts_sha256"},
    prompts_sha256=str(found["prompts_sha256"]),
  )


class Evaluator:
  """Evaluates parameters of `config.model`; compiles on the first call only. `predict` runs the model,
  `analyse` everything after it (and reruns on saved `ModelOutputs`)."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    fit_layers(config)  # Checked against the model before anything runs.
    # The model runs in float32 whatever it was trained in (config.model.dtype): its float32 parameters, read
    # layer by layer at the analysis' own precision, so results do not carry bfloat16's rounding.
    model_config = config.model.copy_and_resolve_references()
    if "dtype" in model_config:
      model_config.dtype = "float32"
    self._programs = _Programs(config, models.build_model(model_config))
    self._keys = eval_keys(config.seed)
    # A frozen set replaces only the main prompts: the probes are fit on prompts other than those they are
    # scored on, and SimW needs query points per prefix that the set does not hold, so both stay fresh.
    self._dataset_prompts = dataset_prompts(config) if config.eval.dataset_dir else None

  @functools.cached_property
  def prompts(self) -> data.Batch:
    """The evaluation prompts: the frozen set's, or `eval.num_prompts` fresh ones from the run's seed (made once,
    for `predict` and `analyse` alike)."""
    if self._dataset_prompts is not None:
      return self._dataset_prompts
    return self._programs.prompts(self._keys["prompts"], self.config.eval.num_prompts, self.config.task.n_points)

  @functools.cached_property
  def prompts_sha256(self) -> str:
    return prompts_hash(self.prompts)

  @functools.cached_property
  def sim_w_inputs(self) -> tuple[data.Batch, jax.Array]:
    """The SimW prompts and their queries (`_Programs.sim_w_inputs`), made once."""
    return self._programs.sim_w_inputs(self._keys["sim_w"])

  def __call__(self, params: dict) -> dict:
    clock = Clock()
    return self.analyse(self.predict(params, clock), clock)

  @highest_precision
  def predict(self, params: dict, clock: "Clock") -> ModelOutputs:
    """The model's part of the evaluation: read-outs fit, then every layer's predictions for the evaluation
    prompts and for the SimW queries."""
    config, programs, keys = self.config, self._programs, self._keys
    e = config.eval
    logging.info("Evaluation: fitting the %s read-outs of %d layers.", e.readout, config.model.num_layers)
    readouts, probe_fit_mse_L = programs.fit_probes(params, keys["probes"])
    clock.lap("probes_s", readouts)
    prompts = self.prompts
    check_gd_stability(config, prompts.xs_BxNxD)
    logging.info(
      "Evaluation: read-outs fit (%s); predicting %d prompts layer by layer.", clock.progress(), e.num_prompts
    )
    layers_LxBxN, model_BxN = programs.layer_predictions(params, readouts, prompts)
    check_finite([f"layer {i}'s read-out" for i in range(1, config.model.num_layers + 1)], layers_LxBxN)
    check_finite(["the model's output"], model_BxN[None])
    query_preds = programs.layer_query_predictions(params, readouts, *self.sim_w_inputs)
    forgetting_GxB = None
    if (n := forgetting.num_examples(config.task.n_dims, config.task.n_points)) is not None:
      xs, ys = forgetting.prompts(prompts.xs_BxNxD, prompts.ys_BxN, n)
      forgetting_GxB = programs.outputs(params, xs, ys)[:, n].reshape(n, -1)
      check_finite(["the model's recall of earlier examples"], forgetting_GxB.reshape(1, 1, -1))
    clock.lap("model_s")
    logging.info("Evaluation: layers' predictions done (%s).", clock.progress())
    mse = None if probe_fit_mse_L is None else np.asarray(probe_fit_mse_L)
    return ModelOutputs(layers_LxBxN, model_BxN, query_preds, mse, self.prompts_sha256, forgetting_GxB)

  @highest_precision
  def analyse(self, outputs: ModelOutputs, clock: "Clock | None" = None) -> dict:
    """Every comparison of the model's outputs with the algorithms on the same prompts: results.json's dict.
    ValueError if `outputs` were made on other prompts than this config's."""
    config, keys, clock = self.config, self._keys, clock or Clock()
    e, n_dims = config.eval, config.task.n_dims
    prompts, sha256 = self.prompts, self.prompts_sha256
    if sha256 != outputs.prompts_sha256:
      raise ValueError(
        "the saved predictions were made on other evaluation prompts than this config's (their SHA-256 "
        f"differs: {outputs.prompts_sha256[:12]} saved, {sha256[:12]} now)"
      )
    layers_LxBxN, model_BxN = np.asarray(outputs.layers_LxBxN), np.asarray(outputs.model_BxN)
    logging.info("Evaluation: running %d algorithm settings.", sum(len(_steps(config, k)) for k in GRIDS + SINGLE))
    algos = algorithm_predictions(config, prompts.xs_BxNxD, prompts.ys_BxN)
    for name, preds_KxBxN in algos.items():
      check_finite([f"{name}, {step} steps" if name in GRIDS else name for step in _steps(config, name)], preds_KxBxN)
    window = rates.window(config.model.num_layers)
    gd_steps = range(1, window[1] - window[0] + 2)
    gd_fixed_KxBxN = _predictions(_gd(config, prompts.xs_BxNxD, prompts.ys_BxN, gd_steps), prompts.xs_BxNxD)
    clock.lap("algorithms_s")
    logging.info("Evaluation: algorithms done (%s); comparing.", clock.progress())

    ys_BxN = np.asarray(prompts.ys_BxN)
    counts_SxB = similarity.resample_counts(keys["bootstrap"], e.bootstrap_samples, ys_BxN.shape[0])
    curves = {"layers": layers_LxBxN, "model": model_BxN[None], "zero": np.zeros_like(ys_BxN)[None], **algos}
    squared = similarity.squared_errors(np.concatenate(list(curves.values())), ys_BxN, n_dims)
    errors = similarity.bootstrap_means(squared, counts_SxB, e.confidence)
    bounds = np.cumsum([0] + [c.shape[0] for c in curves.values()])
    error = {name: {stat: v[bounds[i] : bounds[i + 1]] for stat, v in errors.items()} for i, name in enumerate(curves)}
    first = 0 if e.sim_e_include_first else 1
    cosines = {k: np.asarray(similarity.error_cosines(layers_LxBxN, p, ys_BxN, first)) for k, p in algos.items()}
    sim_e = {k: similarity.bootstrap_similarity(c, counts_SxB, e.confidence) for k, c in cosines.items()}
    steps = {k: _steps(config, k) for k in algos}
    separable = separability.analyse(cosines, sim_e, algos, ys_BxN, first, steps, counts_SxB, e.confidence)
    gd_fixed_squared_KxBxN = np.asarray(similarity.squared_errors(gd_fixed_KxBxN, ys_BxN, n_dims))
    convergence = rates.analyse(
      np.asarray(squared[: layers_LxBxN.shape[0]]),
      gd_fixed_squared_KxBxN,
      n_dims,
      counts_SxB,
      e.confidence,
    )
    # How far the model's own predictions and each layer's are from least squares', per context length.
    distance_N = np.mean(np.square(model_BxN - algos["least_squares"][0]), axis=0) / n_dims
    layer_distance_LxN = np.mean(np.square(layers_LxBxN - algos["least_squares"][0][None]), axis=1) / n_dims
    lengths = rates.figure_lengths(n_dims, config.task.n_points)
    gd_fixed_error_KxN = gd_fixed_squared_KxBxN.mean(axis=1)
    clock.lap("metrics_s")
    logging.info("Evaluation: errors, SimE and separability done (%s); SimW.", clock.progress())

    sim_w_prompts, queries_BxNxQxD = self.sim_w_inputs
    query_preds_LxBxNxQ = np.asarray(outputs.query_preds_LxBxNxQ)
    layer_weights_LxBxNxD = np.asarray(similarity.induced_weights(queries_BxNxQxD, query_preds_LxBxNxQ))
    weights = algorithm_induced_weights(config, sim_w_prompts.xs_BxNxD, sim_w_prompts.ys_BxN)
    counts_w_SxB = similarity.resample_counts(
      jax.random.fold_in(keys["bootstrap"], 1), e.bootstrap_samples, e.sim_w_prompts
    )
    cosines_w = {k: np.asarray(similarity.weight_cosines(layer_weights_LxBxNxD, w)) for k, w in weights.items()}
    sim_w = {k: similarity.bootstrap_similarity(c, counts_w_SxB, e.confidence) for k, c in cosines_w.items()}
    clock.lap("sim_w_s")
    logging.info("Evaluation: SimW done (%s).", clock.progress())
    results = _summarise(config, error, sim_e, sim_w, clock.laps)
    results["separability"] = separable
    results["linearity"] = {
      "fit_residual": linearity.fit_residual(
        queries_BxNxQxD, query_preds_LxBxNxQ, layer_weights_LxBxNxD, float(np.mean(np.square(sim_w_prompts.ys_BxN)))
      ).tolist(),
      "span_residual": _tolist(linearity.span_residual(sim_w_prompts.xs_BxNxD, layer_weights_LxBxNxD)),
    }
    results["convergence"] = convergence
    results["error_vs_layer"] = {
      "context_lengths": lengths,
      "layers": error["layers"]["mean"][:, lengths].tolist(),
      "gd_steps": list(gd_steps),
      "gd": gd_fixed_error_KxN[:, lengths].tolist(),
      "least_squares": error["least_squares"]["mean"][0, lengths].tolist(),
    }
    results["ols_distance"] = {
      "per_dim": layer_distance_LxN.tolist(),
      "zero_per_dim": error["zero"]["mean"][0].tolist(),
    }
    results["last_layer_paired"] = _last_layer_paired(cosines_w, sim_w, counts_w_SxB, e.confidence)
    results["distance_to_least_squares_per_dim"] = distance_N.tolist()
    results["probe_fit"] = _probe_fit(outputs.probe_fit_mse_L, n_dims)
    results["forgetting"] = _forgetting_results(config, prompts, outputs.forgetting_GxB, counts_SxB)
    results["prompts_sha256"] = outputs.prompts_sha256
    return results


def _forgetting_results(config, prompts: data.Batch, model_GxB, counts_SxB) -> dict | None:
  """The forgetting test (analysis/forgetting.py) of the model's saved recall, beside online GD's and least
  squares' on the same prompts; None when the outputs have no recall (saved before the test existed)."""
  if model_GxB is None:
    return None
  e, d = config.eval, config.task.n_dims
  n = forgetting.num_examples(d, config.task.n_points)
  xs, ys = forgetting.prompts(prompts.xs_BxNxD, prompts.ys_BxN, n)
  targets_GxB = np.asarray(ys[:, n]).reshape(n, -1)
  query = lambda ws_BxTxD: np.asarray(jnp.einsum("bd,bd->b", ws_BxTxD[:, n], xs[:, n])).reshape(n, -1)
  found = {
    "model": np.asarray(model_GxB),
    "online_gd": query(online_gd(config, xs, ys)),
    "least_squares": query(algorithms.least_squares(xs, ys, e.ridge)),
  }
  errors = {k: forgetting.errors(v, targets_GxB, d) for k, v in found.items()}
  zero_GxB = forgetting.errors(np.zeros_like(targets_GxB), targets_GxB, d)
  return {
    "examples": n,
    "gaps": list(range(n)),
    "zero_per_dim": float(np.mean(zero_GxB)),
    "error_per_dim": {k: forgetting.curve(v, counts_SxB, e.confidence) for k, v in errors.items()},
    "statistic": {k: forgetting.forgetting_statistic(v, zero_GxB, counts_SxB, e.confidence) for k, v in errors.items()},
  }


def _last_layer_paired(cosines_w: dict, sim_w: dict, counts_SxB, confidence: float) -> dict:
  """The last layer's SimW with Newton minus with GD (each at its best setting; GD over both grids), paired
  over the SimW prompts."""
  last = -1
  newton = int(np.argmax(np.asarray(sim_w["newton"]["mean"])[last]))
  grid_L, setting_L = separability.best_gd({g: sim_w[g]["mean"] for g in separability.GD_GRIDS})
  gd = np.asarray(cosines_w[separability.GD_GRIDS[grid_L[last]]])[last, setting_L[last]]
  difference_B = np.asarray(cosines_w["newton"])[last, newton] - gd
  return {"sim_w": {"newton_minus_gd": separability.bootstrap_mean(difference_B, counts_SxB, confidence)}}


def _probe_fit(fit_mse_L, n_dims: int) -> dict:
  """The read-outs' own residual on the prompts they were fit on (None for the model's read-out, which is not
  fit): mean squared error / d per layer."""
  if fit_mse_L is None:
    return {"mse_per_dim": None}
  return {"mse_per_dim": (np.asarray(fit_mse_L, np.float64) / n_dims).tolist()}


# Each stage's typical share of an evaluation's wall time, for the ETA of the progress lines: the shares of the
# `timing` that results.json records, measured on the medium rung (docs/speed.md); an ETA, not a promise.
STAGE_SHARES = {"probes_s": 0.10, "model_s": 0.37, "algorithms_s": 0.21, "metrics_s": 0.09, "sim_w_s": 0.23}


class Clock:
  """Wall time of each stage, waiting for the device to finish the stage's results."""

  def __init__(self):
    self.laps, self._last = {}, time.perf_counter()

  def elapsed(self) -> float:
    return self.laps.get("total_s", 0.0)

  def progress(self) -> str:
    """ "stage K/5, T s elapsed, ETA E s": E scales the elapsed time by the remaining stages' STAGE_SHARES."""
    done = sum(STAGE_SHARES[name] for name in self.laps if name in STAGE_SHARES)
    stages = sum(name in STAGE_SHARES for name in self.laps)
    eta = f", ETA {self.elapsed() * (1.0 - done) / done:.0f} s" if done else ""
    return f"stage {stages}/{len(STAGE_SHARES)}, {self.elapsed():.1f} s elapsed{eta}"

  def lap(self, name, *results):
    jax.block_until_ready(results)
    now = time.perf_counter()
    self.laps[name] = now - self._last
    self.laps["total_s"] = self.laps.get("total_s", 0.0) + now - self._last
    self._last = now


def _summarise(config, error, sim_e, sim_w, timings) -> dict:
  best = {k: similarity.best_match(sim_e[k], _steps(config, k)) for k in GRIDS}
  best_w = {k: similarity.best_match(sim_w[k], _steps(config, k)) for k in GRIDS}
  fits = _fits(config, best, fit_layers(config))
  adaptive = _fits(config, best, adaptive_fit_layers(config, best["newton"]["steps"]))
  means = lambda sims: {k: v["mean"] for k, v in sims.items()}
  intervals = lambda sims: {k: {"low": v["low"], "high": v["high"]} for k, v in sims.items()}
  # Everything but the bootstrap samples, which are only needed for the fits' intervals.
  best_intervals = lambda b: {
    k: {f: v[f] for f in ("low", "high", "within_interval", "choice_fraction")} for k, v in b.items()
  }
  return {
    "settings": {
      "eval": {**config_files.config_dict(config.eval), "fit_layers": fits["layers"]},
      "task": config_files.config_dict(config.task),
      "model": config_files.config_dict(config.model),
      "seed": config.seed,
    },
    "layers": list(range(1, config.model.num_layers + 1)),
    "context_lengths": list(range(config.task.n_points)),
    "grids": {k: _steps(config, k) for k in GRIDS},
    "error_per_dim": _tolist(error),
    "sim_e": _tolist(means(sim_e)),
    "sim_e_interval": _tolist(intervals(sim_e)),
    "sim_w": _tolist(means(sim_w)),
    "sim_w_interval": _tolist(intervals(sim_w)),
    "best_match": {k: v["steps"] for k, v in best.items()},
    "best_similarity": {k: v["similarity"] for k, v in best.items()},
    "best_match_interval": best_intervals(best),
    "best_match_sim_w": {k: v["steps"] for k, v in best_w.items()},
    "best_similarity_sim_w": {k: v["similarity"] for k, v in best_w.items()},
    "best_match_sim_w_interval": best_intervals(best_w),
    "fits": fits,
    "fits_adaptive": {
      "rule": f"layers {fits['layers'][0]} to the plateau ({PLATEAU_FRACTION:g} x the last layer's best Newton step)",
      **adaptive,
    },
    "last_layer_best": {"sim_e": _last_layer(sim_e, best), "sim_w": _last_layer(sim_w, best_w)},
    "table1": _table1(config, sim_e, best),
    "timing": timings,
  }


def _last_layer(sims: dict, best: dict) -> dict:
  """The last layer's best similarity to each algorithm (its best setting on each grid), with its interval."""
  out = {
    k: {"value": b["similarity"][-1], "low": b["low"][-1], "high": b["high"][-1], "steps": b["steps"][-1]}
    for k, b in best.items()
  }
  for k in SINGLE:
    out[k] = {
      "value": float(sims[k]["mean"][-1, 0]),
      "low": float(sims[k]["low"][-1, 0]),
      "high": float(sims[k]["high"][-1, 0]),
    }
  return out


def _table1(config, sim_e: dict, best: dict) -> dict:
  """Fu et al.'s Table 1 beside the candidate definitions it might use, none of them confirmed."""
  best_per_layer = {k: np.asarray(b["similarity"]) for k, b in best.items()}
  best_per_layer.update({k: np.asarray(sim_e[k]["mean"])[:, 0] for k in SINGLE})
  return {
    "paper": PAPER_TABLE1.get(config.model.family),
    "definition": "not pinned down: Fu et al.'s text and released code do not say which layer, read-out or "
    "algorithm setting Table 1 uses; the candidates below are not claimed to be it",
    "candidates": {
      "last_layer_best": {k: float(v[-1]) for k, v in best_per_layer.items()},
      "max_over_layers": {k: float(np.max(v)) for k, v in best_per_layer.items()},
      "mean_over_layers": {k: float(np.mean(v)) for k, v in best_per_layer.items()},
    },
  }


def summary_scalars(results: dict) -> dict[str, float]:
  """The evaluation's headline numbers, as TensorBoard tags."""
  scalars = {}
  for grid, fit in results["fits"].items():
    if grid != "layers" and fit["slope"] is not None:
      scalars[f"eval/fit/{grid}_slope"], scalars[f"eval/fit/{grid}_r2"] = fit["slope"], fit["r2"]
  for metric in ("sim_e", "sim_w"):
    for name, best in results["last_layer_best"][metric].items():
      scalars[f"eval/last_layer_{metric}/{name}"] = best["value"]
  scalars["eval/error_per_dim_last_length/model"] = results["error_per_dim"]["model"]["mean"][0][-1]
  return scalars


def log_summary(results: dict) -> None:
  t, fits = results["timing"], results["fits"]
  logging.info(
    "Evaluation in %.1f s (incl. compilation): %s.",
    t["total_s"],
    ", ".join(f"{k[:-2]} {v:.1f}" for k, v in t.items() if k != "total_s"),
  )
  for grid, name, unit in (("newton", "Newton", "steps/layer"), ("gd_log", "GD (log grid)", "doublings/layer")):
    fit = fits[grid]
    if fit["slope"] is None:
      slope = "undefined (one fit layer)"
    elif fit.get("flat"):
      slope = f"flat, 0 {unit}"
    else:
      slope = (
        f"{fit['slope']:.2f} {unit} [{fit['slope_interval'][0]:.2f}, {fit['slope_interval'][1]:.2f}], "
        f"R^2 {fit['r2']:.3f}"
      )
    logging.info(
      "Best-matching %s steps per layer: %s (layers %d-%d: %s).",
      name,
      results["best_match"][grid],
      *fits["layers"],
      slope,
    )
  last = results["last_layer_best"]["sim_e"]
  logging.info(
    "Last layer's best SimE: %s.",
    ", ".join(f"{k} {v['value']:.3f} [{v['low']:.3f}, {v['high']:.3f}]" for k, v in last.items()),
  )
