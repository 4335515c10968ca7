"""Ahn et al. 2023's analysis of a trained linear self-attention (models/lsa.py): which preconditioner A_i each
layer learned (a_i and Dist(Sigma^1/2 A_i Sigma^1/2, I), Theorem 3) and how its test loss compares with
(preconditioned) GD and least squares. `analyse` returns the dict that `evaluate` writes as
WORKDIR/lsa_analysis/results.json, `FIGURES` draw lsa_analysis.{png,pdf} and lsa_matrices.{png,pdf} from it. README
("Other model families") says how A_i is read off the weights and what each number means.
"""

import jax
import jax.numpy as jnp
import matplotlib
import matplotlib.ticker
import ml_collections
import numpy as np
from matplotlib.figure import Figure

from icl_jax import data
from icl_jax import models
from icl_jax.analysis import algorithms
from icl_jax.analysis.precision import highest_precision
from icl_jax.models import lsa

# Ahn et al.'s Fig. 2 (§4.3, d = 5, n = 20, L = 3, Sigma = U^T diag(1, 1, 0.25, 0.0625, 1) U, sparse form).
PAPER_A = (-0.69, -0.43, -1.71)
# Step sizes searched for L-step (preconditioned) GD: the mean-gradient Hessian is ~ Sigma (~ I after Sigma^-1
# preconditioning), so steps beyond ~2 / lambda_max diverge; the grid spans well past both ends.
STEP_GRID = tuple(float(v) for v in np.geomspace(0.01, 4.0, 121))
STYLE = {"font.size": 10}  # matplotlib rc settings of the figures.
TUNE_PROMPTS = 2048  # Prompts of the step-size search, apart from the test prompts.


def read_off(params: dict) -> list[np.ndarray]:
  """A_i = P_i[d, d] * Q_i[:d, :d]^T for every layer (see the module docstring), [D, D] each."""
  ps, qs = lsa.matrices(params)
  return [np.asarray(p[-1, -1] * q[:-1, :-1].T) for p, q in zip(ps, qs)]


def identity_fit(m_DxD: np.ndarray) -> tuple[float, float]:
  """(alpha, Dist(M, I)): alpha = argmin_a ||M - a I||_F = tr(M)/d and min_a ||M - a I||_F / ||M||_F."""
  m_DxD = np.asarray(m_DxD, np.float64)
  alpha = float(np.trace(m_DxD) / m_DxD.shape[0])
  norm = float(np.linalg.norm(m_DxD))
  dist = float(np.linalg.norm(m_DxD - alpha * np.eye(m_DxD.shape[0])) / norm) if norm > 0 else 0.0
  return alpha, dist


def sqrtm_psd(sigma_DxD: np.ndarray) -> np.ndarray:
  eig_D, vec_DxD = np.linalg.eigh(np.asarray(sigma_DxD, np.float64))
  return (vec_DxD * np.sqrt(np.clip(eig_D, 0.0, None))) @ vec_DxD.T


def layer_report(params: dict, sigma_DxD: np.ndarray) -> list[dict]:
  """Per layer: a_i and Dist(Sigma^1/2 A_i Sigma^1/2, I), the step size -a_i, Dist(A_i, I), the matrix M_i, and
  for the full form b_i and Dist(B_i, I)."""
  root_DxD = sqrtm_psd(sigma_DxD)
  report = []
  for i, a_DxD in enumerate(read_off(params)):
    m_DxD = root_DxD @ np.asarray(a_DxD, np.float64) @ root_DxD
    alpha, dist = identity_fit(m_DxD)
    entry = {
      "layer": i + 1,
      "a": alpha,
      "dist": dist,
      "step_size": -alpha,
      "dist_unscaled": identity_fit(a_DxD)[1],
      "scaled_matrix": m_DxD.tolist(),
      "A": np.asarray(a_DxD, np.float64).tolist(),
    }
    if "B" in params[f"layer_{i}"]:
      b_DxD = np.asarray(params[f"layer_{i}"]["B"], np.float64)
      entry["b"], entry["b_dist"] = identity_fit(b_DxD)
    report.append(entry)
  return report


def _prompts(task: ml_collections.ConfigDict, key: jax.Array, count: int, batch: int = 1024) -> data.Batch:
  sample = jax.jit(lambda first: data.sample_batch(data.step_key(key, 0), first, batch, task, task.n_dims))
  parts = [sample(first) for first in range(0, count, batch)]
  return jax.tree.map(lambda *a: jnp.concatenate(a)[:count], *parts)


def _batched(fn, prompts: data.Batch, batch: int = 1024) -> np.ndarray:
  """fn(xs, ys) -> [B, N] over the prompts in batches (bounded memory), [num_prompts, N]."""
  return np.concatenate(
    [
      np.asarray(fn(prompts.xs_BxNxD[i : i + batch], prompts.ys_BxN[i : i + batch]))
      for i in range(0, prompts.ys_BxN.shape[0], batch)
    ]
  )


def _squared_errors(preds_BxN: np.ndarray, prompts: data.Batch) -> np.ndarray:
  return np.square(np.asarray(preds_BxN, np.float64) - np.asarray(prompts.ys_BxN, np.float64))


def model_predictions(model, params):
  """fn(xs, ys) -> the model's predictions [B, N], at HIGHEST precision like every product of the analysis."""
  return highest_precision(jax.jit(lambda xs, ys: model.apply({"params": params}, xs, ys)))


def gd_predictions(num_steps: int, preconditioner_DxD):
  """fn(xs, ys, learning_rate) -> predictions [B, N] of num_steps (preconditioned) GD steps on every prefix."""

  @highest_precision
  @jax.jit
  def predict(xs, ys, learning_rate):
    ws = algorithms.gradient_descent(xs, ys, (num_steps,), learning_rate, "mean", preconditioner_DxD)
    return algorithms.predict(ws, xs)[:, 0]

  return predict


def tune_step_size(predict, prompts: data.Batch, grid=STEP_GRID) -> tuple[float, np.ndarray]:
  """The step size of `grid` with the lowest loss at the last position on `prompts`, and the loss of each."""
  losses = []
  for learning_rate in grid:
    errors = _squared_errors(predict(prompts.xs_BxNxD, prompts.ys_BxN, learning_rate), prompts)[:, -1]
    losses.append(float(np.mean(errors)) if np.all(np.isfinite(errors)) else np.inf)
  losses = np.asarray(losses)
  return float(grid[int(np.argmin(losses))]), losses


def analyse(config: ml_collections.ConfigDict, params: dict, num_prompts: int = 4096, tune_prompts: int = 2048) -> dict:
  """The whole analysis of `params` (an LSARegressor's) for the run `config`: a dict for results.json."""
  task = config.task
  if config.model.family != "lsa":
    raise ValueError(f"config.model.family = {config.model.family!r}: the LSA analysis needs 'lsa'")
  sigma_DxD = np.asarray(data.covariance_matrix(task), np.float64)
  sigma_inv_DxD = jnp.asarray(np.linalg.inv(sigma_DxD), jnp.float32)
  num_layers, n = config.model.num_layers, task.n_points
  layers = layer_report(params, sigma_DxD)

  eval_key = data.run_keys(config.seed)["eval"]
  test = _prompts(task, jax.random.fold_in(eval_key, 1), num_prompts)
  tune = _prompts(task, jax.random.fold_in(eval_key, 2), tune_prompts)
  model = models.build_model(config.model)
  errors = {"lsa": _squared_errors(_batched(model_predictions(model, params), test), test)}
  tuned = {}
  for name, preconditioner in (("preconditioned_gd", sigma_inv_DxD), ("gd", jnp.eye(task.n_dims))):
    predict = gd_predictions(num_layers, preconditioner)
    learning_rate, grid_losses = tune_step_size(predict, tune)
    tuned[name] = {"learning_rate": learning_rate, "grid": list(STEP_GRID), "grid_loss": grid_losses.tolist()}
    errors[name] = _squared_errors(_batched(lambda xs, ys: predict(xs, ys, learning_rate), test), test)
  if config.model.lsa_sparse:
    # Theorem 3's critical point with the learned scalars: the sparse LSA with A_i = a_i Sigma^-1 exactly. (In
    # the full form the A_i act on x's moved by the B's: these steps alone mean nothing there.)
    sparse = models.build_model(
      ml_collections.ConfigDict({"family": "lsa", "num_layers": num_layers, "lsa_sparse": True, "lsa_init_std": 0.0})
    )
    planted = lsa.params_from_preconditioners([-layer["a"] * sigma_inv_DxD for layer in layers])
    errors["preconditioned_gd_learned_steps"] = _squared_errors(
      _batched(model_predictions(sparse, planted), test), test
    )
  least_squares = jax.jit(lambda xs, ys: algorithms.predict(algorithms.least_squares(xs, ys), xs))
  errors["least_squares"] = _squared_errors(_batched(least_squares, test), test)
  errors["zero"] = np.square(np.asarray(test.ys_BxN, np.float64))

  test_loss = {
    name: {"mean": e.mean(0).tolist(), "standard_error": (e.std(0, ddof=1) / np.sqrt(len(e))).tolist()}
    for name, e in errors.items()
  }
  for name, extra in tuned.items():
    test_loss[name].update(extra)
  results = {
    "settings": {
      "n_dims": task.n_dims,
      "n_points": n,
      "num_layers": num_layers,
      "lsa_sparse": bool(config.model.lsa_sparse),
      "seed": config.seed,
      "num_prompts": num_prompts,
      "tune_prompts": tune_prompts,
    },
    "sigma": sigma_DxD.tolist(),
    "sigma_eigenvalues": np.linalg.eigvalsh(sigma_DxD).tolist(),
    "layers": layers,
    "a": [layer["a"] for layer in layers],
    "dist": [layer["dist"] for layer in layers],
    "b": None if config.model.lsa_sparse else [layer["b"] for layer in layers],
    "a_sorted": sorted(layer["a"] for layer in layers),
    "context_lengths": list(range(n)),
    "test_loss": test_loss,
    "final_test_loss": {name: values["mean"][-1] for name, values in test_loss.items()},
  }
  if num_layers == len(PAPER_A):
    results["paper"] = {
      "a": list(PAPER_A),
      "a_sorted": sorted(PAPER_A),
      "dist": "close to 0 (Fig. 2)",
      "source": "Ahn et al. 2023 Fig. 2 (§4.3: d = 5, n = 20, L = 3, sparse form)",
    }
  return results


_CURVES = (
  ("lsa", "trained LSA", {"color": "black", "lw": 2.2}),
  ("preconditioned_gd_learned_steps", "Σ⁻¹-preconditioned GD, learned steps −a_i", {"color": "tab:green", "ls": "--"}),
  ("preconditioned_gd", "Σ⁻¹-preconditioned GD, tuned step", {"color": "tab:blue", "ls": "-."}),
  ("gd", "GD, tuned step", {"color": "tab:orange", "ls": "-."}),
  ("least_squares", "least squares (≈ 0 for t ≥ d)", {"color": "tab:red"}),
  ("zero", "zero predictor", {"color": "0.45", "ls": ":"}),
)


def figure_summary(results: dict) -> Figure:
  """Test loss against context length, and a_i and Dist per layer next to the paper's."""
  s = results["settings"]
  figure = Figure(figsize=(15, 4.8), layout="constrained")
  ax_loss, ax_a, ax_dist = figure.subplots(1, 3, width_ratios=(1.6, 1, 1))
  lengths = np.asarray(results["context_lengths"])
  for name, label, style in _CURVES:
    if name not in results["test_loss"]:
      continue
    curve = results["test_loss"][name]
    if "learning_rate" in curve:
      label += f" (η = {curve['learning_rate']:.3g})"
    mean, se = np.asarray(curve["mean"]), np.asarray(curve["standard_error"])
    shown = lengths >= 1
    ax_loss.plot(lengths[shown], mean[shown], label=label, **style)
    ax_loss.fill_between(lengths[shown], (mean - se)[shown], (mean + se)[shown], color=style["color"], alpha=0.15)
  ax_loss.set_yscale("log")
  # The axis spans the model and the GD variants, and stops at 30x the zero predictor's loss (all step-size
  # methods blow up on a few points, as the steps are sized for n = 20); least squares is exact (~1e-12) once
  # t >= d and leaves the axis there.
  shown_means = [
    np.asarray(curve["mean"])[1:]
    for name, curve in results["test_loss"].items()
    if name not in ("least_squares", "zero")
  ]
  top = 30 * max(results["test_loss"]["zero"]["mean"])
  ax_loss.set_ylim(0.3 * min(float(m[m > 0].min()) for m in shown_means), top)
  ax_loss.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  ax_loss.set_xlabel("in-context examples t")
  ax_loss.set_ylabel("test loss E(ŷ − y)²")
  ax_loss.set_title(f"Test loss, {s['num_prompts']} prompts (± s.e.)")
  ax_loss.legend(fontsize=8)
  layers = np.arange(1, s["num_layers"] + 1)
  ax_a.plot(layers, results["a"], "o-", color="black", label="trained")
  if "paper" in results:
    ax_a.plot(layers, results["paper"]["a"], "s--", color="tab:red", label="Ahn et al. Fig. 2")
  ax_a.axhline(0, color="0.7", lw=0.8)
  ax_a.set_xticks(layers)
  ax_a.set_xlabel("layer i")
  ax_a.set_ylabel("a_i = tr(Σ^½ A_i Σ^½) / d")
  ax_a.set_title("a_i, the best multiple of I for Σ^½ A_i Σ^½")
  ax_a.legend()
  width = 0.38
  ax_dist.bar(layers - width / 2, results["dist"], width, color="black", label="Dist(Σ^½ A_i Σ^½, I)")
  ax_dist.bar(
    layers + width / 2,
    [layer["dist_unscaled"] for layer in results["layers"]],
    width,
    color="0.7",
    label="Dist(A_i, I)",
  )
  ax_dist.set_ylim(0, 1)
  ax_dist.set_xticks(layers)
  ax_dist.set_xlabel("layer i")
  ax_dist.set_title("min_α ‖M − αI‖_F / ‖M‖_F")
  ax_dist.legend()
  form = "sparse" if s["lsa_sparse"] else "full"
  figure.suptitle(
    f"Linear self-attention ({form} form), d = {s['n_dims']}, n = {s['n_points'] - 1}, "
    f"L = {s['num_layers']}, eigenvalues of Σ {np.round(results['sigma_eigenvalues'], 4).tolist()}"
  )
  return figure


def figure_matrices(results: dict) -> Figure:
  """Each layer's Sigma^1/2 A_i Sigma^1/2 as a heatmap with its entries (Ahn et al.'s code's imshow)."""
  layers = results["layers"]
  figure = Figure(figsize=(4.2 * len(layers), 4), layout="constrained")
  for ax, layer in zip(np.atleast_1d(figure.subplots(1, len(layers))), layers):
    m = np.asarray(layer["scaled_matrix"])
    bound = max(float(np.abs(m).max()), 1e-12)
    image = ax.imshow(m, cmap="RdBu_r", vmin=-bound, vmax=bound)
    for (i, j), value in np.ndenumerate(m):
      ax.text(
        j,
        i,
        f"{value:.2f}",
        ha="center",
        va="center",
        fontsize=8,
        color="white" if abs(value) > 0.5 * bound else "black",
      )
    ax.set_title(f"layer {layer['layer']}: a = {layer['a']:.3f}, Dist = {layer['dist']:.3f}")
    ax.set_xticks([])
    ax.set_yticks([])
    figure.colorbar(image, ax=ax, shrink=0.8)
  figure.suptitle("Σ^½ A_i Σ^½ per layer")
  return figure


def summary_lines(results: dict) -> list[str]:
  paper = results.get("paper", {}).get("a")
  lines = []
  for i, layer in enumerate(results["layers"]):
    line = f"layer {layer['layer']}: a = {layer['a']:+.3f}  Dist(Σ^½AΣ^½, I) = {layer['dist']:.3f}"
    line += f"  Dist(A, I) = {layer['dist_unscaled']:.3f}"
    if "b" in layer:
      line += f"  b = {layer['b']:+.3f}  Dist(B, I) = {layer['b_dist']:.3f}"
    if paper:
      line += f"  (paper a = {paper[i]:+.2f})"
    lines.append(line)
  final = results["final_test_loss"]
  lines.append(
    "test loss at t = {}: ".format(results["context_lengths"][-1])
    + ", ".join(f"{name} {value:.4g}" for name, value in final.items())
  )
  return lines


def figures(results: dict) -> dict:
  """The figures of `results` by file stem, drawn when called."""
  return {"lsa_analysis": lambda: figure_summary(results), "lsa_matrices": lambda: figure_matrices(results)}
