"""Trains, evaluates and grades one scale of experiments under a root directory, resumably.

ROOT/{experiment}_seed{seed}/ is each run's workdir, with everything `python -m icl_jax.main` writes there. The
seeds of an experiment share every shape and train together (`train.train_runs`), except at the scales of
`experiments.ONE_RUN_AT_A_TIME`; a finished run is skipped, an interrupted one resumes from its checkpoints, an
evaluated one is not evaluated again. The constructions need no training: they are checked on fresh prompts at
every call (seconds). With `partial`, nothing trains: each run is evaluated at its latest checkpoint and
summarised, with the report, under ROOT/partial/ (never ROOT/summaries/, whose summaries mark runs as
finished).
"""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from icl_jax import checkpointing
from icl_jax import train
from icl_jax.analysis import algorithms
from icl_jax.analysis import constructions
from icl_jax.analysis import evaluate
from icl_jax.analysis import probing
from icl_jax.bench import benchmarks
from icl_jax.reproduce import experiments
from icl_jax.reproduce import report
from icl_jax.reproduce import report_figures
from icl_jax.runtime import config_files
from icl_jax.runtime import distributed
from icl_jax.runtime import errors
from icl_jax.runtime import run_logs
from icl_jax.runtime import storage
from icl_jax.runtime import workdir_lock
from icl_jax.sweep import grid

SUMMARIES_DIR = "summaries"
PARTIAL_DIR = "partial"


@dataclasses.dataclass(frozen=True)
class Run:
  experiment: experiments.Experiment
  seed: int
  config: ml_collections.ConfigDict
  workdir: storage.Path
  report_root: storage.Path  # The root whose summaries/ holds its summary: ROOT, or ROOT/partial.

  @property
  def results_path(self) -> storage.Path:
    """Where the family's evaluation writes its results.json."""
    sub = "lsa_analysis" if self.config.model.family == "lsa" else "eval"
    return self.workdir / sub / "results.json"

  @property
  def summary_path(self) -> storage.Path:
    """ROOT/summaries/RUN.json: the few kB of results the claims read, with the run's config. A run with a
    summary is done: copied into another root (or committed), it needs neither checkpoints nor training."""
    return self.report_root / SUMMARIES_DIR / f"{self.workdir.name}.json"

  @property
  def predictions_path(self) -> storage.Path:
    """ROOT/summaries/RUN.npz: the model's outputs behind a probed run's summary (`probing.ModelOutputs`), from
    which `reanalyse` recomputes every measurement without a checkpoint."""
    return self.summary_path.with_suffix(".npz")

  def is_trained(self) -> bool:
    """Summarised, or trained to its last step here."""
    return self.summary_path.exists() or grid.is_trained(self.config, self.workdir)


def plan(scale: str, root: storage.Path, seeds: tuple[int, ...], config_dir: pathlib.Path) -> list[Run]:
  """Every run of `scale`, each config validated: one ConfigError lists every problem, before any compute."""
  if not (pathlib.Path(config_dir) / "linreg.py").is_file():
    raise errors.MissingFileError(
      f"--config_dir={config_dir}: no linreg.py there (the repository's configs/ directory)"
    )
  runs, found = [], []
  for experiment in experiments.scale_experiments(scale):
    for seed in seeds:
      config = experiments.experiment_config(experiment, scale, seed, config_dir)
      try:
        evaluate.validate(config, jax.device_count())
        if config.model.family in ("gpt2", "lstm"):
          probing.fit_layers(config)  # Whether the fit's layers exist, which the evaluation would find late.
      except (errors.ConfigError, distributed.DistributedFlagError) as e:
        found.append(f"{experiments.run_name(experiment, seed)}: {e}")
      runs.append(Run(experiment, seed, config, root / experiments.run_name(experiment, seed), root))
  if found:
    raise errors.ConfigError(f"scale {scale!r}:\n  " + "\n  ".join(found))
  return runs


def training_groups(runs: list[Run], scale: str) -> list[list[Run]]:
  """The runs that train as one program (`train.train_runs`), in order: the seeds of an experiment, or each run
  alone at a scale of `experiments.ONE_RUN_AT_A_TIME`."""
  groups = [[runs[i] for i in group] for group in train.split_into_groups([r.config for r in runs])]
  return [[r] for group in groups for r in group] if scale in experiments.ONE_RUN_AT_A_TIME else groups


def train_all(runs: list[Run], scale: str) -> bool:
  """Trains every unfinished run without a summary, in `training_groups`. False if a SIGTERM stopped it (the
  checkpoints saved; rerun to resume), True when every run is trained."""
  for group in training_groups(runs, scale):
    pending = [r for r in group if not r.is_trained()]
    logging.info("%s: %d runs, %d to train.", ", ".join(r.workdir.name for r in group), len(group), len(pending))
    if pending:
      results = train.train_runs([r.config for r in pending], [r.workdir for r in pending])
      if any(r["preempted"] for r in results):
        return False
  return True


# The fields of a run's results that the claims and the report read: its summary keeps these, and (for the
# probed families) the model's outputs they were computed from, so that any claim can be graded again later.
SUMMARY_FIELDS = {
  "probed": (
    "layers",
    "best_match",
    "best_match_interval",
    "best_similarity_sim_w",
    "fits",
    "fits_adaptive",
    "last_layer_best",
    "last_layer_paired",
    "separability",
    "convergence",
    "error_vs_layer",
    "ols_distance",
    "linearity",
    "forgetting",
    "grids",
    "table1",
    "prompts_sha256",
  ),
  "lsa": ("a", "b", "dist", "final_test_loss", "test_loss"),
}


def _summary_eval(results: dict, probed: bool) -> dict:
  found = {k: results[k] for k in SUMMARY_FIELDS["probed" if probed else "lsa"]}
  if probed:
    found["model_error_per_dim"] = results["error_per_dim"]["model"]
    # The SimE means of the grids whose heatmaps the report draws (Fu et al. Figs. 8, 10).
    found["sim_e"] = {grid: results["sim_e"][grid] for grid, _ in report_figures.HEATMAP_GRIDS}
  return found


def _evaluated_step(results: dict) -> int | None:
  """The checkpoint step an evaluation's results.json was computed at."""
  return results["step"] if "step" in results else results["settings"]["checkpoint_step"]


def evaluate_all(runs: list[Run]) -> None:
  """Evaluates every run with a checkpoint and no summary at its latest checkpoint (reusing results.json when
  computed there), and writes the missing summaries. A run without a checkpoint is left unsummarised (NOT RUN)."""
  for run in runs:
    if run.summary_path.exists():
      continue
    step = checkpointing.latest_step(run.config, run.workdir)
    if step is None:
      logging.warning("%s: no checkpoint to evaluate; its claims are NOT RUN.", run.workdir.name)
      continue
    results = json.loads(run.results_path.read_text()) if run.results_path.exists() else None
    if results is None or _evaluated_step(results) != step:
      evaluate.evaluate(run.config, run.workdir)
      results = json.loads(run.results_path.read_text())
    curve_path = run.workdir / "error_curve.json"
    curve = json.loads(curve_path.read_text()) if curve_path.exists() else None
    # Written at the end of training (step num_steps when it records none); computed here for a partial run.
    if curve is None or curve.get("step", run.config.train.num_steps) != step:
      curve = train.checkpoint_error_curve(run.config, run.workdir)
    probed = run.config.model.family != "lsa"
    summary = {
      "config": config_files.config_dict(run.config),
      "trained_steps": step,
      "eval": _summary_eval(results, probed),
      "curve": curve,
    }
    run.summary_path.parent.mkdir(parents=True, exist_ok=True)
    if probed:
      predictions = run.results_path.parent / evaluate.PREDICTIONS
      run_logs.write_atomically(run.predictions_path, predictions.read_bytes())
    run_logs.write_atomically(run.summary_path, json.dumps(summary, indent=1) + "\n")


def reanalyse(runs: list[Run]) -> int:
  """Recomputes the measurements of every probed run's summary from its saved model outputs (RUN.npz), as the
  evaluation computes them now: for an analysis that changed after the runs. Needs no checkpoint. Returns how
  many summaries it rewrote (those without RUN.npz are left as they are)."""
  rewritten = 0
  for run in runs:
    if run.config.model.family == "lsa" or not (run.summary_path.exists() and run.predictions_path.exists()):
      continue
    load_results(run)  # The summary is of this run's configuration.
    outputs = probing.outputs_from_npz(run.predictions_path.read_bytes())
    try:
      results = probing.Evaluator(run.config).analyse(outputs)
    except ValueError as e:
      raise errors.ConfigError(f"{run.predictions_path}: {e}") from None
    summary = json.loads(run.summary_path.read_text())
    summary["eval"] = _summary_eval(results, probed=True)
    run_logs.write_atomically(run.summary_path, json.dumps(summary, indent=1) + "\n")
    rewritten += 1
  return rewritten


def load_results(run: Run) -> dict | None:
  """The run's summary for the claims (None unless written), checked against the run's config."""
  if not run.summary_path.exists():
    return None
  summary = json.loads(run.summary_path.read_text())
  differences = config_files.config_differences(
    summary["config"], config_files.config_dict(run.config), ignore=(), saved_as="summarised"
  )
  if differences:
    raise errors.ConfigError(
      f"{run.summary_path} summarises a run of another configuration; grading it would report the wrong "
      "experiment. Differing fields:\n  " + "\n  ".join(differences) + "\nDelete it to train the run anew."
    )
  return {**summary, "config": ml_collections.ConfigDict(summary["config"])}


# Prompts and sizes of the constructions' check (fresh N(0, I) data; the identities are exact, so any size shows
# them): Newton for k = 0..NEWTON_STEPS, LSA for L = 1..LSA_LAYERS with random preconditioners.
CONSTRUCTION_PROMPTS, CONSTRUCTION_NEWTON_STEPS, CONSTRUCTION_LSA_LAYERS = 16, 8, 4


def check_constructions(n_dims: int, n_points: int, seed: int = 0) -> dict:
  """Largest relative errors of the explicit constructions against the algorithms they implement."""
  rng = np.random.default_rng(seed)
  xs, w, x_query = (
    rng.normal(size=s)
    for s in ((CONSTRUCTION_PROMPTS, n_points, n_dims), (CONSTRUCTION_PROMPTS, n_dims), (CONSTRUCTION_PROMPTS, n_dims))
  )
  ys = np.einsum("bnd,bd->bn", xs, w)
  xs, ys, x_query = (jnp.asarray(a, jnp.float32) for a in (xs, ys, x_query))
  reference = np.asarray(algorithms.iterative_newton(xs, ys, CONSTRUCTION_NEWTON_STEPS)[:, :, -1], np.float64)
  newton = []
  for k in range(CONSTRUCTION_NEWTON_STEPS + 1):
    w_BxD, _ = constructions.newton_transformer(xs, ys, x_query, k)
    ref = reference[:, k]
    newton.append(float(np.max(np.linalg.norm(np.asarray(w_BxD) - ref, axis=-1) / np.linalg.norm(ref, axis=-1))))
  lsa = []
  for num_layers in range(1, CONSTRUCTION_LSA_LAYERS + 1):
    factors = rng.normal(size=(num_layers, n_dims, n_dims))
    preconditioners = [jnp.asarray(0.3 * np.eye(n_dims) + 0.03 * f, jnp.float32) for f in factors]
    z = constructions.lsa_forward(
      constructions.lsa_prompt(xs, ys, x_query), *constructions.preconditioned_gd_lsa_weights(preconditioners)
    )
    w_BxD = jnp.zeros((CONSTRUCTION_PROMPTS, n_dims))
    for a_DxD in preconditioners:  # w <- w - A grad R(w), R(w) = (1/2n) sum_i (w . x_i - y_i)^2.
      residual_BxN = jnp.einsum("bnd,bd->bn", xs, w_BxD) - ys
      w_BxD = w_BxD - jnp.einsum("bnd,bn->bd", xs, residual_BxN) / n_points @ a_DxD.T
    expected_B = np.einsum("bd,bd->b", np.asarray(x_query, np.float64), np.asarray(w_BxD, np.float64))
    scale_B = np.linalg.norm(np.asarray(x_query), axis=-1) * np.linalg.norm(np.asarray(w_BxD), axis=-1)
    lsa.append(float(np.max(np.abs(np.asarray(constructions.lsa_prediction(z), np.float64) - expected_B) / scale_B)))
  return {
    "n_dims": n_dims,
    "n_points": n_points,
    "prompts": CONSTRUCTION_PROMPTS,
    "newton": {"max_relative_error": max(newton), "per_steps": newton},
    "lsa": {"max_relative_error": max(lsa), "per_layers": lsa},
  }


def selected(runs: list[Run], only: tuple[str, ...] | None) -> list[Run]:
  """The runs of the experiments named in `only` (all of them for None)."""
  return [r for r in runs if only is None or r.experiment.name in only]


def reproduce(
  runs: list[Run],
  root: storage.Path,
  scale: str,
  seeds: tuple[int, ...],
  command: str,
  only: tuple[str, ...] | None = None,
  reanalysed: bool = False,
  partial: bool = False,
) -> list | None:
  """Trains and evaluates what is missing of `runs` (from `plan`), grades every claim and writes the report;
  returns the grades, or None if a SIGTERM stopped the training (rerun to resume). With `only` (experiment
  names), trains and evaluates those alone and grades the others from the summaries already under ROOT (NOT
  RUN without), so that a scale too long for one machine's session is run in parts into one root. With
  `reanalysed`, every summary of `here` with saved model outputs is recomputed first (`reanalyse`). With
  `partial`, trains nothing: evaluates each run at its latest checkpoint into ROOT/partial/, whose report
  (scale SCALE-partial) gives each run's fraction of its steps and grades nothing. Holds ROOT's lock (each
  run's workdir has its own), so that two reproductions never share a root."""
  report_root = root / PARTIAL_DIR if partial else root
  runs = [dataclasses.replace(r, report_root=report_root) for r in runs]
  here = selected(runs, only)
  workdir_lock.prepare(root)
  with workdir_lock.hold(root, f"reproduction ({scale})"):
    if not partial and not train_all(here, scale):
      return None
    report_root.mkdir(parents=True, exist_ok=True)
    evaluate_all(here)
    if reanalysed:
      logging.info("Reanalysed %d summaries from their saved model outputs.", reanalyse(here))
    results = {r.workdir.name: found for r in runs if (found := load_results(r)) is not None}
    task = runs[0].config.task
    constructions_check = check_constructions(task.n_dims, task.n_points)
    label = f"{scale}-partial" if partial else scale
    return report.write(report_root, label, seeds, runs, results, constructions_check, command)


# How the dry-run times a step: in a dispatch of ten steps, and, where a dispatch of training's own length
# (config.train.steps_per_dispatch) is projected from it to take at most FULL_DISPATCH_S, in one such dispatch,
# whose time is then the projection's. Where steps are cheap a step's cost depends on the dispatch's length
# (docs/reproduction.md, "--dry-run"); where they are dear, a ten-step dispatch keeps the dry-run short.
TIMED_STEPS = 10
FULL_DISPATCH_S = 10.0


def _shape_key(config: ml_collections.ConfigDict) -> str:
  """What a training step's cost depends on: the model, the prompts' size and the batch."""
  return json.dumps(
    [config_files.config_dict(config.model), config.task.n_dims, config.task.n_points, config.train.batch_size],
    sort_keys=True,
  )


def _timed_step(config: ml_collections.ConfigDict) -> dict:
  """Seconds per training step of `config` at the curriculum's final size, as `TIMED_STEPS` explains."""
  seconds_per_step, _ = benchmarks.train_step_timer(config)
  full = config.train.steps_per_dispatch
  steps = min(full, TIMED_STEPS)
  seconds = seconds_per_step(steps, 1)
  if steps < full and seconds * full <= FULL_DISPATCH_S:
    steps, seconds = full, seconds_per_step(full, 1)
  return {"ms_per_step": 1e3 * seconds, "timed_steps_per_dispatch": steps}


def projected_cost(runs: list[Run], scale: str):
  """Yields, per group of `training_groups` as it is timed: its training's shape, steps and the hours they take
  on this machine's devices, from training steps timed at the final curriculum size (`_timed_step`). Each
  distinct shape is compiled and timed once (groups of one shape share the timing); a vmapped group of k runs
  is counted as k runs' steps."""
  timings = {}
  for members in training_groups(runs, scale):
    config = members[0].config
    key = _shape_key(config)
    if key not in timings:
      timings[key] = _timed_step(config)
    timed = timings[key]
    trained = [r for r in members if r.is_trained()]
    remaining = [r for r in members if r not in trained]
    steps = config.train.num_steps
    yield {
      "experiment": members[0].experiment.name,
      "runs": [r.workdir.name for r in members],
      "family": config.model.family,
      "num_layers": config.model.num_layers,
      "width": config.model.get("width"),
      "n_dims": config.task.n_dims,
      "n_points": config.task.n_points,
      "batch_size": config.train.batch_size,
      "num_steps": steps,
      "ms_per_step": timed["ms_per_step"],
      "timed_steps_per_dispatch": timed["timed_steps_per_dispatch"],
      "device": jax.devices()[0].device_kind,
      "devices": len(jax.devices()),
      "already_trained": [r.workdir.name for r in trained],
      "hours": len(remaining) * steps * timed["ms_per_step"] / 3.6e6,
    }
