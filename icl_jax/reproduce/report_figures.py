"""The report's figures beyond the best matches and the separability: the papers' other figures drawn from the
runs' summaries, averaged over seeds. Each maker takes {experiment: [summaries of its seeds]} and returns
(Figure, caption) or None when no summary has what it draws; the caption says what is shown, at which scale
(d, points, layers), and the paper's value where there is one.
"""

import matplotlib
import numpy as np
from matplotlib import patches
from matplotlib.figure import Figure

from icl_jax.analysis import forgetting
from icl_jax.analysis import lsa_analysis
from icl_jax.reproduce import claims as claims_lib
from icl_jax.reproduce import experiments

matplotlib.use("Agg")

GPT2_EXPERIMENTS = ("isotropic", "kappa100", "noisy")
RECALL_FLOOR = 1e-5  # Errors below this (least squares' float32 round-off once n >= d) are drawn on it.
HEATMAP_GRIDS = (("newton", "Iterative Newton"), ("gd", "GD"), ("gd_log", "GD, log grid"))


def _with(by_experiment: dict, names, *keys) -> list[tuple[str, list[dict]]]:
  """(name, summaries) of the experiments in `names` whose summaries all have eval[key] (not None) for `keys`."""
  shown = []
  for name in names:
    found = [r for r in by_experiment.get(name, []) if "config" in r]
    if found and all(all(r["eval"].get(k) is not None for k in keys) for r in found):
      shown.append((name, found))
  return shown


def _scale_text(found: list[dict]) -> str:
  c = found[0]["config"]
  if c.model.family == "lsa":
    return f"d = {c.task.n_dims}, {c.task.n_points - 1} examples and a query, {c.model.num_layers} layers"
  return f"d = {c.task.n_dims}, {c.task.n_points} points, {c.model.num_layers} layers"


def _seeds(found: list[dict]) -> str:
  return f"{len(found)} seed{'s' * (len(found) > 1)}"


def _mean(found: list[dict], *keys) -> np.ndarray:
  """The mean over seeds of eval[keys...]."""

  def get(run):
    node = run["eval"]
    for key in keys:
      node = node[key]
    return np.asarray(node, np.float64)

  return np.mean([get(r) for r in found], axis=0)


def error_vs_layer(by_experiment: dict):
  """Fu et al. Fig. 2: error/d of each layer's read-out at several context lengths, and fixed-step GD's."""
  shown = _with(by_experiment, GPT2_EXPERIMENTS, "error_vs_layer")
  if not shown:
    return None
  fig = Figure(figsize=(4.2 * (len(shown) + 1), 4), layout="constrained")
  axes = np.atleast_1d(fig.subplots(1, len(shown) + 1, sharey=True))
  for ax, (name, found) in zip(axes, shown):
    curves = found[0]["eval"]["error_vs_layer"]
    lengths = curves["context_lengths"]
    colours = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, len(lengths)))
    layers_LxT = _mean(found, "error_vs_layer", "layers")
    for i, (n, colour) in enumerate(zip(lengths, colours)):
      ax.plot(np.arange(1, len(layers_LxT) + 1), layers_LxT[:, i], "o-", ms=3, color=colour, label=f"n = {n}")
    ax.set(yscale="log", xlabel="layer", title=f"{name} ({_seeds(found)})")
    if name == shown[0][0]:
      gd_KxT = _mean(found, "error_vs_layer", "gd")
      for i, colour in enumerate(colours):
        axes[-1].plot(curves["gd_steps"], gd_KxT[:, i], "s--", ms=3, color=colour, label=f"n = {lengths[i]}")
      axes[-1].set(yscale="log", xlabel="GD steps (fixed step size)", title=f"GD on {name}'s prompts")
  axes[0].set_ylabel("error / d")
  axes[-1].legend(fontsize="small", title="examples")
  found = shown[0][1]
  window = found[0]["eval"]["convergence"]["layers"]
  caption = (
    f"Error/d against the layer at the paper's context lengths scaled to d (Fu et al. Fig. 2: n ∈ {{5, 10, 15, 20, "
    f"22, 25, 30, 35}} at d = 20), {_scale_text(found)}; mean over seeds. Right: GD with the evaluation's fixed step "
    f"after 1..{len(found[0]['eval']['error_vs_layer']['gd_steps'])} steps. The paper: for n > d layers 3-8 converge "
    f"superlinearly and GD sublinearly (graded by `superlinear`, window layers {window[0]}-{window[1]})."
  )
  return fig, caption


def sim_e_heatmaps(by_experiment: dict):
  """Fu et al. Figs. 8, 10: SimE of every layer with every Newton / GD step count, mean over seeds."""
  shown = _with(by_experiment, GPT2_EXPERIMENTS, "sim_e", "grids")
  if not shown:
    return None
  fig = Figure(figsize=(15, 3.6 * len(shown)), layout="constrained")
  axes = np.atleast_2d(fig.subplots(len(shown), len(HEATMAP_GRIDS)))
  for row, (name, found) in zip(axes, shown):
    for ax, (grid, title) in zip(row, HEATMAP_GRIDS):
      sim_LxK = _mean(found, "sim_e", grid)
      steps = found[0]["eval"]["grids"][grid]
      image = ax.imshow(sim_LxK, aspect="auto", cmap="viridis", interpolation="nearest")
      for layer, k in enumerate(np.argmax(sim_LxK, axis=1)):
        ax.add_patch(patches.Rectangle((k - 0.5, layer - 0.5), 1, 1, fill=False, ec="red", lw=1.5, clip_on=False))
      stride = max(1, len(steps) // 8)
      ax.set_xticks(
        range(0, len(steps), stride), [str(s) for s in steps[::stride]], fontsize="small", rotation=45, ha="right"
      )
      ax.set_yticks(range(len(sim_LxK)), range(1, len(sim_LxK) + 1), fontsize="small")
      ax.set(xlabel=f"{title} steps", ylabel="layer", title=f"{name} ({_seeds(found)}): SimE with {title}")
      fig.colorbar(image, ax=ax, shrink=0.8)
  caption = (
    f"SimE of each layer's read-out with each step count of Iterative Newton, GD and GD on a log grid (Fu et al. "
    f"Figs. 8, 10), mean over seeds, the best step of each layer boxed; {_scale_text(shown[0][1])}. The paper's "
    f"best matches at d = 20: Newton {', '.join(map(str, claims_lib.PAPER_NEWTON_STEPS))}; GD (log grid) 1, 1, 4, "
    "8, 32, 64, 256, 512, 1024, 4096, 4096, 4096."
  )
  return fig, caption


def ols_match(by_experiment: dict):
  """Fu et al. Fig. 14: each late layer's distance from least squares per context length."""
  shown = _with(by_experiment, GPT2_EXPERIMENTS, "ols_distance")
  if not shown:
    return None
  fig = Figure(figsize=(4.5 * len(shown), 4), layout="constrained")
  axes = np.atleast_1d(fig.subplots(1, len(shown), sharey=True))
  for ax, (name, found) in zip(axes, shown):
    ratio_LxN = _mean(found, "ols_distance", "per_dim") / _mean(found, "ols_distance", "zero_per_dim")[None]
    after = found[0]["eval"]["fits"]["layers"][1]
    colours = matplotlib.colormaps["plasma"](np.linspace(0, 0.8, len(ratio_LxN)))
    for layer in range(1, len(ratio_LxN) + 1):
      late = layer > after
      ax.plot(
        np.arange(1, ratio_LxN.shape[1]),
        ratio_LxN[layer - 1, 1:],
        "-" if late else ":",
        lw=1.8 if late else 0.8,
        color=colours[layer - 1],
        label=f"layer {layer}" if late or layer == 1 else None,
      )
    ax.axhline(claims_lib.LEARNED_BAR, color="0.4", lw=0.8, ls="--")
    ax.set(yscale="log", xlabel="examples n", title=f"{name} ({_seeds(found)})")
    ax.legend(fontsize="small")
  axes[0].set_ylabel("distance from least squares / zero's error")
  caption = (
    "Per layer and context length, the mean squared distance of the read-out's prediction from least squares', "
    "over the zero predictor's error (Fu et al. Fig. 14: the late layers match OLS once given more than one "
    f"example; no number given); solid: the layers after the fit range; dashed line: `late_layers_match_ols`'s "
    f"bound {claims_lib.LEARNED_BAR:g}; {_scale_text(shown[0][1])}; mean over seeds."
  )
  return fig, caption


def forgetting_curves(by_experiment: dict):
  """Fu et al. Fig. 5: recall of example n - g against the gap g, for the GPT-2, the LSTM and online GD."""
  shown = _with(by_experiment, ("isotropic", "lstm"), "forgetting")
  if not shown:
    return None
  fig = Figure(figsize=(7, 4.5), layout="constrained")
  ax = fig.add_subplot()
  curves = [(f"{name}: {r[0]['config'].model.family}", r, "model") for name, r in shown]
  curves += [(f"online GD ({shown[0][0]}'s prompts)", shown[0][1], "online_gd")]
  curves += [(f"least squares ({shown[0][0]}'s prompts)", shown[0][1], "least_squares")]
  for (label, found, who), colour in zip(curves, ("black", "tab:purple", "tab:orange", "tab:red")):
    gaps = found[0]["eval"]["forgetting"]["gaps"]
    mean = _mean(found, "forgetting", "error_per_dim", who, "mean")
    ax.plot(gaps, np.maximum(mean, RECALL_FLOOR), "o-", ms=3, color=colour, label=f"{label} ({_seeds(found)})")
  found = shown[0][1]
  n, d = found[0]["eval"]["forgetting"]["examples"], found[0]["config"].task.n_dims
  paper = sorted({min(n - 1, round(g * n / forgetting.PAPER_EXAMPLES)) for g in forgetting.PAPER_GAPS})
  for g in paper:
    ax.axvline(g, color="0.85", lw=0.8, zorder=0)
  ax.set(yscale="log", xlabel="gap g (query repeats example n − g)", ylabel="error / d of the recall")
  ax.legend(fontsize="small")
  caption = (
    f"The forgetting test (Fu et al. Fig. 5, App. A.6: n = 20 at d = 20, g ∈ {{19, 15, 11, 7, 3}}; this project's "
    f"reading in `icl_jax/analysis/forgetting.py`): after n = {n} examples at d = {d} the query repeats example "
    f"n − g; error/d of the recall against g, mean over seeds (drawn at {RECALL_FLOOR:g} when below: an exact "
    "recall); grey lines: the paper's gaps scaled to n. The paper: "
    "the LSTM and online GD forget early examples, the Transformer does not."
  )
  return fig, caption


def hidden_size(by_experiment: dict):
  """Fu et al. Fig. 6: error/d at 2d points over zero's against the hidden size, 1-head 12-layer GPT-2s."""
  names = [f"width{w}" for w in experiments.PAPER_HIDDEN_SIZES]
  shown = [(name, found) for name, found in _with(by_experiment, names) if found[0].get("curve")]
  if not shown:
    return None
  fig = Figure(figsize=(6, 4), layout="constrained")
  ax = fig.add_subplot()
  widths, means, lows, highs = [], [], [], []
  for name, found in shown:
    quantity = claims_lib.aggregate([claims_lib.error_ratio_at_2d(r) for r in found])
    low, high = quantity.interval()
    widths.append(found[0]["config"].model.width)
    means.append(quantity.mean), lows.append(low), highs.append(high)
  means, lows, highs = map(np.asarray, (means, lows, highs))
  ax.errorbar(widths, means, yerr=[means - lows, highs - means], marker="o", capsize=3, color="black")
  bar = claims_lib.LEARNED_BAR
  ax.axhline(bar, color="0.4", lw=0.8, ls="--", label=f"bound {bar:g} (mimics least squares below)")
  ax.set(xscale="log", yscale="log", xlabel="hidden size (1 head)", ylabel="error/d at 2d ÷ zero's")
  ax.set_xticks(widths, [str(w) for w in widths])
  ax.set_xticks([], minor=True)  # Only the trained sizes are labelled on the log axis.
  ax.legend(fontsize="small")
  caption = (
    f"Error/d with 2d examples over the zero predictor's against the hidden size of 12-layer 1-head GPT-2s (Fu et "
    f"al. Fig. 6 at d = 20: sizes 8 and 16 fail to mimic OLS, 32 and 64 mimic it); the sizes scaled by d/20, "
    f"{_scale_text(shown[0][1])}; mean over seeds with its 90% interval."
  )
  return fig, caption


def lsa_matrices(by_experiment: dict):
  """Ahn et al. Figs. 2, 4, 5: the LSA's Σ^½ A_i Σ^½ and B_i as multiples of I, beside the paper's."""
  shown = _with(by_experiment, ("lsa", "gdpp"), "a")
  if not shown:
    return None
  paper = {"lsa": {"a": lsa_analysis.PAPER_A}, "gdpp": {"a": claims_lib.PAPER_GDPP_A, "b": claims_lib.PAPER_GDPP_B}}
  fig = Figure(figsize=(5 * len(shown), 4), layout="constrained")
  axes = np.atleast_1d(fig.subplots(1, len(shown)))
  for ax, (name, found) in zip(axes, shown):
    for key, colour, label in (("a", "tab:blue", "a_i: Σ^½ A_i Σ^½ ≈ a_i I"), ("b", "tab:green", "b_i: B_i ≈ b_i I")):
      if found[0]["eval"].get(key) is None:
        continue
      values = np.asarray([r["eval"][key] for r in found], np.float64)
      layers = np.arange(1, values.shape[1] + 1)
      ax.plot(np.repeat(layers[None], len(values), 0).ravel(), values.ravel(), "o", color=colour, alpha=0.5, ms=4)
      ax.plot(layers, values.mean(0), "-", color=colour, label=f"{label} (seeds: dots)")
      if key in paper[name]:
        ax.plot(np.arange(1, len(paper[name][key]) + 1), paper[name][key], "x", color=colour, ms=9, mew=2)
    ax.axhline(0, color="black", lw=0.6)
    ax.set(xlabel="layer", title=f"{name} ({_seeds(found)}; ×: the paper)")
    ax.legend(fontsize="small")
  caption = (
    "The trained linear self-attention's layers as multiples of I: a_i of Σ^½ A_i Σ^½ and, in the full form, b_i "
    f"of B_i; crosses: Ahn et al.'s values (§4.3 Fig. 2: {', '.join(map(str, lsa_analysis.PAPER_A))}; §5.1 Figs. "
    f"4-5: b = {', '.join(map(str, claims_lib.PAPER_GDPP_B))}, a = {', '.join(map(str, claims_lib.PAPER_GDPP_A))}); "
    + "; ".join(f"{name}: {_scale_text(found)}" for name, found in shown)
    + "."
  )
  return fig, caption


def lsa_depth(by_experiment: dict):
  """Ahn et al. App. D: the trained LSA's test loss against its depth L, beside L steps of GD and of
  Σ⁻¹-preconditioned GD (steps tuned) and least squares; and against the context length for the 3-layer one."""
  names = {layers: "lsa" if layers == 3 else f"lsa_L{layers}" for layers in experiments.APPENDIX_D_DEPTHS}
  shown = {layers: found for layers, name in names.items() for _, found in _with(by_experiment, [name])}
  if len(shown) < 2:
    return None
  fig = Figure(figsize=(11, 4), layout="constrained")
  by_depth, by_length = fig.subplots(1, 2)
  depths = sorted(shown)
  for key, style, label in LSA_CURVES:
    losses = [np.mean([r["eval"]["final_test_loss"][key] for r in shown[L]]) for L in depths]
    by_depth.plot(depths, np.maximum(losses, RECALL_FLOOR), style, label=label)
  by_depth.set(yscale="log", xlabel="layers L", ylabel="test loss at the query", title="against depth")
  by_depth.set_xticks(depths)
  by_depth.legend(fontsize="small")
  # Against the context length: the deepest model whose summaries keep the curve.
  kept = [L for L in depths if all(r["eval"].get("test_loss") for r in shown[L])]
  if kept:
    found = shown[kept[-1]]
    for key, style, label in LSA_CURVES:
      curve = np.mean([r["eval"]["test_loss"][key]["mean"] for r in found], axis=0)
      by_length.plot(np.arange(len(curve)), np.maximum(curve, RECALL_FLOOR), style, label=label)
    by_length.set(
      yscale="log", xlabel="examples n", title=f"{kept[-1]} layers, against the context length ({_seeds(found)})"
    )
  else:
    by_length.set_visible(False)
  caption = (
    "Ahn et al. App. D: the trained linear self-attention's test loss at the query against its depth L (mean over "
    "seeds), beside L steps of GD and of Σ⁻¹-preconditioned GD, each with its step tuned on separate prompts, and "
    f"least squares (drawn at {RECALL_FLOOR:g}: exact once n ≥ d); right: against the number of examples for the "
    f"deepest model whose summaries keep that curve; {_scale_text(next(iter(shown.values())))}."
  )
  return fig, caption


# The LSA analysis' predictors drawn by lsa_depth: key of its test losses, line style, label.
LSA_CURVES = (
  ("lsa", "o-k", "trained LSA"),
  ("preconditioned_gd", "s--", "Σ⁻¹-preconditioned GD, tuned step"),
  ("gd", "^--", "GD, tuned step"),
  ("least_squares", ":", "least squares"),
)


MAKERS = {
  "error_vs_layer.png": error_vs_layer,
  "sim_e_heatmaps.png": sim_e_heatmaps,
  "ols_match.png": ols_match,
  "forgetting.png": forgetting_curves,
  "hidden_size.png": hidden_size,
  "lsa_matrices.png": lsa_matrices,
  "lsa_depth.png": lsa_depth,
}
