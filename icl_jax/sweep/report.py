"""The sweep's report: per (depth, kappa), what the runs learned and which algorithm their layers follow.

Reads each run's error_curve.json and eval/results.json and writes ROOT/sweep/results.json, report.md and
figures. With several seeds every number is the mean over seeds with a 90% Student-t interval across them.
"""

import json

import matplotlib
import numpy as np
from absl import logging
from matplotlib import ticker
from matplotlib.figure import Figure
from scipy import stats

from icl_jax.runtime import run_logs
from icl_jax.runtime import storage

CONFIDENCE = 0.9


def _interval(values) -> dict:
  """Mean over seeds and its 90% t-interval (the interval is the mean itself with one seed). None (an
  undefined quantity, such as a fit over one layer) stays None."""
  if any(v is None for v in values):
    return {"mean": None, "low": None, "high": None, "seeds": len(values)}
  values = np.asarray(values, np.float64)
  mean = values.mean(axis=0)
  if len(values) < 2:
    return {"mean": mean.tolist(), "low": mean.tolist(), "high": mean.tolist(), "seeds": len(values)}
  half = stats.t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1) * values.std(axis=0, ddof=1) / np.sqrt(len(values))
  return {"mean": mean.tolist(), "low": (mean - half).tolist(), "high": (mean + half).tolist(), "seeds": len(values)}


def _run_summary(workdir: storage.Path) -> dict | None:
  curve_path, results_path = workdir / "error_curve.json", workdir / "eval" / "results.json"
  if not (curve_path.exists() and results_path.exists()):
    return None
  curve, results = json.loads(curve_path.read_text()), json.loads(results_path.read_text())
  return {
    "error_per_dim": curve["error_per_dim"],
    "final_error_per_dim": curve["last_error_per_dim"],
    "newton_steps_per_layer": results["best_match"]["newton"],
    "newton_slope": results["fits"]["newton"]["slope"],
    "newton_r2": results["fits"]["newton"]["r2"],
    # The GD steps the last layer's predictions match (log grid): how much GD the model's output is worth.
    "gd_steps_needed": results["best_match"]["gd_log"][-1],
    "gd_doublings_per_layer": results["fits"]["gd_log"]["doublings_per_layer"],
    "distance_to_least_squares_per_dim": float(np.mean(results["distance_to_least_squares_per_dim"][1:])),
  }


def collect(runs, root: storage.Path, names: list[str]) -> list[dict]:
  """One entry per (depth, kappa) with every quantity aggregated over the finished seeds."""
  cells: dict[tuple, list[dict]] = {}
  for run, name in zip(runs, names):
    summary = _run_summary(root / name)
    if summary is None:
      logging.warning("%s is not finished; left out of the report.", root / name)
      continue
    cells.setdefault((run.model.num_layers, run.task.kappa), []).append(summary)
  entries = []
  for (num_layers, kappa), summaries in sorted(cells.items()):
    entry = {"num_layers": num_layers, "kappa": kappa}
    for key in summaries[0]:
      entry[key] = _interval([s[key] for s in summaries])
    entries.append(entry)
  return entries


def _markdown(entries: list[dict]) -> str:
  lines = [
    "| depth | κ | seeds | final error/d | Newton steps per layer (best match) | Newton steps/layer (R²) | "
    "GD steps needed | distance to OLS (error/d) |",
    "|---|---|---|---|---|---|---|---|",
  ]
  fmt = lambda v: (
    "n/a"
    if v["mean"] is None
    else f"{v['mean']:.3g} [{v['low']:.3g}, {v['high']:.3g}]"
    if v["seeds"] > 1
    else f"{v['mean']:.3g}"
  )
  for e in entries:
    steps = ", ".join(f"{s:.3g}" for s in e["newton_steps_per_layer"]["mean"])
    lines.append(
      f"| {e['num_layers']} | {e['kappa']:g} | {e['final_error_per_dim']['seeds']} | "
      f"{fmt(e['final_error_per_dim'])} | {steps} | {fmt(e['newton_slope'])} "
      f"({fmt(e['newton_r2'])}) | {fmt(e['gd_steps_needed'])} | "
      f"{fmt(e['distance_to_least_squares_per_dim'])} |"
    )
  interval = (
    ""
    if entries and entries[0]["final_error_per_dim"]["seeds"] < 2
    else (f" Brackets: {CONFIDENCE:.0%} t-interval across seeds.")
  )
  return (
    "Final error/d at the last context length; Newton steps: each layer's best-matching number of Iterative "
    "Newton steps by SimE; GD steps needed: the last layer's best match on the GD log grid; distance to "
    "OLS: mean (model - least squares)^2 / d over context lengths >= 1." + interval + "\n\n" + "\n".join(lines) + "\n"
  )


def _figures(entries: list[dict], out: storage.Path) -> None:
  kappas = sorted({e["kappa"] for e in entries})
  depths = sorted({e["num_layers"] for e in entries})
  colors = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, max(len(kappas), len(depths))))
  figures = {}

  fig = Figure(figsize=(6.5, 4.5), layout="constrained")
  ax = fig.add_subplot()
  for kappa, color in zip(kappas, colors):
    cell = [e for e in entries if e["kappa"] == kappa]
    mean = np.asarray([e["final_error_per_dim"]["mean"] for e in cell])
    low = np.asarray([e["final_error_per_dim"]["low"] for e in cell])
    high = np.asarray([e["final_error_per_dim"]["high"] for e in cell])
    ax.errorbar(
      [e["num_layers"] for e in cell],
      mean,
      yerr=[mean - low, high - mean],
      marker="o",
      color=color,
      label=f"κ = {kappa:g}",
      capsize=3,
    )
  ax.set(
    xscale="log",
    yscale="log",
    xlabel="depth (layers)",
    ylabel="error/d at the last context length",
    title="Final error against depth",
  )
  ax.set_xticks(depths, [str(d) for d in depths])
  ax.xaxis.set_minor_formatter(ticker.NullFormatter())
  ax.legend()
  figures["final_error_vs_depth"] = fig

  fig = Figure(figsize=(4.2 * len(kappas), 4.2), layout="constrained")
  axes = fig.subplots(1, len(kappas), squeeze=False)[0]
  for ax, kappa in zip(axes, kappas):
    for depth, color in zip(depths, colors):
      cell = [e for e in entries if e["kappa"] == kappa and e["num_layers"] == depth]
      if cell:
        steps = cell[0]["newton_steps_per_layer"]["mean"]
        ax.plot(
          range(1, len(steps) + 1),
          steps,
          marker="o",
          color=color,
          label=f"{depth} layer{'s' * (depth > 1)}",
          zorder=3 - depth / max(depths),
        )  # Shallow models on top: their few points hide otherwise.
    ax.set(xlabel="layer", ylabel="best-matching Newton steps", title=f"κ = {kappa:g}")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.legend(fontsize="small")
  figures["newton_steps_vs_layer"] = fig

  fig = Figure(figsize=(1.2 * len(kappas) + 2.5, 0.5 * len(depths) + 2), layout="constrained")
  ax = fig.add_subplot()
  slope = np.full((len(depths), len(kappas)), np.nan)
  for e in entries:
    if e["newton_slope"]["mean"] is not None:
      slope[depths.index(e["num_layers"]), kappas.index(e["kappa"])] = e["newton_slope"]["mean"]
  image = ax.imshow(slope, cmap="viridis", aspect="auto")
  for (i, j), value in np.ndenumerate(slope):
    ax.text(j, i, "" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", color="white")
  ax.set_xticks(range(len(kappas)), [f"{k:g}" for k in kappas])
  ax.set_yticks(range(len(depths)), [str(d) for d in depths])
  ax.set(xlabel="κ", ylabel="depth (layers)", title="Newton steps per layer (fit slope)")
  fig.colorbar(image, ax=ax)
  figures["newton_slope_depth_kappa"] = fig

  for stem, fig in figures.items():
    for suffix in (".png", ".pdf"):
      storage.save_figure(fig, out / f"{stem}{suffix}", dpi=150)


def write(runs, root: storage.Path, names: list[str]) -> list[dict]:
  """Writes ROOT/sweep/{results.json, report.md, *.png, *.pdf}; returns the entries."""
  entries = collect(runs, root, names)
  out = root / "sweep"
  out.mkdir(parents=True, exist_ok=True)
  run_logs.write_atomically(out / "results.json", json.dumps(entries, indent=1) + "\n")
  run_logs.write_atomically(out / "report.md", _markdown(entries))
  if entries:
    _figures(entries, out)
  logging.info("Sweep report of %d (depth, kappa) cells in %s:\n%s", len(entries), out, _markdown(entries))
  return entries
