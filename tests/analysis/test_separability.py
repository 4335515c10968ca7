"""Separability of Newton and GD (analysis/separability.py), Fig. 2's rate statistic (analysis/rates.py) and the
adaptive fit window, on constructed inputs whose answers are known."""

import jax.numpy as jnp
import numpy as np
import pytest

from configs import linreg
from icl_jax.analysis import algorithms
from icl_jax.analysis import probing
from icl_jax.analysis import rates
from icl_jax.analysis import separability
from icl_jax.analysis import similarity
from icl_jax.reproduce import claims

B, N, L = 200, 9, 3
STEPS = {"newton": [1, 2], "gd": [1, 50], "gd_log": [1, 2, 4]}


def _analyse(layers_LxBxN, algos, *args):
  """separability.analyse on these predictions ([L, B, N] and per grid [K, B, N]); args: [steps per grid,] ys."""
  steps, ys_BxN = args if len(args) == 2 else (STEPS, args[0])
  counts = similarity.resample_counts(np.asarray([0, 7], np.uint32), 200, B)
  cosines = {k: np.asarray(similarity.error_cosines(layers_LxBxN, p, ys_BxN, 1)) for k, p in algos.items()}
  sim_e = {k: similarity.bootstrap_similarity(c, counts, 0.9) for k, c in cosines.items()}
  return separability.analyse(cosines, sim_e, algos, ys_BxN, 1, steps, counts, 0.9)


def _ys(rng):
  return rng.normal(size=(B, N))


def test_families_that_coincide_are_never_separable():
  """Every Newton and GD setting predicts the same: no layer can prefer one, whatever the model does."""
  rng = np.random.default_rng(0)
  ys = _ys(rng)
  shared = ys + rng.normal(size=(B, N))
  algos = {k: np.stack([shared] * len(v)) for k, v in STEPS.items()}
  layers = np.stack([shared + rng.normal(scale=s, size=(B, N)) for s in (1.0, 0.3, 0.1)])
  found = _analyse(layers, algos, ys)
  np.testing.assert_allclose(found["separation"]["mean"], 0.0, atol=1e-12)
  np.testing.assert_allclose(found["newton_minus_gd"]["mean"], 0.0, atol=1e-6)  # float32 cosines.
  assert found["separable"] == [False] * L and found["separable_layers"] == []
  assert found["newton_minus_gd_separable"] is None


def test_families_that_differ_are_separable_and_the_preference_is_paired():
  """Newton's residuals and GD's are independent (separation ≈ 1); the layers sit on Newton's, closer with
  depth: every layer is separable, and prefers Newton by about the separation."""
  rng = np.random.default_rng(1)
  ys = _ys(rng)
  newton, gd = ys + rng.normal(size=(B, N)), ys + rng.normal(size=(B, N))
  algos = {
    "newton": np.stack([newton + rng.normal(scale=0.5, size=(B, N)), newton]),
    "gd": np.stack([gd + rng.normal(scale=0.5, size=(B, N)), gd]),
    "gd_log": np.stack([gd + rng.normal(scale=s, size=(B, N)) for s in (2.0, 1.0, 0.7)]),
  }
  layers = np.stack([newton + rng.normal(scale=s, size=(B, N)) for s in (0.3, 0.1, 0.01)])
  found = _analyse(layers, algos, ys)
  assert found["newton_steps"] == [2, 2, 2] and set(found["gd_grid"]) <= {"gd", "gd_log"}
  assert np.all(np.asarray(found["separation"]["low"]) > 0.8) and found["separable_layers"] == [1, 2, 3]
  assert np.all(np.asarray(found["noise"]) < 0.1)
  preference = found["newton_minus_gd_separable"]
  assert 0.7 < preference["low"] <= preference["mean"] <= preference["high"]
  # The last layer, nearly Newton itself, prefers it by about the separation.
  assert found["newton_minus_gd"]["mean"][-1] == pytest.approx(found["separation"]["mean"][-1], abs=0.02)


def _rate_counts(b):
  return similarity.resample_counts(np.asarray([0, 3], np.uint32), 100, b)


def test_the_rate_statistic_is_zero_for_geometric_negative_for_quadratic_positive_for_mixed():
  b, layers = 50, np.arange(6)
  ones = np.ones((b, 1))

  def statistic(errors_L):
    per_prompt = np.asarray(errors_L)[:, None, None] * ones[None]  # [L, B, T=1]
    return rates.log_ratio_trend(per_prompt, _rate_counts(b), 0.9)

  geometric = statistic(0.5**layers)
  assert geometric["value"] == pytest.approx(0.0, abs=1e-12)
  quadratic = statistic(0.5 ** (2.0**layers))  # e_{l+1} = e_l^2: Newton's rate.
  assert quadratic["high"] < 0
  mixed = statistic(0.5 * 0.3**layers + 0.5 * 0.9**layers)  # GD on two curvatures: the slow mode takes over.
  assert mixed["low"] > 0
  assert statistic([1.0, 0.5])["value"] is None  # Two layers: one ratio, no trend.


def test_the_rate_window_and_lengths_scale_the_papers():
  assert rates.window(12) == (3, 8) and rates.window(4) == (1, 3)
  assert rates.context_lengths(20, 41) == [22, 25, 30, 35]
  assert rates.context_lengths(8, 17) == [9, 10, 12, 14]


def test_the_adaptive_window_is_the_papers_on_its_own_sequence():
  config = linreg.get_config()
  assert probing.adaptive_fit_layers(config, claims.PAPER_NEWTON_STEPS) == (3, 9)
  # A model on its plateau by layer 5 is fit over layers 3-5, not 3-9.
  assert probing.adaptive_fit_layers(config, [1, 1, 4, 9, 14, 15, 15, 15, 15, 15, 15, 15]) == (3, 5)


def _algorithm_predictions(xs, ys):
  """Newton after 1 and 20 steps, GD (eta 0.01, summed gradient) after 1 and 50 steps and on the log grid:
  [K, B, N] each, from the package's own algorithms."""
  xs, ys = jnp.asarray(xs, jnp.float32), jnp.asarray(ys, jnp.float32)
  predict = lambda ws: np.asarray(jnp.swapaxes(algorithms.predict(ws, xs), 0, 1), np.float64)
  newton = algorithms.iterative_newton(xs, ys, 20)[:, [1, 20]]
  gd = lambda steps: algorithms.gradient_descent(xs, ys, steps, 0.01)
  return {"newton": predict(newton), "gd": predict(gd((1, 50))), "gd_log": predict(gd((1, 2, 4)))}


def test_on_prompts_where_every_query_is_new_the_algorithms_coincide_and_nothing_is_separable():
  """Each x_t is a new coordinate axis, orthogonal to every point before it: every algorithm's estimate lies in
  the span of the points seen, so every prediction is exactly 0 and no model can prefer one algorithm."""
  rng = np.random.default_rng(2)
  xs = np.zeros((B, N, N))
  xs[:, np.arange(N), np.arange(N)] = rng.normal(size=(B, N)) + 3.0
  ys = np.einsum("bnd,bd->bn", xs, rng.normal(size=(B, N)))
  algos = _algorithm_predictions(xs, ys)
  assert all(np.all(p == 0) for p in algos.values())
  layers = np.stack([rng.normal(scale=s, size=(B, N)) for s in (1.0, 0.5, 0.1)])
  found = _analyse(layers, algos, ys)
  np.testing.assert_allclose(found["separation"]["mean"], 0.0, atol=1e-12)
  assert found["separable_layers"] == []


def test_on_gaussian_prompts_one_gd_step_and_twenty_newton_steps_are_separable():
  """On x ~ N(0, I) prompts (d = 4, 9 points) twenty Newton steps have converged to least squares once t >= d,
  while one small GD step is far from it: the families are separable at a layer that follows Newton, which it
  prefers."""
  rng = np.random.default_rng(3)
  xs = rng.normal(size=(B, N, 4))
  ys = np.einsum("bnd,bd->bn", xs, rng.normal(size=(B, 4)))
  algos = _algorithm_predictions(xs, ys)
  algos = {"newton": algos["newton"], "gd": algos["gd"][:1], "gd_log": algos["gd_log"][:1]}  # GD: one step only.
  layers = np.stack([algos["newton"][1] + rng.normal(scale=s, size=(B, N)) for s in (0.3, 0.1, 0.01)])
  found = _analyse(layers, algos, {"newton": [1, 20], "gd": [1], "gd_log": [1]}, ys)
  assert found["newton_steps"] == [20] * L and found["separable_layers"] == [1, 2, 3]
  assert found["newton_minus_gd_separable"]["low"] > 0
