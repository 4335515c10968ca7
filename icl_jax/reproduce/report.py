"""ROOT/REPORT.md, ROOT/report.json and ROOT/figures/: every claim graded, the runs behind them, the main figure."""

import dataclasses
import json

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from icl_jax.reproduce import claims as claims_lib
from icl_jax.reproduce import experiments
from icl_jax.reproduce import report_figures
from icl_jax.runtime import run_logs
from icl_jax.runtime import storage

matplotlib.use("Agg")

FIGURE = "best_match.png"
SEPARABILITY_FIGURE = "separability.png"


def _number(x: float) -> str:
  return f"{round(x, 9):.3g}"  # Rounding first: a slope of exactly flat steps prints 0, not 5e-17.


def _quantity_text(q: claims_lib.Quantity) -> str:
  interval = "" if q.low is None else f" [{_number(q.low)}, {_number(q.high)}]"
  return f"{_number(q.mean)}{interval}"


def _measured_text(grade: claims_lib.Grade) -> str:
  if grade.quantity is None:
    return grade.reason
  text = _quantity_text(grade.quantity)
  if grade.details:
    text += " (" + "; ".join(f"seed {i}: {d}" for i, d in enumerate(grade.details)) + ")"
  return text


def _verdict_text(grade: claims_lib.Grade) -> str:
  text = f"**{grade.verdict}**"
  if grade.verdict == claims_lib.INCONCLUSIVE:
    needed = grade.seeds_needed
    text += (
      f" ({needed} seeds would settle it at this spread)"
      if needed is not None
      else " (more seeds: the spread over seeds is not known from one)"
      if grade.quantity.seeds < 2
      else " (the mean sits on an edge: no number of seeds settles it)"
    )
  elif grade.verdict == claims_lib.NOT_GRADED:
    text += f" ({grade.reason})"
  return text


def grade_json(grade: claims_lib.Grade) -> dict:
  c = grade.claim
  return {
    "id": c.id,
    "experiment": c.experiment,
    "statement": c.statement,
    "paper": c.paper,
    "source": c.source,
    "measurement": c.measurement,
    "tolerance": str(c.verdict),
    "tolerance_source": c.tolerance_source,
    "verdict": grade.verdict,
    "reason": grade.reason,
    "quantity": None if grade.quantity is None else dataclasses.asdict(grade.quantity),
    "details": list(grade.details),
    "seeds_needed": grade.seeds_needed,
  }


def _seeds_text(grade: claims_lib.Grade) -> str:
  if grade.claim.experiment == "constructions":
    return "no training"
  return f"seeds: {grade.quantity.seeds}" if grade.quantity else "–"


def separability_rows(by_experiment: dict[str, list[dict]]) -> list[dict]:
  """Per probed GPT-2 experiment and layer, over its seeds: the mean separation of Newton and GD at the model's
  best matches (1 − SimE between the two algorithms), the model's mean noise there, in how many seeds the layer
  is separable, and the model's mean paired preference SimE(Newton) − SimE(GD)."""
  rows = []
  for name, found in by_experiment.items():
    found = [r for r in found if "config" in r and r["config"].model.family == "gpt2" and "separability" in r["eval"]]
    if not found:
      continue
    separability = [r["eval"]["separability"] for r in found]
    for layer in range(len(separability[0]["noise"])):
      mean = lambda f: float(np.mean([f(s) for s in separability]))
      rows.append(
        {
          "experiment": name,
          "layer": layer + 1,
          "seeds": len(found),
          "separation": mean(lambda s: s["separation"]["mean"][layer]),
          "separation_low": mean(lambda s: s["separation"]["low"][layer]),
          "noise": mean(lambda s: s["noise"][layer]),
          "separable_seeds": sum(s["separable"][layer] for s in separability),
          "newton_minus_gd": mean(lambda s: s["newton_minus_gd"]["mean"][layer]),
          "newton_steps": [s["newton_steps"][layer] for s in separability],
          "gd_steps": [s["gd_steps"][layer] for s in separability],
        }
      )
  return rows


def _separability_markdown(rows: list[dict]) -> list[str]:
  if not rows:
    return []
  figure_line = [
    f"![Separation of Newton and GD per layer, and the model's preference](figures/{SEPARABILITY_FIGURE})",
    "",
  ]
  lines = [
    "## Where Newton and GD can be told apart",
    "",
    "Per layer, from the algorithms alone: the separation 1 − SimE(Newton at the layer's best step, GD at its "
    "best setting) on the evaluation prompts — the largest SimE difference a model equal to one of them could "
    "show — against the model's own sampling noise there (the half-width of its SimE intervals). Newton versus "
    "GD is graded only over the layers whose separation's interval clears the noise "
    "(`icl_jax/analysis/separability.py`; this project's diagnostic, in no paper). Means over seeds.",
    "",
    "| experiment | layer | best Newton / GD steps (per seed) | separation [low] | model's noise | separable in "
    "| model's SimE(Newton) − SimE(GD) |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    steps = ", ".join(f"{n}/{g}" for n, g in zip(r["newton_steps"], r["gd_steps"]))
    lines.append(
      f"| {r['experiment']} | {r['layer']} | {steps} | {r['separation']:.4f} [{r['separation_low']:.4f}] | "
      f"{r['noise']:.4f} | {r['separable_seeds']} of {r['seeds']} seeds | {r['newton_minus_gd']:+.4f} |"
    )
  return lines + [""] + figure_line


def markdown(
  scale: str,
  seeds: tuple[int, ...],
  grades: list[claims_lib.Grade],
  runs: list[dict],
  command: str,
  provenance: dict,
  separability: list[dict],
  figures: list[tuple[str, str]] = (),
) -> str:
  counts = {v: sum(g.verdict == v for g in grades) for v in claims_lib.VERDICTS}
  tally = ", ".join(f"{counts[v]} {v}" for v in claims_lib.VERDICTS if counts[v])
  lines = [
    f"# Reproduction report: scale `{scale}`, seeds {', '.join(map(str, seeds))}",
    "",
    "Regenerate with:",
    "",
    "```bash",
    command,
    "```",
    "",
    f"{provenance['date']}, {provenance['machine']}, jax {provenance['jax']}.",
    "",
  ]
  if scale == "smoke":
    lines += [
      "**The smoke scale checks the pipeline, not the science**: its models train for seconds and are not "
      "expected to show anything, so every claim is measured and none is graded.",
      "",
    ]
  partial = [r for r in runs if r["trained_steps"] is not None and r["trained_steps"] < r["num_steps"]]
  if partial:
    lines += [
      "**Partially trained runs**: "
      + ", ".join(f"{r['name']} {100 * r['trained_steps'] / r['num_steps']:.1f}%" for r in partial)
      + " of their steps (the runs table below). They are evaluated at their latest checkpoint; their "
      "experiments' claims are measured and not graded.",
      "",
    ]
  lines += [
    f"**{tally}** of {len(grades)} claims.",
    "",
    "How to read it: a measured value is the mean over seeds with its 90% Student-t interval across seeds in "
    "brackets; with one seed, the run's own 90% bootstrap interval over prompts where the evaluation has one. "
    "Comparisons are paired: the difference is measured per prompt on the same prompts, then over seeds. PASS: "
    "the interval lies inside the band or beyond the bound; FAIL: outside it; INCONCLUSIVE: it straddles an "
    "edge (with the seeds that would settle it at the observed spread). Tolerances are fixed in "
    "`icl_jax/reproduce/claims.py` with their sources; DERIVED values are computed from the papers' figures, "
    "not printed in them.",
    "",
    "| experiment | claim | the papers (source) | measured (seeds) | tolerance | verdict |",
    "|---|---|---|---|---|---|",
  ]
  for g in grades:
    c = g.claim
    lines.append(
      f"| {c.experiment} | {c.statement} (`{c.id}`) | {c.paper} ({c.source}) | "
      f"{_measured_text(g)} ({_seeds_text(g)}) | {c.verdict} | {_verdict_text(g)} |"
    )
  lines += ["", "What each claim measures, and why its tolerance:", ""]
  lines += [
    f"- `{g.claim.experiment}/{g.claim.id}`: {g.claim.measurement}; tolerance: {g.claim.tolerance_source}."
    for g in grades
  ]
  lines += ["", f"![Best-matching Newton and GD steps per layer](figures/{FIGURE})", ""]
  lines += _separability_markdown(separability)
  if figures:
    lines += ["## The papers' other figures", ""]
    for name, caption in figures:
      lines += [f"![{caption.split('(')[0].strip()}](figures/{name})", "", caption, ""]
  lines += [
    "## Runs",
    "",
    "| run | model | task | steps | error/d ÷ zero at the last length |",
    "|---|---|---|---|---|",
  ]
  for r in runs:
    ratio = "not trained" if r["last_ratio_to_zero"] is None else f"{r['last_ratio_to_zero']:.4g}"
    steps = f"{r['num_steps']}"
    if r["trained_steps"] is not None and r["trained_steps"] < r["num_steps"]:
      steps = f"{r['trained_steps']} of {r['num_steps']} ({100 * r['trained_steps'] / r['num_steps']:.1f}%)"
    lines.append(f"| {r['name']} | {r['model']} | {r['task']} | {steps} | {ratio} |")
  return "\n".join(lines) + "\n"


def run_rows(runs, results: dict) -> list[dict]:
  rows = []
  for run in runs:
    c, found = run.config, results.get(run.workdir.name)
    model = f"{c.model.family}, {c.model.num_layers} layers"
    if c.model.family != "lsa":
      model += f", width {c.model.width}"
    curve = found["curve"] if found else None
    spectrum = (
      f"Cov(x) eigenvalues {tuple(c.task.eigenvalues)}" if c.task.spectrum == "explicit" else f"κ = {c.task.kappa:g}"
    )
    rows.append(
      {
        "name": run.workdir.name,
        "model": model,
        "task": f"d = {c.task.n_dims}, {c.task.n_points} points, {spectrum}, σ = {c.task.noise_std:g}",
        "num_steps": c.train.num_steps,
        "trained_steps": round(trained_fraction(found) * c.train.num_steps) if found else None,
        "last_ratio_to_zero": curve["last_ratio_to_zero"] if curve else None,
      }
    )
  return rows


def _series(results: list[dict], key: str, transform) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Mean and 90% t-interval over seeds of a best-match curve; with one seed, its best matches and the range of
  steps whose SimE is within the bootstrap interval of the best (the evaluation's `within_interval`; its
  `low`/`high` bound the SimE, not the steps)."""
  if len(results) == 1:
    best = results[0]["eval"]["best_match"][key]
    within = results[0]["eval"]["best_match_interval"][key]["within_interval"]
    return tuple(transform(np.asarray(v, float)) for v in (best, [min(w) for w in within], [max(w) for w in within]))
  per_layer = [
    claims_lib.aggregate([(v, None, None) for v in layer])
    for layer in zip(*(transform(np.asarray(r["eval"]["best_match"][key], float)) for r in results))
  ]
  return tuple(np.asarray([getattr(q, f) for q in per_layer]) for f in ("mean", "low", "high"))


def figure(by_experiment: dict[str, list[dict]]) -> Figure | None:
  """Best-matching Newton steps (left) and log2 GD steps (right) against the layer, per GPT-2 experiment."""
  shown = [(name, found) for name, found in by_experiment.items() if found and "best_match" in found[0]["eval"]]
  shown = [(name, found) for name, found in shown if found[0]["config"].model.family == "gpt2"]
  if not shown:
    return None
  fig = Figure(figsize=(10, 4), layout="constrained")
  axes = fig.subplots(1, 2)
  colours = matplotlib.colormaps["tab10"].colors
  for (name, found), colour in zip(shown, colours):
    layers = np.asarray(found[0]["eval"]["layers"])
    for ax, key, transform in ((axes[0], "newton", np.asarray), (axes[1], "gd_log", np.log2)):
      mean, low, high = _series(found, key, transform)
      ax.errorbar(
        layers,
        mean,
        yerr=[mean - low, high - mean],
        marker="o",
        capsize=3,
        color=colour,
        label=f"{name} ({len(found)} seed{'s' * (len(found) > 1)})",
      )
  if len(shown[0][1][0]["eval"]["layers"]) == len(claims_lib.PAPER_NEWTON_STEPS):
    axes[0].plot(range(1, 13), claims_lib.PAPER_NEWTON_STEPS, "s--", color="0.5", label="Fu et al. Fig. 7(b), d = 20")
  axes[0].set(xlabel="layer", ylabel="best-matching Newton steps (SimE)", title="Iterative Newton")
  axes[1].set(xlabel="layer", ylabel="log₂ best-matching GD steps (SimE)", title="Gradient descent (log grid)")
  for ax in axes:
    ax.legend(fontsize="small")
  return fig


def separability_figure(rows: list[dict]) -> Figure | None:
  """Per GPT-2 experiment (a panel each), per layer and averaged over its seeds: the separation of Newton and GD
  at the model's best matches, the model's noise and its paired preference SimE(Newton) - SimE(GD); shaded: the
  layers separable in every seed."""
  experiments_shown = list(dict.fromkeys(r["experiment"] for r in rows))
  if not experiments_shown:
    return None
  fig = Figure(figsize=(5 * len(experiments_shown), 4), layout="constrained")
  axes = np.atleast_1d(fig.subplots(1, len(experiments_shown), sharey=True))
  for ax, name in zip(axes, experiments_shown):
    found = [r for r in rows if r["experiment"] == name]
    layers = np.asarray([r["layer"] for r in found])
    for r in found:
      if r["separable_seeds"] == r["seeds"]:
        ax.axvspan(r["layer"] - 0.5, r["layer"] + 0.5, color="0.92", lw=0)
    ax.plot(layers, [r["separation"] for r in found], "o-", color="tab:purple", label="Newton vs GD: 1 − SimE")
    ax.plot(layers, [r["noise"] for r in found], "--", color="0.45", label="model's noise")
    ax.plot(layers, [r["newton_minus_gd"] for r in found], "s-", color="tab:green", label="model: SimE(N) − SimE(GD)")
    ax.axhline(0, color="black", lw=0.6)
    ax.set(
      xlabel="layer (shaded: separable in every seed)",
      title=f"{name} ({found[0]['seeds']} seed{'s' * (found[0]['seeds'] > 1)})",
    )
    ax.set_xticks(layers)
  axes[0].set_ylabel("similarity difference")
  axes[0].legend(fontsize="small")
  return fig


def trained_fraction(result: dict) -> float:
  """The fraction of its configured steps a summarised run was evaluated at (1 for summaries written before
  they recorded it, all of finished runs)."""
  steps = result["config"].train.num_steps
  return result.get("trained_steps", steps) / steps


def ungraded_reason(scale: str, results: list[dict]) -> str:
  """Why an experiment's claims are measured but not graded, or "" when they are graded: the smoke scale, or a
  run evaluated part-way through its training (`reproduce --partial`)."""
  if scale == "smoke":
    return "a pipeline check: seconds of training show nothing"
  fractions = [trained_fraction(r) for r in results if "config" in r]
  if fractions and min(fractions) < 1:
    low, high = min(fractions), max(fractions)
    span = f"{100 * low:.1f}%" if low == high else f"{100 * low:.1f}-{100 * high:.1f}%"
    return f"partially trained ({span} of its steps): the claims are about trained models"
  return ""


def write(
  root: storage.Path, scale: str, seeds: tuple[int, ...], runs, results: dict, constructions: dict, command: str
) -> list[claims_lib.Grade]:
  """Grades every claim of claims.CLAIMS on `results` (run name -> results, finished runs only) and writes the
  report; returns the grades."""
  by_experiment = {
    e.name: [results[n] for n in (experiments.run_name(e, s) for s in seeds) if n in results]
    for e in experiments.EXPERIMENTS
  }
  by_experiment["constructions"] = [{"eval": constructions}]
  planned = {r.experiment.name for r in runs} | {"constructions"}
  grades = [
    claims_lib.grade(c, by_experiment[c.experiment], ungraded_reason(scale, by_experiment[c.experiment]))
    if c.experiment in planned
    else claims_lib.Grade(c, claims_lib.NOT_RUN, None, f"not an experiment of the {scale} scale")
    for c in claims_lib.CLAIMS
  ]
  separability = separability_rows(by_experiment)
  full = run_logs.provenance()
  provenance = {
    "date": full["date"][:10],
    "machine": f"{full['device_count']} x {full['device_kind']}",
    "jax": full["versions"]["jax"],
    "git_commit": full["git_commit"],
  }
  rows = run_rows(runs, results)
  drawn = {name: made for name, maker in report_figures.MAKERS.items() if (made := maker(by_experiment)) is not None}
  captions = [(name, caption) for name, (_, caption) in drawn.items()]
  run_logs.write_atomically(
    root / "REPORT.md", markdown(scale, seeds, grades, rows, command, provenance, separability, captions)
  )
  run_logs.write_atomically(
    root / "report.json",
    json.dumps(
      {
        "scale": scale,
        "seeds": list(seeds),
        "command": command,
        "provenance": provenance,
        "claims": [grade_json(g) for g in grades],
        "runs": rows,
        "separability": separability,
        "figures": dict(captions),
        "constructions": constructions,
      },
      indent=1,
    )
    + "\n",
  )
  figures = {FIGURE: figure(by_experiment), SEPARABILITY_FIGURE: separability_figure(separability)}
  figures.update({name: fig for name, (fig, _) in drawn.items()})
  for name, fig in figures.items():
    if fig is not None:
      (root / "figures").mkdir(exist_ok=True)
      storage.save_figure(fig, root / "figures" / name, dpi=120)
  return grades
