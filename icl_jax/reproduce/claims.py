"""The papers' claims, each with its source, the measurement that tests it and its tolerance.

A claim reads one number (or two, for a comparison) from each seed's results, then grades the numbers over
seeds. With two or more seeds a quantity is the mean over seeds with its 90% Student-t interval across them;
with one seed it is that run's value with the run's own 90% bootstrap interval (over prompts) where the
evaluation gives one, and no interval otherwise. Verdicts:

- a band or a bound ("in [2, 4]", ">= 1") grades the mean;
- a comparison ("SimE(Newton) > SimE(GD)") passes only if the two intervals do not overlap in its favour.

Tolerances are fixed here, with their sources, before any run of the scale they grade; a claim whose
measurement the scale cannot make (e.g. layers after the fit range in a 4-layer model) is NOT RUN with the
reason, never passed.
"""

import dataclasses
from typing import Callable

import numpy as np
from scipy import stats

CONFIDENCE = 0.9
PASS, FAIL, NOT_RUN = "PASS", "FAIL", "NOT RUN"


class NotMeasurable(Exception):
  """The claim's measurement does not exist at this scale (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Quantity:
  """A measured number over seeds: the mean and its 90% interval (None when there is no interval)."""

  mean: float
  low: float | None
  high: float | None
  seeds: int
  values: tuple[float, ...]


def aggregate(per_seed: list[tuple[float, float | None, float | None]]) -> Quantity:
  """(value, low, high) of each seed (low/high: the run's own interval, or None) -> a Quantity."""
  values = np.asarray([v for v, _, _ in per_seed], np.float64)
  if len(values) == 1:
    _, low, high = per_seed[0]
    return Quantity(float(values[0]), low, high, 1, (float(values[0]),))
  mean = float(values.mean())
  half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
  return Quantity(mean, mean - half, mean + half, len(values), tuple(map(float, values)))


# ---------------------------------------------------------------------------------------------------------------
# Verdicts.


@dataclasses.dataclass(frozen=True)
class Band:
  low: float
  high: float

  def __call__(self, q: dict[str, Quantity]) -> bool:
    return self.low <= q["value"].mean <= self.high

  def __str__(self):
    return f"mean in [{self.low:g}, {self.high:g}]"


@dataclasses.dataclass(frozen=True)
class AtLeast:
  bound: float

  def __call__(self, q: dict[str, Quantity]) -> bool:
    return q["value"].mean >= self.bound

  def __str__(self):
    return f"mean >= {self.bound:g}"


@dataclasses.dataclass(frozen=True)
class AtMost:
  bound: float

  def __call__(self, q: dict[str, Quantity]) -> bool:
    return q["value"].mean <= self.bound

  def __str__(self):
    return f"mean <= {self.bound:g}"


@dataclasses.dataclass(frozen=True)
class Greater:
  """q["a"] > q["b"] with non-overlapping 90% intervals (fails without intervals: nothing to separate them)."""

  a: str
  b: str

  def __call__(self, q: dict[str, Quantity]) -> bool:
    a, b = q["a"], q["b"]
    return a.low is not None and b.high is not None and a.low > b.high

  def __str__(self):
    return f"{self.a} > {self.b}, 90% intervals disjoint"


# ---------------------------------------------------------------------------------------------------------------
# Measurements: a run's results (a dict with "eval": eval/results.json or lsa_analysis/results.json, "curve":
# error_curve.json, "config": the run's config) -> {name: (value, low, high)}.


def _fit(grid: str, key: str = "slope"):
  def measure(run):
    fit = run["eval"]["fits"][grid]
    if fit[key] is None:
      raise NotMeasurable(f"the fit over layers {run['eval']['fits']['layers']} is undefined (one layer)")
    interval = fit["slope_interval"] if key == "slope" else (None, None)
    return {"value": (fit[key], *interval)}

  return measure


def _end_slope(run):
  """Least-squares slope of the best-matching Newton steps over the layers from the fit's last to the last."""
  best = np.asarray(run["eval"]["best_match"]["newton"], np.float64)
  first = run["eval"]["fits"]["layers"][1]
  layers = np.arange(first, len(best) + 1)
  if len(layers) < 2:
    raise NotMeasurable(f"no layers after the fit range (layers {run['eval']['fits']['layers']} of {len(best)})")
  return {"value": (float(np.polyfit(layers, best[layers - 1], 1)[0]), None, None)}


def _last_layer(metric: str, a: str, b_grids: tuple[str, ...]):
  """The last layer's best similarity to algorithm `a` against the best of `b_grids` (e.g. both GD grids)."""

  def measure(run):
    best = run["eval"]["last_layer_best"][metric]
    b = max(b_grids, key=lambda g: best[g]["value"])
    return {
      "a": (best[a]["value"], best[a]["low"], best[a]["high"]),
      "b": (best[b]["value"], best[b]["low"], best[b]["high"]),
    }

  return measure


def _error_ratio_at_2d(run):
  """Error/d over predicting zero with 2d context points (Garg et al.'s "twice the dimension")."""
  curve, d = run["curve"], run["config"].task.n_dims
  if len(curve["error_per_dim"]) <= 2 * d:
    raise NotMeasurable(f"the prompts have {len(curve['error_per_dim'])} points, fewer than 2d + 1 = {2 * d + 1}")
  return {"value": (curve["error_per_dim"][2 * d] / curve["zero_per_dim"][2 * d], None, None)}


# Fu et al. Fig. 7(b) legend: best-matching Newton steps of layers 1-12 (d = 20, 41 points).
PAPER_NEWTON_STEPS = (1, 1, 3, 5, 8, 10, 14, 17, 20, 21, 21, 21)


def _newton_sequence_distance(run):
  best = run["eval"]["best_match"]["newton"]
  d, n = run["config"].task.n_dims, run["config"].task.n_points
  if (len(best), d, n) != (len(PAPER_NEWTON_STEPS), 20, 41):
    raise NotMeasurable(
      f"the sequence is the paper's 12 layers at d = 20, 41 points; this run has {len(best)} "
      f"layers at d = {d}, {n} points (its shape is graded by the slope and flattening claims)"
    )
  return {"value": (float(np.max(np.abs(np.asarray(best) - PAPER_NEWTON_STEPS))), None, None)}


def _lsa_max_dist(run):
  return {"value": (max(run["eval"]["dist"]), None, None)}


def _lsa_gap_to_planted(run):
  """|loss(trained LSA) - loss(sparse LSA with A_i = a_i Sigma^-1)| / the latter, at the query."""
  loss = run["eval"]["final_test_loss"]
  if "preconditioned_gd_learned_steps" not in loss:
    raise NotMeasurable("the full-form LSA has no planted preconditioned-GD counterpart (config.model.lsa_sparse)")
  planted = loss["preconditioned_gd_learned_steps"]
  return {"value": (abs(loss["lsa"] - planted) / planted, None, None)}


@dataclasses.dataclass(frozen=True)
class Claim:
  id: str
  experiment: str  # experiments.Experiment.name
  statement: str  # What the papers say, in words.
  paper: str  # The papers' value.
  source: str  # Where it is stated (figure, table, section; DERIVED = computed here from the figure).
  measurement: str  # What is measured, in words.
  measure: Callable[[dict], dict]
  verdict: Callable[[dict[str, Quantity]], bool]
  tolerance_source: str  # Why this tolerance.


_GD_GRIDS = ("gd", "gd_log")

_ISOTROPIC = (
  Claim(
    "newton_slope",
    "isotropic",
    "Over the middle layers, each layer adds roughly 3 Iterative Newton steps",
    "2.89 steps/layer, R² 0.993",
    "Fu et al. §4.2; DERIVED: least-squares fit over layers 3-9 of Fig. 7(b)",
    "slope of the best-matching Newton steps (SimE) over the fit layers; interval: bootstrap over prompts",
    _fit("newton"),
    Band(2.0, 4.0),
    "'roughly 3' read as 3 ± 1",
  ),
  Claim(
    "newton_r2",
    "isotropic",
    "The best-matching Newton steps are linear in the layer (a linear trend)",
    "R² 0.993",
    "Fu et al. §4.2; DERIVED from Fig. 7(b)",
    "R² of that fit",
    _fit("newton", "r2"),
    AtLeast(0.9),
    "a clear linear trend; the paper's legend gives 0.99",
  ),
  Claim(
    "newton_flattens",
    "isotropic",
    "After the middle layers the Newton match stops growing",
    "21, 21, 21 at layers 10-12 (slope 0.3 over layers 9-12)",
    "Fu et al. Fig. 7(b)",
    "slope of the best-matching Newton steps from the fit's last layer to the last layer",
    _end_slope,
    AtMost(1.0),
    "at most half the middle layers' lower bound of 2 steps/layer",
  ),
  Claim(
    "gd_exponential",
    "isotropic",
    "Matching GD needs exponentially more steps with depth",
    "1.39 doublings/layer, R² 0.990",
    "Fu et al. §4.2; DERIVED: fit over layers 3-9 of Fig. 10 (log grid)",
    "slope of log2(best-matching GD steps, log grid {1, 2, 4, ...}) over the fit layers",
    _fit("gd_log"),
    AtLeast(1.0),
    "at least one doubling of GD steps per layer",
  ),
  Claim(
    "sim_e_newton_over_gd",
    "isotropic",
    "The last layer's errors are closer to Newton's than to GD's",
    "SimE .994 vs .987 (layer 12); Table 1: .991 vs .957",
    "Fu et al. Fig. 8 (DERIVED argmax), Table 1",
    "last layer's best SimE with Newton vs with GD (best of both GD grids); bootstrap intervals over prompts",
    _last_layer("sim_e", "newton", _GD_GRIDS),
    Greater("Newton", "GD"),
    "separated beyond sampling noise",
  ),
  Claim(
    "sim_w_newton_over_gd",
    "isotropic",
    "The last layer's induced weights are closer to Newton's than GD's",
    "SimW .974 (Newton) vs .978 (GD), best late-layer values: the paper's own figure does not separate them",
    "Fu et al. Fig. 9",
    "last layer's best SimW with Newton vs with GD (best of both GD grids)",
    _last_layer("sim_w", "newton", _GD_GRIDS),
    Greater("Newton", "GD"),
    "this project's criterion, stricter than the paper's figure",
  ),
  Claim(
    "error_at_2d",
    "isotropic",
    "With 2d examples the transformer is near least squares (error ~ 0)",
    "≈ 0 (noiseless least squares is exact for n ≥ d)",
    "Garg et al. Fig. 2",
    "error/d with 2d context points ÷ predicting zero's, on eval.num_prompts fresh prompts",
    _error_ratio_at_2d,
    AtMost(0.05),
    "this project's bar for a trained model",
  ),
  Claim(
    "newton_sequence",
    "isotropic",
    "Best-matching Newton steps per layer (d = 20, 12 layers)",
    ", ".join(map(str, PAPER_NEWTON_STEPS)),
    "Fu et al. Fig. 7(b) legend",
    "largest absolute difference from the paper's step over the 12 layers",
    _newton_sequence_distance,
    AtMost(3.0),
    "one middle layer's worth of Newton steps (≈ 3)",
  ),
)

_KAPPA100 = (
  Claim(
    "newton_slope",
    "kappa100",
    "On ill-conditioned data the layers still track Iterative Newton",
    "3.25 steps/layer",
    "Fu et al. Fig. 16; DERIVED: fit over layers 3-9 of its argmax (2, 5, 9, 13, 18, 19, 20)",
    "slope of the best-matching Newton steps (SimE) over the fit layers",
    _fit("newton"),
    Band(2.0, 4.0),
    "as for isotropic data",
  ),
  Claim(
    "gd_exponential",
    "kappa100",
    'GD needs many more steps ("GD requires 2,000 steps to converge")',
    "GD 1, 1, 1, 100, 200, 600, ~2300-3000 over layers 1-7",
    "Fu et al. §4.3, Fig. 16",
    "slope of log2(best-matching GD steps, log grid) over the fit layers",
    _fit("gd_log"),
    AtLeast(1.0),
    "as for isotropic data",
  ),
  Claim(
    "sim_e_newton_over_gd",
    "kappa100",
    "The last layer's errors are closer to Newton's than to GD's",
    "SimE ≈ .988 (Newton) vs ≈ .985 (GD)",
    "Fu et al. Fig. 16 (DERIVED)",
    "last layer's best SimE with Newton vs with GD (best of both GD grids)",
    _last_layer("sim_e", "newton", _GD_GRIDS),
    Greater("Newton", "GD"),
    "separated beyond sampling noise",
  ),
  Claim(
    "error_at_2d",
    "kappa100",
    "The transformer still solves the task",
    "matches Newton's 21 iterations (≈ least squares)",
    "Fu et al. §4.3, Fig. 4",
    "error/d with 2d context points ÷ predicting zero's",
    _error_ratio_at_2d,
    AtMost(0.05),
    "as for isotropic data",
  ),
)

_NOISY = (
  Claim(
    "newton_slope",
    "noisy",
    "With noise the layers keep the superlinear (Newton-like) progression",
    "pattern kept; no numbers given",
    "Fu et al. Figs. 19-21",
    "slope of the best-matching Newton steps (ridge λ = σ²) over the fit layers",
    _fit("newton"),
    Band(2.0, 4.0),
    "the isotropic band: the paper says the pattern is kept",
  ),
  Claim(
    "sim_e_newton_over_gd",
    "noisy",
    "The last layer is closer to (ridge) Newton than to GD",
    "pattern kept; no numbers given",
    "Fu et al. Figs. 19-21",
    "last layer's best SimE with Newton vs with GD (ridge λ = σ²)",
    _last_layer("sim_e", "newton", _GD_GRIDS),
    Greater("Newton", "GD"),
    "separated beyond sampling noise",
  ),
)

_LSTM = (
  Claim(
    "lstm_online_gd",
    "lstm",
    "The LSTM behaves like online GD rather than Newton",
    "SimE .954 (online GD) vs .920 (Newton)",
    "Fu et al. Table 1",
    "last layer's SimE with online GD vs its best SimE with Newton",
    _last_layer("sim_e", "online_gd", ("newton",)),
    Greater("online GD", "Newton"),
    "separated beyond sampling noise",
  ),
  Claim(
    "lstm_no_depth_trend",
    "lstm",
    "The LSTM does not improve across layers",
    "no progression with depth",
    "Fu et al. Fig. 7(c)",
    "slope of the best-matching Newton steps over all layers",
    _fit("newton"),
    AtMost(1.0),
    "below half the transformer's lower bound of 2 steps/layer",
  ),
)

_LSA = (
  Claim(
    "lsa_preconditioner",
    "lsa",
    "Each layer's A_i is a multiple of Σ⁻¹ (preconditioned GD)",
    "Dist(Σ^½ A_i Σ^½, I) close to 0",
    "Ahn et al. §4.3, Fig. 2",
    "largest Dist(Σ^½ A_i Σ^½, I) over layers (relative Frobenius distance to the nearest multiple of I)",
    _lsa_max_dist,
    AtMost(0.1),
    "an eighth of the unpreconditioned distance Dist(A_i, I) ≈ 0.8 of this task",
  ),
  Claim(
    "lsa_is_preconditioned_gd",
    "lsa",
    "The trained LSA predicts as L steps of Σ⁻¹-preconditioned GD",
    "Theorem 3's critical point",
    "Ahn et al. Theorem 3, §4.3",
    "|test loss(trained) - test loss(sparse LSA with A_i = a_i Σ⁻¹)| ÷ the latter, at the query",
    _lsa_gap_to_planted,
    AtMost(0.1),
    "within 10%",
  ),
)


def _construction_error(name: str):
  def measure(run):
    return {"value": (run["eval"][name]["max_relative_error"], None, None)}

  return measure


# Exact constructions: float32 rounding is the only error. Same bound as tests/analysis/test_constructions.py.
CONSTRUCTION_TOLERANCE = 1e-4

_CONSTRUCTIONS = (
  Claim(
    "newton_construction",
    "constructions",
    "A transformer can run k Iterative Newton steps (k + 8 layers)",
    "exact",
    "Fu et al. Theorem 5.1",
    "largest relative error of the k + 3-block construction's estimate against Iterative Newton's, k = 0..8",
    _construction_error("newton"),
    AtMost(CONSTRUCTION_TOLERANCE),
    "float32 rounding of an exact identity",
  ),
  Claim(
    "lsa_construction",
    "constructions",
    "L linear self-attention layers can run L steps of preconditioned GD",
    "exact",
    "Ahn et al. Lemma 1",
    "largest relative error of the LSA's prediction against preconditioned GD's (random A_l, L = 1..4)",
    _construction_error("lsa"),
    AtMost(CONSTRUCTION_TOLERANCE),
    "float32 rounding of an exact identity",
  ),
)

CLAIMS = _ISOTROPIC + _KAPPA100 + _NOISY + _LSTM + _LSA + _CONSTRUCTIONS


@dataclasses.dataclass(frozen=True)
class Grade:
  claim: Claim
  verdict: str  # PASS, FAIL or NOT RUN.
  quantities: dict  # name -> Quantity
  reason: str = ""  # Why NOT RUN.


def grade(claim: Claim, runs: list[dict]) -> Grade:
  """Grades `claim` on the finished runs (one per seed) of its experiment."""
  if not runs:
    return Grade(claim, NOT_RUN, {}, "no finished run of this experiment")
  try:
    measured = [claim.measure(run) for run in runs]
  except NotMeasurable as e:
    return Grade(claim, NOT_RUN, {}, str(e))
  quantities = {name: aggregate([m[name] for m in measured]) for name in measured[0]}
  if any(not np.isfinite(q.mean) for q in quantities.values()):
    return Grade(claim, FAIL, quantities, "a measured value is not finite")
  return Grade(claim, PASS if claim.verdict(quantities) else FAIL, quantities)
