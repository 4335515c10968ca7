"""Fu et al. (2024)'s figures from `evaluate`'s results: error/d against layer and against context length,
SimE and SimW heatmaps with each layer's best match, and the best-matching steps per layer with their fits.

`makers(results)` takes the dict that `evaluate` writes as results.json (plain lists) and returns every
figure's drawing function by file stem; `evaluate.write_figures` saves them as PNG and PDF. The figures are
built with matplotlib's object API (`Figure`), which needs no backend and registers nothing with pyplot: a
figure is freed once its last reference goes, so nothing stays open after saving, even in a long training
process.
"""

import functools
from typing import Callable

import matplotlib
import numpy as np
from matplotlib import lines
from matplotlib import patches
from matplotlib import ticker
from matplotlib.figure import Figure

STYLE = {
  "font.size": 11,
  "axes.titlesize": 12,
  "axes.labelsize": 11,
  "xtick.labelsize": 10,
  "ytick.labelsize": 10,
  "legend.fontsize": 9,
  "figure.titlesize": 12,
}
PAPER_LENGTHS = (5, 10, 15, 20, 22, 25, 30, 35)  # Context lengths of Fu et al.'s Fig. 2 (d = 20, 41 points).
NUM_LENGTHS = 6  # Context lengths drawn instead when fewer than MIN_PAPER_LENGTHS of Fu et al.'s exist.
MIN_PAPER_LENGTHS = 4
MAX_TICK_LABELS = 20  # Layer ticks beyond this crowd an 8-inch axis (e.g. a 48-layer model).
# Error/d below this is float32 round-off of an exact fit (least squares, or converged Newton, once n >= d): its
# size carries no information and would stretch the log axis over ten more decades.
ERROR_FLOOR = 1e-8
# Fu et al.'s best matches for their 12-layer model on d = 20, kappa = 1 (arXiv:2310.17086): Newton from the
# legend of Fig. 7(b), GD's log grid read off Fig. 10.
PAPER_BEST = {
  "newton": (1, 1, 3, 5, 8, 10, 14, 17, 20, 21, 21, 21),
  "gd_log": (1, 1, 4, 8, 32, 64, 256, 512, 1024, 4096, 4096, 4096),
}
METRIC_NAMES = {"sim_e": "SimE (similarity of errors)", "sim_w": "SimW (similarity of induced weights)"}
METRIC_SHORT = {"sim_e": "SimE", "sim_w": "SimW"}
GRID_NAMES = {
  "newton": "Iterative Newton",
  "gd": "GD",
  "gd_log": "GD, log grid",
  "cg": "conjugate gradient",
  "bfgs": "BFGS",
  "lbfgs": "L-BFGS",
}
GRID_AXES = {
  "newton": "Newton steps",
  "gd": "GD steps",
  "gd_log": "GD steps",
  "cg": "CG steps",
  "bfgs": "BFGS steps",
  "lbfgs": "L-BFGS steps",
}
GREY = "0.45"


def makers(results: dict) -> dict[str, Callable[[], Figure]]:
  """Every figure of `results` by file stem, drawn when called (under STYLE, which must be in force both when
  the text is laid out and when it is drawn)."""
  found = {
    "error_vs_layer": functools.partial(error_vs_layer, results),
    "error_vs_context": functools.partial(error_vs_context, results),
    "best_match": functools.partial(best_match, results),
  }
  if "separability" in results:
    found["separability"] = functools.partial(separability, results)
  for metric in METRIC_NAMES:
    for grid in results["grids"]:
      found[f"{metric}_{grid}_heatmap"] = functools.partial(similarity_heatmap, results, metric, grid)
  return found


def error_vs_layer(results: dict) -> Figure:
  """Error/d of each layer's read-out against the layer, one line per context length, beside the same for
  Iterative Newton against its steps and GD against its (log-grid) steps (Fu et al.'s Fig. 2), on one y axis."""
  ols_N = np.asarray(results["error_per_dim"]["least_squares"]["mean"])[0]
  lengths = _shown_lengths(results["context_lengths"])
  column = {n: i for i, n in enumerate(results["context_lengths"])}
  shown = [column[n] for n in lengths]
  d = results["settings"]["task"]["n_dims"]
  figure = Figure(figsize=(16, 5.5), layout="constrained")
  axes = figure.subplots(1, 3, sharey=True, width_ratios=(1.2, 1, 1))
  colours = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.9, len(lengths)))
  panels = (
    ("layers", np.asarray(results["layers"]), "layer", "the model's read-out per layer"),
    ("newton", np.asarray(results["grids"]["newton"]), "Newton steps", "Iterative Newton"),
    ("gd_log", np.asarray(results["grids"]["gd_log"]), "GD steps" + _learning_rate(results, "gd"), "gradient descent"),
  )
  for ax, (name, x, xlabel, title) in zip(axes, panels):
    stats = _stats(results, name)
    for n, colour in zip(lengths, colours):
      _band(
        ax,
        x,
        stats,
        (slice(None), column[n]),
        color=colour,
        marker="o",
        ms=3,
        label=f"n = {n}" + (" = d" if n == d else ""),
      )
      ax.axhline(ols_N[column[n]], color=colour, ls="--", lw=1)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
  _integer_ticks(axes[0].xaxis, panels[0][1])
  axes[2].set_xscale("log", base=2)
  handles, _ = axes[-1].get_legend_handles_labels()
  handles.append(
    lines.Line2D([], [], color=GREY, ls="--", lw=1, label="least squares, same n\n(≈ 0 for n ≥ d: off the axis)")
  )
  axes[-1].legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), title="examples in context")
  every = [_stats(results, name) for name, *_ in panels]
  _log_errors(
    axes[0],
    np.concatenate([s["low"][:, shown].ravel() for s in every]),
    np.concatenate([s["high"][:, shown].ravel() for s in every]),
  )
  axes[0].set_ylabel("squared error / d")
  figure.suptitle(
    f"Error against depth and against steps (Fu et al. Fig. 2); bands: {_interval(results)}; " + _settings_line(results)
  )
  return figure


def error_vs_context(results: dict) -> Figure:
  """Error/d against the number of in-context examples: the model, its last layer and the algorithms."""
  lengths_N = np.asarray(results["context_lengths"])
  grids = results["grids"]
  d = results["settings"]["task"]["n_dims"]
  figure = Figure(figsize=(9, 5.5), layout="constrained")
  ax = figure.add_subplot()
  curves = [
    ("model", 0, "model output", {"color": "black", "lw": 2.2}),
    ("layers", -1, f"layer {results['layers'][-1]} read-out", {"color": "tab:blue", "ls": "--"}),
    ("least_squares", 0, "least squares", {"color": "tab:red", "lw": 1.5}),
    ("online_gd", 0, "online GD", {"color": "tab:purple"}),
  ]
  for name, cmap, preferred in (("newton", "Greens", (1, 5, 23)), ("gd", "Oranges", ())):
    shown = _pick(grids[name], preferred)
    colours = matplotlib.colormaps[cmap](np.linspace(0.45, 0.95, len(shown)))
    for step, colour in zip(shown, colours):
      curves.append(
        (
          name,
          grids[name].index(step),
          f"{GRID_NAMES[name]}, {step} step{'s' * (step != 1)}",
          {"color": colour, "ls": "-."},
        )
      )
  curves.append(("zero", 0, "zero predictor", {"color": GREY, "ls": ":"}))
  for name, row, label, style in curves:
    _band(ax, lengths_N, _stats(results, name), (row, slice(None)), label=label, **style)
  # The axis spans the model's and its last layer's curves (and the zero predictor), not the algorithms that
  # reach round-off once n >= d, which would squeeze the model's curve into a corner.
  learned = [_stats(results, name) for name in ("model", "layers", "zero")]
  _log_errors(
    ax, np.concatenate([s["low"].ravel() for s in learned]), np.concatenate([s["high"].ravel() for s in learned])
  )
  if d <= lengths_N[-1]:
    ax.axvline(d, color=GREY, lw=0.8, ls=":")
    # On its own axis above the plot: inside it, the label would sit on some curve.
    ax.secondary_xaxis("top").set_xticks([d], ["n = d"])
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax.set_xlabel("in-context examples n")
  ax.set_ylabel("squared error / d")
  ax.set_title(f"Error against context length; bands: {_interval(results)}")
  ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
  figure.suptitle(_settings_line(results))
  return figure


def similarity_heatmap(results: dict, metric: str, grid: str) -> Figure:
  """`metric` ("sim_e" or "sim_w") of every layer with every step count of `grid`, each layer's best match boxed
  and every step within its bootstrap interval dotted (Fu et al.'s Figs. 8-10)."""
  sim_LxK = np.asarray(results[metric][grid])
  steps_K = list(results["grids"][grid])
  suffix = "" if metric == "sim_e" else "_sim_w"
  best_steps_L = results["best_match" + suffix][grid]
  best_sim_L = results["best_similarity" + suffix][grid]
  within_L = results["best_match" + suffix + "_interval"][grid]["within_interval"]
  num_layers, k = sim_LxK.shape
  # Cells as wide as the widest step label where that keeps the image near 9 inches; else label every
  # stride-th cell (Fu et al.'s GD grid: 27 four-digit values).
  label_in = 0.09 * max(len(str(s)) for s in steps_K) + 0.12
  cell_in = max(0.3, min(9 / k, label_in))
  stride = int(np.ceil(label_in / cell_in))
  figure = Figure(figsize=(max(7.5, 4 + k * cell_in), 1.8 + 0.36 * max(num_layers, 4)), layout="constrained")
  ax = figure.add_subplot()
  # Layer 1 on top, rows in table order: the best matches then run from top left to bottom right.
  # One colour scale for every grid of this metric, so that Newton's and GD's heatmaps compare at a glance.
  every = np.concatenate([np.ravel(results[metric][g]) for g in results["grids"]])
  image = ax.imshow(
    sim_LxK,
    aspect="auto",
    cmap="viridis",
    interpolation="nearest",
    vmin=float(np.min(every)),
    vmax=float(np.max(every)),
  )
  for row, steps in enumerate(within_L):
    ax.plot([steps_K.index(s) for s in steps], [row] * len(steps), "o", ms=3.5, color="white", mec="black", mew=0.5)
  for row, step in enumerate(best_steps_L):
    # Unclipped: a box on the edge column would lose half its outline under the axes frame.
    ax.add_patch(
      patches.Rectangle((steps_K.index(step) - 0.5, row - 0.5), 1, 1, fill=False, ec="red", lw=2, clip_on=False)
    )
  ax.set_xticks(range(k), [str(s) if i % stride == 0 else "" for i, s in enumerate(steps_K)])
  ax.set_yticks(range(num_layers), results["layers"])
  best_axis = ax.secondary_yaxis("right")
  best_axis.set_yticks(range(num_layers), [f"{s} ({v:.3f})" for s, v in zip(best_steps_L, best_sim_L)])
  best_axis.set_ylabel("best match: steps (similarity)")
  ax.set_xlabel(GRID_AXES.get(grid, grid) + _learning_rate(results, grid))
  ax.set_ylabel("layer")
  ax.set_title(
    f"{METRIC_NAMES[metric]} with {GRID_NAMES.get(grid, grid)}\nred box: each layer's best match; dots: "
    f"steps within its {_interval(results)}"
  )
  figure.colorbar(image, ax=ax, label=METRIC_SHORT[metric])
  figure.suptitle(_settings_line(results))
  return figure


def separability(results: dict) -> Figure:
  """Per layer: how far apart Newton and GD are at the layer's best matches (1 - SimE between the two
  algorithms, with its interval), the model's own sampling noise, and the model's paired preference SimE(Newton)
  - SimE(GD); shaded layers are separable, the only ones where Newton is graded against GD."""
  found = results["separability"]
  layers_L = np.asarray(results["layers"])
  figure = Figure(figsize=(8, 5), layout="constrained")
  ax = figure.subplots()
  for layer, separable in zip(layers_L, found["separable"]):
    if separable:
      ax.axvspan(layer - 0.5, layer + 0.5, color="0.92", lw=0)
  for key, label, colour in (
    ("separation", "Newton vs GD: 1 − SimE of the two algorithms", "tab:purple"),
    ("newton_minus_gd", "model: SimE(Newton) − SimE(GD), paired", "tab:green"),
  ):
    stats = {k: np.asarray(found[key][k]) for k in ("mean", "low", "high")}
    ax.errorbar(
      layers_L,
      stats["mean"],
      yerr=[stats["mean"] - stats["low"], stats["high"] - stats["mean"]],
      marker="o",
      capsize=3,
      color=colour,
      label=label,
    )
  ax.plot(layers_L, found["noise"], "--", color=GREY, label="model's noise (half-width of its SimE intervals)")
  ax.axhline(0, color="black", lw=0.6)
  ax.set_xticks(layers_L)
  ax.set(xlabel="layer (shaded: separable)", ylabel="similarity difference")
  ax.set_title(
    f"Where Newton and GD can be told apart (this project's diagnostic)\nseparable layers: "
    f"{', '.join(map(str, found['separable_layers'])) or 'none'}; bars: {_interval(results)}"
  )
  ax.legend()
  figure.suptitle(_settings_line(results))
  return figure


def best_match(results: dict) -> Figure:
  """Best-matching steps per layer with the fits over `fits.layers`: Newton on a linear axis (Fu et al.'s Fig.
  7b) and GD's log grid on a log2 axis (Fig. 10), where a straight line means a fixed number of doublings."""
  layers_L = np.asarray(results["layers"])
  fits = results["fits"]
  first, last = fits["layers"]
  fit_layers = np.linspace(first, last, 50)
  on_paper = _is_paper_setting(results)
  figure = Figure(figsize=(13, 5.2), layout="constrained")
  newton_ax, gd_ax = figure.subplots(1, 2)

  fit = fits["newton"]
  newton_ax.plot(layers_L, results["best_match"]["newton"], "o-", color="tab:green", label="argmax of SimE")
  _within_interval(newton_ax, results, "newton", layers_L, "tab:green")
  _fit_line(
    newton_ax,
    fit_layers,
    lambda: fit["slope"] * fit_layers + fit["intercept"],
    lambda: f"{fit['steps_per_layer']:.2f} steps/layer, R² = {fit['r2']:.3f}",
    first,
    last,
  )
  if on_paper:
    newton_ax.plot(layers_L, PAPER_BEST["newton"], "x:", color=GREY, label="Fu et al. (Fig. 7b legend)")
  _grid_end(newton_ax, results, "newton")
  # From 0, and at least 2 high: a flat best match of 1 step would otherwise get ticks like 0.995 and 1.005.
  newton_ax.set_ylim(0, max(newton_ax.get_ylim()[1], 2))
  newton_ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  newton_ax.set_ylabel("best-matching Newton steps")
  newton_ax.set_title("Iterative Newton: " + _fit_summary(fit, "steps/layer"))

  fit = fits["gd_log"]
  gd_ax.plot(layers_L, results["best_match"]["gd_log"], "o-", color="tab:orange", label="argmax of SimE, log grid")
  _within_interval(gd_ax, results, "gd_log", layers_L, "tab:orange")
  gd_ax.plot(
    layers_L, results["best_match"]["gd"], "s", mfc="none", color="tab:brown", label="argmax of SimE, linear grid"
  )
  _fit_line(
    gd_ax,
    fit_layers,
    lambda: np.exp2(fit["slope"] * fit_layers + fit["intercept"]),
    lambda: f"{fit['doublings_per_layer']:.2f} doublings/layer, R² = {fit['r2']:.3f}",
    first,
    last,
  )
  if on_paper:
    gd_ax.plot(layers_L, PAPER_BEST["gd_log"], "x:", color=GREY, label="Fu et al. (read off Fig. 10)")
  _grid_end(gd_ax, results, "gd_log")
  gd_ax.set_yscale("log", base=2)
  gd_ax.yaxis.set_major_locator(ticker.FixedLocator(results["grids"]["gd_log"]))
  gd_ax.yaxis.set_minor_locator(ticker.NullLocator())
  gd_ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
  gd_ax.set_ylabel("best-matching GD steps (log₂ axis)")
  gd_ax.set_title("Gradient descent" + _learning_rate(results, "gd") + ": " + _fit_summary(fit, "doublings/layer"))

  for ax in (newton_ax, gd_ax):
    ax.axvspan(first - 0.5, last + 0.5, color="tab:blue", alpha=0.07, lw=0)
    _integer_ticks(ax.xaxis, layers_L)
    ax.set_xlabel("layer (shaded: fit layers)")
    ax.grid(alpha=0.3)
    # Below the axes: the curves may cross any corner.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=2)
  figure.suptitle(_settings_line(results))
  return figure


def _stats(results: dict, curve: str) -> dict[str, np.ndarray]:
  """Mean, low and high error/d of `curve`, each [K, N]."""
  return {s: np.asarray(v, dtype=np.float64) for s, v in results["error_per_dim"][curve].items()}


def _band(ax, x, stats: dict, index: tuple, label: str, **style) -> None:
  """The mean at `index` of `stats` as a line over its interval as a band of the same colour."""
  (line,) = ax.plot(x, stats["mean"][index], label=label, **style)
  ax.fill_between(x, stats["low"][index], stats["high"][index], color=line.get_color(), alpha=0.18, lw=0)


def _log_errors(ax, low, high) -> None:
  """Log y axis down to the lowest interval bound, but no lower than ERROR_FLOOR under the highest value."""
  top = float(np.max(high))
  positive = np.asarray(low)[np.asarray(low) > 0]
  lowest = float(positive.min()) if positive.size else top
  ax.set_yscale("log")
  ax.set_ylim(max(lowest, min(ERROR_FLOOR, top * 1e-3)) / 2, top * 2)
  ax.grid(which="major", alpha=0.3)


def _shown_lengths(lengths) -> list[int]:
  """Fu et al.'s context lengths, or NUM_LENGTHS spread evenly over the available ones when the task is too
  short for them; length 0 (no examples: every algorithm predicts 0) is left out."""
  paper = [n for n in PAPER_LENGTHS if n in lengths]
  if len(paper) >= MIN_PAPER_LENGTHS:
    return paper
  candidates = [n for n in lengths if n > 0] or list(lengths)
  picks = np.linspace(0, len(candidates) - 1, min(NUM_LENGTHS, len(candidates)))
  return sorted({candidates[int(round(i))] for i in picks})


def _pick(grid, preferred) -> list:
  """The preferred step counts that `grid` has, else its first, middle and last."""
  return [s for s in preferred if s in grid] or [grid[i] for i in sorted({0, len(grid) // 2, len(grid) - 1})]


def _fit_line(ax, x, y, text, first: int, last: int) -> None:
  """Draws the fit; `y` and `text` are callables, as a fit over one layer has no slope to evaluate."""
  if last > first:
    ax.plot(x, y(), "--", color="black", lw=1.2, label=f"fit, layers {first}–{last}: {text()}")
  else:
    ax.plot([], [], " ", label=f"no fit: one fit layer ({first})")


def _within_interval(ax, results: dict, grid: str, layers_L, colour) -> None:
  """A bar over the steps of each layer whose SimE is within the bootstrap interval of its best match."""
  within = results["best_match_interval"][grid]["within_interval"]
  ax.vlines(
    layers_L,
    [min(w) for w in within],
    [max(w) for w in within],
    color=colour,
    lw=6,
    alpha=0.3,
    label=f"steps within the {_interval(results)}",
  )


def _fit_summary(fit: dict, unit: str) -> str:
  """The fitted slope with its interval and R^2, as measured (or that there is none)."""
  if fit["slope"] is None:
    return "no fit (one fit layer)"
  interval = fit.get("slope_interval") or [None, None]
  bounds = f" [{interval[0]:.2f}, {interval[1]:.2f}]" if None not in interval else ""
  return f"{fit['slope']:.2f}{bounds} {unit}, R² = {fit['r2']:.2f}"


def _grid_end(ax, results: dict, grid: str) -> None:
  """Marks the grid's largest step count when some layer's best match is there, as the true match may lie
  beyond it."""
  end = max(results["grids"][grid])
  if max(results["best_match"][grid]) == end:
    ax.axhline(end, color=GREY, lw=0.8, ls=(0, (1, 3)), label=f"end of the grid ({end}): may lie beyond")


def _integer_ticks(axis, values) -> None:
  """Ticks at the given integers, thinned to at most MAX_TICK_LABELS."""
  values = list(values)
  axis.set_ticks(values[:: -(-len(values) // MAX_TICK_LABELS)])


def _interval(results: dict) -> str:
  return f"{results['settings']['eval']['confidence']:.0%} bootstrap interval"


def _learning_rate(results: dict, grid: str) -> str:
  rate = results["settings"]["eval"].get("gd_learning_rate")
  return f" (η = {rate:g})" if grid.startswith("gd") and rate is not None else ""


def _is_paper_setting(results: dict) -> bool:
  """Whether Fu et al.'s reported best matches apply: their 12-layer model, d = 20, kappa = 1, their grids."""
  task, grids = results["settings"]["task"], results["grids"]
  return (
    len(results["layers"]) == 12
    and task["n_dims"] == 20
    and task["kappa"] == 1
    and list(grids["newton"]) == list(range(1, 24))
    and list(grids["gd_log"]) == [2**k for k in range(13)]
  )


def _settings_line(results: dict) -> str:
  settings = results["settings"]
  task = settings["task"]
  parts = [f"d = {task['n_dims']}", f"κ = {task['kappa']:g}"]
  if task["kappa"] != 1 and "spectrum" in task:
    parts[-1] += f" ({task['spectrum']})"
  num_layers = len(results["layers"])
  parts += [f"{num_layers} layer{'s' * (num_layers != 1)}", f"{len(results['context_lengths'])} points"]
  if settings.get("checkpoint_step") is not None:
    parts.append(f"checkpoint step {settings['checkpoint_step']}")
  return ", ".join(parts)
