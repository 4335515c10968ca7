"""The claims' grading rules on synthetic numbers whose answer is known: aggregation over seeds, the paired
comparison, the three verdicts and the seeds an INCONCLUSIVE claim would need."""

import ml_collections
import numpy as np
import pytest

from icl_jax.reproduce import claims
from icl_jax.reproduce import experiments


def test_aggregate_is_the_t_interval_over_seeds_or_the_runs_own():
  q = claims.aggregate([(1.0, None, None), (2.0, None, None), (3.0, None, None)])
  # mean 2, standard error 1/sqrt(3), t_0.95 with 2 degrees of freedom 2.919986.
  assert (q.mean, q.seeds) == (2.0, 3)
  np.testing.assert_allclose([q.low, q.high], [2 - 2.919986 / np.sqrt(3), 2 + 2.919986 / np.sqrt(3)], rtol=1e-6)
  assert claims.aggregate([(0.5, 0.4, 0.7)]) == claims.Quantity(0.5, 0.4, 0.7, 1, (0.5,))


def _q(mean, low=None, high=None):
  return claims.Quantity(mean, low, high, 1, (mean,))


@pytest.mark.parametrize(
  "verdict,quantity,expected",
  [
    (claims.Band(2, 4), _q(3.0, 2.5, 3.5), "PASS"),
    (claims.Band(2, 4), _q(1.95, 0.64, 3.26), "INCONCLUSIVE"),  # Three seeds cannot fail a band by a hair.
    (claims.Band(2, 4), _q(1.5, 1.2, 1.9), "FAIL"),
    (claims.Band(2, 4), _q(4.01), "FAIL"),  # No interval: the value itself.
    (claims.AtLeast(1), _q(1.2, 1.0, 1.4), "PASS"),
    (claims.AtLeast(1), _q(0.99, 0.3, 1.7), "INCONCLUSIVE"),
    (claims.AtLeast(1), _q(0.8, 0.7, 0.9), "FAIL"),
    (claims.AtMost(0.05), _q(0.06), "FAIL"),
    (claims.AtMost(0.05), _q(0.007, -0.001, 0.016), "PASS"),
    (claims.Above(0), _q(0.01, 0.002, 0.02), "PASS"),
    (claims.Above(0), _q(-0.001, -0.007, 0.005), "INCONCLUSIVE"),
    (claims.Above(0), _q(-0.01, -0.02, -0.001), "FAIL"),
    (claims.Below(0), _q(-0.1, -0.2, -0.05), "PASS"),
    (claims.Below(0), _q(0.1, 0.0, 0.2), "FAIL"),
  ],
)
def test_verdicts_grade_the_interval(verdict, quantity, expected):
  assert verdict(quantity) == expected


def test_a_paired_comparison_separates_what_unpaired_intervals_cannot():
  """Two similarities measured on the same prompts: each has a wide interval (the prompts differ a lot), but
  their per-prompt difference is always positive. Over seeds, the per-seed differences are what is tested."""
  rng = np.random.default_rng(0)
  prompt_effect = rng.normal(0.95, 0.02, size=200)
  newton, gd = prompt_effect + 0.002, prompt_effect
  unpaired = [np.quantile(v, [0.05, 0.95]) for v in (newton, gd)]
  assert unpaired[0][0] < unpaired[1][1]  # Disjoint-interval rule: no verdict possible.
  per_seed = [(float(np.mean(newton - gd + rng.normal(0, 1e-4, 200))), None, None) for _ in range(3)]
  assert claims.Above(0)(claims.aggregate(per_seed)) == "PASS"
  # Per-seed differences straddling 0 give an interval that straddles 0: INCONCLUSIVE, not FAIL.
  straddling = claims.aggregate([(0.004, None, None), (-0.003, None, None), (0.001, None, None)])
  assert claims.Above(0)(straddling) == "INCONCLUSIVE"


def test_seeds_needed_to_settle_an_inconclusive_claim():
  q = claims.aggregate([(1.6, None, None), (2.1, None, None), (1.85, None, None)])  # Mean 1.85, sd 0.25.
  assert claims.Band(2, 4)(q) == "INCONCLUSIVE"
  needed = claims.seeds_needed(claims.Band(2, 4), q)
  # The t half-width with `needed` seeds is below the 0.15 margin to the band's edge, and not with one fewer.
  half = lambda n: claims.stats.t.ppf(0.95, n - 1) * 0.25 / np.sqrt(n)
  assert needed > 3 and half(needed) < 0.15 <= half(needed - 1)
  assert claims.seeds_needed(claims.Band(2, 4), _q(1.95, 0.6, 3.3)) is None  # One seed: no spread over seeds.


def test_a_claim_is_measured_but_not_graded_at_smoke_and_not_run_when_unmeasurable():
  claim = next(c for c in claims.CLAIMS if (c.experiment, c.id) == ("isotropic", "newton_sequence"))
  run = {"eval": {"best_match": {"newton": list(claims.PAPER_NEWTON_STEPS)}}, "config": _config(20, 41)}
  assert claims.grade(claim, [run]).verdict == "PASS"
  smoke = claims.grade(claim, [run], ungraded="a pipeline check")
  assert smoke.verdict == "NOT GRADED" and smoke.quantity.mean == 0
  small = claims.grade(claim, [{**run, "config": _config(8, 17)}])
  assert small.verdict == "NOT RUN" and "d = 8, 17 points" in small.reason
  assert claims.grade(claim, []).verdict == "NOT RUN"


def _config(d, n, **task):
  return ml_collections.ConfigDict(
    {"task": {"n_dims": d, "n_points": n, "kappa": 1.0, "noise_std": 0.0, "spectrum": "two_level", **task}}
  )


def _results(newton, gd_log, fit=(1, 3)):
  layers = np.arange(fit[0], fit[1] + 1)
  fits = {"layers": list(fit)}
  for grid, steps in (("newton", newton), ("gd_log", np.log2(gd_log))):
    slope, intercept = np.polyfit(layers, np.asarray(steps, float)[layers - 1], 1)
    fits[grid] = {"slope": slope, "r2": 1.0, "slope_interval": [slope - 0.1, slope + 0.1]}
  return {"eval": {"fits": fits, "best_match": {"newton": newton, "gd_log": gd_log}}}


def test_claims_measure_the_fits_and_the_flattening():
  by_id = {c.id: c for c in claims.CLAIMS if c.experiment == "isotropic"}
  run = _results([1, 4, 7, 7, 7], [1, 2, 4, 4, 4], fit=(1, 3))
  assert claims.grade(by_id["newton_slope"], [run]).verdict == "PASS"  # 3 steps per layer.
  assert claims.grade(by_id["gd_exponential"], [run]).verdict == "INCONCLUSIVE"  # 1 doubling, interval ± 0.1.
  assert claims.grade(by_id["newton_flattens"], [run]).quantity.mean == pytest.approx(0.0, abs=1e-12)
  steep = _results([1, 4, 7, 10, 13], [1, 2, 4, 4, 4], fit=(1, 3))
  assert claims.grade(by_id["newton_flattens"], [steep]).verdict == "FAIL"
  whole = _results([1, 4, 7], [1, 2, 4], fit=(1, 3))
  grade = claims.grade(by_id["newton_flattens"], [whole])
  assert grade.verdict == "NOT RUN" and "no layers after the fit range" in grade.reason
  # A summary written before a measurement existed says so instead of failing.
  old = claims.grade(by_id["newton_over_gd_separable"], [run])
  assert old.verdict == "NOT RUN" and "has no separability" in old.reason


def test_the_separable_claim_grades_the_paired_difference_and_names_the_layers():
  claim = next(c for c in claims.CLAIMS if (c.experiment, c.id) == ("isotropic", "newton_over_gd_separable"))
  separability = {"separable_layers": [3, 4], "newton_minus_gd_separable": {"mean": 0.01, "low": 0.004, "high": 0.02}}
  grade = claims.grade(claim, [{"eval": {"separability": separability}}])
  assert grade.verdict == "PASS" and grade.details == ("separable layers 3, 4",)
  none = {"separable_layers": [], "newton_minus_gd_separable": None}
  grade = claims.grade(claim, [{"eval": {"separability": none}}])
  assert grade.verdict == "NOT RUN" and "no layer is separable" in grade.reason


def test_garg_errors_are_graded_on_garg_task_only():
  claim = next(c for c in claims.CLAIMS if c.id == "garg_error_at_2d")
  error = {"mean": [[0.0] * 41], "low": [[0.0] * 41], "high": [[0.0] * 41]}
  error["mean"][0][40], error["low"][0][40], error["high"][0][40] = 0.0008, 0.0005, 0.0011
  run = {"eval": {"model_error_per_dim": error}, "config": _config(20, 41)}
  assert claims.grade(claim, [run]).verdict == "PASS"
  small = claims.grade(claim, [{**run, "config": _config(8, 17)}])
  assert small.verdict == "NOT RUN" and "no rule written before the runs" in small.reason
  explicit = _config(20, 41, spectrum="explicit", eigenvalues=(4.0,) + (1.0,) * 19)
  assert claims.grade(claim, [{**run, "config": explicit}]).verdict == "NOT RUN"
  # The configs' own isotropic task (configs/linreg.py: spectrum "two_level", κ = 1) is Garg et al.'s.
  paper = experiments.experiment_config(experiments.EXPERIMENTS[0], "paper", 0, experiments.default_config_dir())
  assert claims.grade(claim, [{**run, "config": paper}]).verdict == "PASS"


def test_sources_and_tolerances_are_stated_for_every_claim():
  ids = [(c.experiment, c.id) for c in claims.CLAIMS]
  assert len(ids) == len(set(ids))
  known = {e.name for e in experiments.EXPERIMENTS} | {"constructions"}
  for c in claims.CLAIMS:
    assert c.experiment in known and c.paper and c.source and c.tolerance_source and str(c.verdict), c.id


def _claim(experiment, claim_id):
  return next(c for c in claims.CLAIMS if (c.experiment, c.id) == (experiment, claim_id))


def test_the_late_layers_ols_claim_reads_the_layers_after_the_fit_range_from_two_examples_on():
  distance = np.full((5, 6), 0.01)
  distance[:, 1] = 10.0  # n = 1: not graded (the paper: "more than one example").
  distance[:3, 3] = 10.0  # Layers inside the fit range: not graded.
  run = {
    "eval": {"fits": {"layers": [1, 3]}, "ols_distance": {"per_dim": distance.tolist(), "zero_per_dim": [1.0] * 6}}
  }
  grade = claims.grade(_claim("isotropic", "late_layers_match_ols"), [run])
  assert grade.verdict == "PASS" and grade.quantity.mean == pytest.approx(0.01)
  distance[4, 5] = 0.2
  run["eval"]["ols_distance"]["per_dim"] = distance.tolist()
  assert claims.grade(_claim("isotropic", "late_layers_match_ols"), [run]).verdict == "FAIL"


def test_the_bfgs_claim_fits_layers_6_to_11_and_shows_cg_beside_it():
  linear = [1, 1, 1, 1, 1, 3, 5, 7, 9, 11, 13, 13]
  run = {"eval": {"best_match": {"bfgs": linear, "cg": linear}}}
  grade = claims.grade(_claim("isotropic", "bfgs_linear"), [run])
  assert grade.verdict == "PASS" and grade.details == (
    "BFGS 3, 5, 7, 9, 11, 13; CG 3, 5, 7, 9, 11, 13: equal at 6 of 6 layers",
  )
  flat = {"eval": {"best_match": {"bfgs": [7] * 12, "cg": [7] * 12}}}
  assert claims.grade(_claim("isotropic", "bfgs_linear"), [flat]).verdict == "FAIL"


def test_forgetting_claims_read_the_statistic_and_say_when_outputs_predate_the_test():
  statistic = {"model": {"value": 0.01, "low": 0.0, "high": 0.02}, "online_gd": {"value": 0.3, "low": 0.2, "high": 0.4}}
  run = {"eval": {"forgetting": {"statistic": statistic}}}
  assert claims.grade(_claim("isotropic", "no_forgetting"), [run]).verdict == "PASS"
  assert claims.grade(_claim("isotropic", "forgetting_control"), [run]).verdict == "PASS"
  # The same statistic, 0 inside its interval: the LSTM's claim (older examples recalled worse) is open.
  assert claims.grade(_claim("lstm", "lstm_forgets"), [run]).verdict == "INCONCLUSIVE"
  old = claims.grade(_claim("isotropic", "no_forgetting"), [{"eval": {"forgetting": None}}])
  assert old.verdict == "NOT RUN" and "predate the forgetting test" in old.reason


def test_the_linearity_claims_grade_every_layer_and_say_where_the_largest_is():
  run = {"eval": {"linearity": {"fit_residual": [1e-3, 1e-5, 2e-5], "span_residual": [0.02, 0.05, 0.04]}}}
  grade = claims.grade(_claim("isotropic", "read_out_linear"), [run])
  assert grade.verdict == "FAIL" and grade.details == ("largest at layer 1; last layer 2e-05",)
  assert claims.grade(_claim("isotropic", "induced_weights_in_span"), [run]).verdict == "PASS"
  run["eval"]["linearity"]["span_residual"] = None
  assert claims.grade(_claim("isotropic", "induced_weights_in_span"), [run]).verdict == "NOT RUN"


def test_hidden_size_experiments_scale_the_width_with_d_and_grade_both_directions():
  found = {e.name: e for e in experiments.EXPERIMENTS}
  for scale, d, widths in (("paper", 20, (8, 16, 32, 64)), ("medium", 8, (3, 6, 13, 26))):
    for paper, width in zip(experiments.PAPER_HIDDEN_SIZES, widths):
      config = experiments.experiment_config(found[f"width{paper}"], scale, 0, experiments.default_config_dir())
      assert (config.task.n_dims, config.model.width, config.model.num_heads) == (d, width, 1)
  curve = lambda ratio: {"error_per_dim": [1.0] * 16 + [ratio] + [0.0], "zero_per_dim": [1.0] * 18}
  config = _config(8, 18)
  config.model = {"width": 3, "num_heads": 1}
  for claim_id, experiment, ratio, expected in (
    ("mimics_ols", "width64", 0.01, "PASS"),
    ("mimics_ols", "width32", 0.2, "FAIL"),
    ("fails_ols", "width8", 0.2, "PASS"),
    ("fails_ols", "width16", 0.01, "FAIL"),
  ):
    run = {"eval": {}, "curve": curve(ratio), "config": config}
    assert claims.grade(_claim(experiment, claim_id), [run]).verdict == expected


def test_gdpp_claims_pass_on_a_planted_gdpp_model_and_fail_on_a_distorted_one():
  """Ahn et al. §5.1 on a full-form LSA built with B_i = b_i I and A_i = a_i Σ^-1 (the paper's values), read off by
  the analysis as a trained one is."""
  import jax.numpy as jnp

  from icl_jax import data
  from icl_jax.analysis import lsa_analysis

  found = {e.name: e for e in experiments.EXPERIMENTS}
  config = experiments.experiment_config(found["gdpp"], "medium", 0, experiments.default_config_dir())
  assert (config.model.lsa_sparse, config.task.n_points, config.task.n_dims) == (False, 11, 5)
  sigma_inv = np.linalg.inv(np.asarray(data.covariance_matrix(config.task), np.float64))
  b = claims.PAPER_GDPP_B + (1.0,)

  def planted(scale):
    return {
      f"layer_{i}": {
        "A": jnp.asarray(scale * a * sigma_inv, jnp.float32),
        "B": jnp.asarray(b[i] * np.eye(5), jnp.float32),
      }
      for i, a in enumerate(claims.PAPER_GDPP_A)
    }

  for scale, expected in ((1.0, "PASS"), (2.0, "FAIL")):
    results = lsa_analysis.analyse(config, planted(scale), num_prompts=64, tune_prompts=64)
    run = {"eval": {k: results[k] for k in ("a", "b")}, "config": config}
    assert claims.grade(_claim("gdpp", "gdpp_step_sizes"), [run]).verdict == expected
    assert claims.grade(_claim("gdpp", "gdpp_b"), [run]).verdict == "PASS"


def test_the_lsa_steps_are_compared_in_any_order_and_gdpps_in_the_layers_order():
  swapped = {"eval": {"a": [-0.43, -0.69, -1.71]}}  # The sparse form's commuting steps, layers 1-2 swapped.
  assert claims.grade(_claim("lsa", "lsa_step_sizes"), [swapped]).verdict == "PASS"
  reversed_gdpp = {"eval": {"a": list(claims.PAPER_GDPP_A[::-1]), "b": list(claims.PAPER_GDPP_B)}}
  assert claims.grade(_claim("gdpp", "gdpp_step_sizes"), [reversed_gdpp]).verdict == "FAIL"
