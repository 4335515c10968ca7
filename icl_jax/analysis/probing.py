"""Fu et al. 2024's per-layer protocol: which algorithm each layer's predictions follow (README, "Evaluation").

Each layer's read-out (`probes`) and each algorithm setting (`algorithm_weights`) predict every position of
`eval.num_prompts` fresh prompts from the points before it; `Evaluator` compares them (error/d, SimE, SimW, best
matches and their fits) and `evaluate` writes WORKDIR/eval/results.json and the figures.
"""

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from icl_jax import checkpointing
from icl_jax import config_checks
from icl_jax import data
from icl_jax import datasets
from icl_jax import models
from icl_jax import run_logs
from icl_jax import train_step
from icl_jax.analysis import algorithms
from icl_jax.analysis import figures
from icl_jax.analysis import probes
from icl_jax.analysis import similarity

GRIDS = ("newton", "gd", "gd_log")  # Algorithm families with a grid of steps; each layer gets a best match.
SINGLE = ("least_squares", "online_gd")  # Algorithms without steps.


def eval_keys(seed: int) -> dict[str, jax.Array]:
  """Independent streams: evaluation prompts, probe-fitting prompts, SimW prompts, bootstrap draws."""
  names = ("prompts", "probes", "sim_w", "bootstrap")
  return dict(zip(names, jax.random.split(train_step.run_keys(seed)["eval"], len(names))))


class _Programs:
  """The jitted model programs of one configuration, compiled once for any number of evaluations."""

  def __init__(self, config: ml_collections.ConfigDict, model):
    self.config, self.model = config, model
    self.fit_probes = probes.make_fitter(config, model)
    self._samplers = {}

    @jax.jit
    def layer_chunk(params, readouts, xs_BxNxD, ys_BxN):
      preds_BxN, hidden = model.apply({"params": params}, xs_BxNxD, ys_BxN, return_hidden=True)
      return probes.apply(readouts, probes.x_position_states(hidden)), preds_BxN

    @jax.jit
    def sim_w_chunk(params, readouts, xs_BxNxD, ys_BxN, queries_BxNxQxD):
      out = model.apply({"params": params}, xs_BxNxD, ys_BxN, queries=queries_BxNxQxD)
      preds_LxBxNxQ = (jnp.einsum("lbnqw,lw->lbnq", out.query_hidden_Lx[1:], readouts["kernel"]) +
                       readouts["bias"][:, None, None, None])
      return similarity.induced_weights(queries_BxNxQxD, preds_LxBxNxQ)

    self.layer_chunk, self.sim_w_chunk = layer_chunk, sim_w_chunk

  def prompts(self, key: jax.Array, count: int, n_points: int) -> data.Batch:
    """`count` full-size prompts of `n_points` points, made in batches of `eval.batch_size`."""
    batch = min(self.config.eval.batch_size, count)
    if (batch, n_points) not in self._samplers:
      task = self.config.task.copy_and_resolve_references()
      task.n_points = n_points
      self._samplers[batch, n_points] = jax.jit(
          lambda key, first: data.sample_batch(data.step_key(key, 0), first, batch, task, task.n_dims))
    # Prompt j is example j of the stream of `key`, whatever the batch size.
    parts = [self._samplers[batch, n_points](key, first) for first in range(0, count, batch)]
    return jax.tree.map(lambda *a: jnp.concatenate(a)[:count], *parts)

  def layer_predictions(self, params, readouts, prompts: data.Batch) -> tuple[np.ndarray, np.ndarray]:
    """Each layer's read-out predictions [L, B, N] and the model's own output [B, N]."""
    batch = self.config.eval.batch_size
    parts = [self.layer_chunk(params, readouts, prompts.xs_BxNxD[i:i + batch], prompts.ys_BxN[i:i + batch])
             for i in range(0, prompts.ys_BxN.shape[0], batch)]
    return (np.concatenate([np.asarray(p[0]) for p in parts], axis=1),
            np.concatenate([np.asarray(p[1]) for p in parts], axis=0))

  def layer_induced_weights(self, params, readouts, key: jax.Array) -> tuple[np.ndarray, data.Batch]:
    """Each layer's induced weights [L, B, N, D] on `sim_w_prompts` prompts, and those prompts.

    The queries are extra points of each prompt (same Sigma and w), fed as a query stream that sees only the
    prefix before it (the model called with `queries`), so one pass covers every prefix.
    """
    e, n, d = self.config.eval, self.config.task.n_points, self.config.task.n_dims
    b = e.sim_w_prompts
    extended = self.prompts(key, b, n + n * e.sim_w_queries)
    prompts = data.Batch(extended.xs_BxNxD[:, :n], extended.ys_BxN[:, :n], extended.ws_BxD)
    queries_BxNxQxD = extended.xs_BxNxD[:, n:].reshape(b, n, e.sim_w_queries, d)
    # Every query is a token at every layer: a few prompts per call bound the memory.
    step = min(b, 4)
    parts = [self.sim_w_chunk(params, readouts, prompts.xs_BxNxD[i:i + step], prompts.ys_BxN[i:i + step],
                              queries_BxNxQxD[i:i + step]) for i in range(0, b, step)]
    return np.concatenate([np.asarray(p) for p in parts], axis=1), prompts


def algorithm_weights(config: ml_collections.ConfigDict, xs_BxNxD, ys_BxN) -> dict[str, jax.Array]:
  """Every algorithm setting's estimate on every prefix, [B, K, T, D] (K = 1 for those without steps)."""
  e = config.eval
  return {
      "newton": algorithms.iterative_newton(xs_BxNxD, ys_BxN, e.newton_steps, e.newton_alpha)[:, 1:],
      "gd": algorithms.gradient_descent(xs_BxNxD, ys_BxN, e.gd_steps, e.gd_learning_rate, e.gd_gradient_scale),
      "gd_log": algorithms.gradient_descent(xs_BxNxD, ys_BxN, e.gd_log_steps, e.gd_learning_rate,
                                            e.gd_gradient_scale),
      "least_squares": algorithms.least_squares(xs_BxNxD, ys_BxN)[:, None],
      "online_gd": algorithms.online_gradient_descent(xs_BxNxD, ys_BxN)[:, None],
  }


def algorithm_predictions(config: ml_collections.ConfigDict, xs_BxNxD, ys_BxN) -> dict[str, np.ndarray]:
  """Predictions [K, B, N] of every algorithm setting, from its weights."""
  return {name: np.asarray(jnp.swapaxes(algorithms.predict(ws, xs_BxNxD), 0, 1))
          for name, ws in algorithm_weights(config, xs_BxNxD, ys_BxN).items()}


def algorithm_induced_weights(config: ml_collections.ConfigDict, xs_BxNxD, ys_BxN) -> dict[str, np.ndarray]:
  """Every algorithm setting's estimate before each position t = 0..N-1, [K, B, N, D]: its induced weights,
  exactly (the fit of Fu et al.'s eq. 7 recovers them from >= d queries, as the algorithms are linear in the
  query)."""
  return {name: np.asarray(jnp.swapaxes(ws[:, :, :-1], 0, 1))
          for name, ws in algorithm_weights(config, xs_BxNxD, ys_BxN).items()}


def _steps(config, name) -> list[int]:
  e = config.eval
  return {"newton": list(range(1, e.newton_steps + 1)), "gd": list(e.gd_steps), "gd_log": list(e.gd_log_steps)}[name]


def _fits(config, best_by_grid: dict) -> dict:
  first, last = config.eval.fit_layers
  layers = np.arange(first, last + 1)
  newton = similarity.linear_fit(layers, np.asarray(best_by_grid["newton"]["steps"])[layers - 1])
  gd_log = similarity.linear_fit(layers, np.log2(np.asarray(best_by_grid["gd_log"]["steps"])[layers - 1]))
  return {
      "layers": [int(first), int(last)],
      "newton": {**newton, "steps_per_layer": newton["slope"]},
      "gd_log": {**gd_log, "doublings_per_layer": gd_log["slope"]},
  }


def _tolist(tree):
  return jax.tree.map(lambda a: np.asarray(a).tolist(), tree)


def dataset_prompts(config: ml_collections.ConfigDict) -> data.Batch:
  """The first `eval.num_prompts` prompts, by index, of the frozen set `eval.dataset_setting` in
  `eval.dataset_dir` (icl_jax/datasets)."""
  errors = config_checks.dataset_errors(config)
  if errors:
    raise config_checks.ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
  arrays = datasets.load_prompts(config.eval.dataset_dir, config.eval.dataset_setting)
  return data.Batch(*(jnp.asarray(a[:config.eval.num_prompts]) for a in arrays))


class Evaluator:
  """Evaluates parameters of `config.model`; compiles on the first call only."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self._programs = _Programs(config, models.build_model(config.model))
    self._keys = eval_keys(config.seed)
    # A frozen set replaces only the main prompts: the probes are fit on prompts other than those they are
    # scored on, and SimW needs query points per prefix that the set does not hold, so both stay fresh.
    self._dataset_prompts = dataset_prompts(config) if config.eval.dataset_dir else None

  def __call__(self, params: dict) -> dict:
    config, programs, keys = self.config, self._programs, self._keys
    e, n_dims = config.eval, config.task.n_dims
    clock = _Clock()
    readouts = programs.fit_probes(params, keys["probes"])
    clock.lap("probes_s", readouts)
    prompts = self._dataset_prompts
    if prompts is None:
      prompts = programs.prompts(keys["prompts"], e.num_prompts, config.task.n_points)
    layers_LxBxN, model_BxN = programs.layer_predictions(params, readouts, prompts)
    clock.lap("model_s")
    algos = algorithm_predictions(config, prompts.xs_BxNxD, prompts.ys_BxN)
    clock.lap("algorithms_s")

    ys_BxN = np.asarray(prompts.ys_BxN)
    curves = {"layers": layers_LxBxN, "model": model_BxN[None], "zero": np.zeros_like(ys_BxN)[None], **algos}
    errors = similarity.bootstrap_means(
        similarity.squared_errors(np.concatenate(list(curves.values())), ys_BxN, n_dims), keys["bootstrap"],
        e.bootstrap_samples, e.confidence)
    bounds = np.cumsum([0] + [c.shape[0] for c in curves.values()])
    error = {name: {stat: v[bounds[i]:bounds[i + 1]] for stat, v in errors.items()} for i, name in enumerate(curves)}
    sim_e = {k: similarity.similarity_of_errors(layers_LxBxN, p, ys_BxN, e.sim_e_include_first) for k, p in algos.items()}
    # How far the model's own predictions are from least squares', per context length.
    distance_N = np.mean(np.square(model_BxN - algos["least_squares"][0]), axis=0) / n_dims
    clock.lap("metrics_s", sim_e)

    layer_weights, sim_w_prompts = programs.layer_induced_weights(params, readouts, keys["sim_w"])
    weights = algorithm_induced_weights(config, sim_w_prompts.xs_BxNxD, sim_w_prompts.ys_BxN)
    sim_w = {k: similarity.similarity_of_weights(layer_weights, w) for k, w in weights.items()}
    clock.lap("sim_w_s", sim_w)
    results = _summarise(config, error, sim_e, sim_w, clock.laps)
    results["distance_to_least_squares_per_dim"] = distance_N.tolist()
    return results


class _Clock:
  """Wall time of each stage, waiting for the device to finish the stage's results."""

  def __init__(self):
    self.laps, self._last = {}, time.perf_counter()

  def lap(self, name, *results):
    jax.block_until_ready(results)
    now = time.perf_counter()
    self.laps[name] = now - self._last
    self.laps["total_s"] = self.laps.get("total_s", 0.0) + now - self._last
    self._last = now


def _summarise(config, error, sim_e, sim_w, timings) -> dict:
  best = {k: similarity.best_match(sim_e[k], _steps(config, k)) for k in GRIDS}
  best_w = {k: similarity.best_match(sim_w[k], _steps(config, k)) for k in GRIDS}

  def table(sim, best):
    return {"newton": best["newton"]["similarity"][-1], "gd": best["gd"]["similarity"][-1],
            **{k: float(np.asarray(sim[k])[-1, 0]) for k in SINGLE}}

  return {
      "settings": {"eval": run_logs.config_dict(config.eval), "task": run_logs.config_dict(config.task),
                   "model": run_logs.config_dict(config.model), "seed": config.seed},
      "layers": list(range(1, config.model.num_layers + 1)),
      "context_lengths": list(range(config.task.n_points)),
      "grids": {k: _steps(config, k) for k in GRIDS},
      "error_per_dim": _tolist(error),
      "sim_e": _tolist(sim_e),
      "sim_w": _tolist(sim_w),
      "best_match": {k: v["steps"] for k, v in best.items()},
      "best_similarity": {k: v["similarity"] for k, v in best.items()},
      "best_match_sim_w": {k: v["steps"] for k, v in best_w.items()},
      "best_similarity_sim_w": {k: v["similarity"] for k, v in best_w.items()},
      "fits": _fits(config, best),
      "table1": {"sim_e": table(sim_e, best), "sim_w": table(sim_w, best_w)},
      "timing": timings,
  }


def evaluate(config: ml_collections.ConfigDict, workdir, params: dict | None = None) -> dict:
  """Evaluates the latest checkpoint in `workdir` (or `params`); writes WORKDIR/eval/results.json and figures."""
  workdir = pathlib.Path(workdir)
  step = None
  if params is None:
    params, step = checkpointing.load_params(config, workdir)
  results = Evaluator(config)(params)
  results["settings"]["checkpoint_step"] = step
  out = workdir / "eval"
  if run_logs.is_writer():
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    figures.write_all(results, out)
  _log_summary(results)
  return results


def _log_summary(results: dict) -> None:
  t, fits = results["timing"], results["fits"]
  logging.info("Evaluation in %.1f s (incl. compilation): %s.", t["total_s"],
               ", ".join(f"{k[:-2]} {v:.1f}" for k, v in t.items() if k != "total_s"))
  logging.info("Best-matching Newton steps per layer: %s (layers %s: %s steps/layer, R^2 %s).",
               results["best_match"]["newton"], fits["layers"], fits["newton"]["slope"], fits["newton"]["r2"])
  logging.info("Best-matching GD steps (log grid) per layer: %s (%s doublings/layer, R^2 %s).",
               results["best_match"]["gd_log"], fits["gd_log"]["doublings_per_layer"], fits["gd_log"]["r2"])
  table = results["table1"]["sim_e"]
  paper = PAPER_TABLE1.get(results["settings"]["model"]["family"])
  logging.info("Final layer's best SimE: Newton %.3f, GD %.3f, online GD %.3f, OLS %.3f%s.", table["newton"],
               table["gd"], table["online_gd"], table["least_squares"],
               f" (Fu et al.'s Table 1: {paper})" if paper else "")


# Fu et al.'s Table 1 (SimE of the last layer with Newton, GD, online GD) for the families they report.
PAPER_TABLE1 = {"gpt2": ".991, .957, .806", "lstm": ".920, .916, .954"}
