"""The forgetting test and the linearity statistics (Fu et al. Figs. 5, 27) on predictors whose answer is known."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icl_jax.analysis import algorithms
from icl_jax.analysis import forgetting
from icl_jax.analysis import linearity
from icl_jax.analysis import similarity

D, B = 6, 200


def _prompts(n_points):
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(B, n_points, D)).astype(np.float32)
  w = rng.normal(size=(B, D)).astype(np.float32)
  return xs, np.einsum("bnd,bd->bn", xs, w)


def _recall(weights_fn, n):
  xs, ys = forgetting.prompts(*_prompts(n + 3), n)
  preds = np.asarray(jnp.einsum("bd,bd->b", weights_fn(xs, ys)[:, n], xs[:, n])).reshape(n, -1)
  targets = np.asarray(ys[:, n]).reshape(n, -1)
  counts = similarity.resample_counts(jax.random.key(1), 200, B)
  errors = forgetting.errors(preds, targets, D)
  zero = forgetting.errors(np.zeros_like(targets), targets, D)
  return errors, forgetting.forgetting_statistic(errors, zero, counts, 0.9)


def test_the_query_repeats_the_example_g_back_with_its_label():
  xs, ys = _prompts(9)
  n = 6
  fx, fy = forgetting.prompts(xs, ys, n)
  fx, fy = np.asarray(fx).reshape(n, B, n + 1, D), np.asarray(fy).reshape(n, B, n + 1)
  for g in range(n):
    np.testing.assert_array_equal(fx[g, :, :n], xs[:, :n])
    np.testing.assert_array_equal(fx[g, :, n], xs[:, n - 1 - g])
    np.testing.assert_array_equal(fy[g, :, n], ys[:, n - 1 - g])


def test_least_squares_recalls_every_example_and_does_not_forget():
  errors, statistic = _recall(lambda xs, ys: algorithms.least_squares(xs, ys), D)
  assert np.max(errors) < 1e-8
  assert abs(statistic["value"]) < 1e-6 and statistic["high"] < 1e-6


def test_online_gd_recalls_the_last_example_and_forgets_older_ones():
  errors, statistic = _recall(lambda xs, ys: algorithms.online_gradient_descent(xs, ys), D)
  assert np.mean(errors[0]) < 1e-8  # The projection fits the last example exactly.
  assert np.mean(errors[-1]) > 0.1
  assert statistic["low"] > 0.05


def test_the_number_of_examples_scales_with_d_and_needs_room_for_a_query():
  assert forgetting.num_examples(20, 41) == 20
  assert forgetting.num_examples(8, 17) == 8
  assert forgetting.num_examples(8, 8) is None


def _queries(rng, n_points=5, q=12):
  return rng.normal(size=(2, n_points, q, D))


def test_the_fit_residual_is_zero_for_a_linear_read_out_and_large_for_a_nonlinear_one():
  rng = np.random.default_rng(0)
  queries = _queries(rng)
  w = rng.normal(size=(2, 5, D))
  linear = np.einsum("bnqd,bnd->bnq", queries, w)[None]
  nonlinear = np.square(linear)
  for preds, check in ((linear, lambda r: r < 1e-10), (nonlinear, lambda r: r > 0.1)):
    weights = similarity.induced_weights(jnp.asarray(queries), jnp.asarray(preds))
    assert check(linearity.fit_residual(queries, preds, weights, y_power=float(np.mean(linear**2)))[0])


def test_weights_in_the_span_of_the_examples_have_no_residual_and_random_ones_do():
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(B, 9, D)).astype(np.float32)
  # After t examples: a combination of x_1..x_t (in the span), or a random vector.
  coefficients = rng.normal(size=(B, 9, 9)) * np.tril(np.ones((9, 9)), -1)[None]
  in_span = np.einsum("btn,bnd->btd", coefficients, xs)
  random = rng.normal(size=(B, 9, D))
  assert linearity.span_residual(xs, in_span[None])[0] < 1e-5
  # A random vector has (d - t) / d of its squared norm outside a t-dimensional span, on average over t < d.
  expected = np.mean([(D - t) / D for t in range(1, D)])
  assert linearity.span_residual(xs, random[None])[0] == pytest.approx(expected, abs=0.03)
  assert linearity.span_residual(xs[:, :1], random[None, :, :1]) is None
