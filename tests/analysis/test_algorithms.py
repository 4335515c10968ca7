"""Tests of icl_jax.analysis.algorithms against numpy references and brute-force prefix loops, in float32 and
float64. Every algorithm returns the estimates of every prefix t = 0..N; index -1 on the prefix axis is the whole
prompt's."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icl_jax.analysis import algorithms

# Relative tolerances of converged estimates against float64 references. Float32 ones allow for the squared
# condition number that Newton's method and gradient descent work with (S = X^T X).
RTOL = {np.float32: 1e-3, np.float64: 1e-9}


@pytest.fixture(params=[np.float32, np.float64], ids=["float32", "float64"])
def dtype(request):
  """The dtype of a test's data; float64 runs with x64 enabled, float32 with whatever the environment sets."""
  context = jax.enable_x64(True) if request.param == np.float64 else contextlib.nullcontext()
  with context:
    yield request.param


def _prompts(seed, b, n, d, dtype, kappa=1.0, noise=0.0):
  """xs [b, n, d] ~ N(0, Sigma) with cond(Sigma) = kappa, ys = xs w (+ noise); also Sigma's square root."""
  rng = np.random.default_rng(seed)
  rotation_DxD = np.linalg.qr(rng.normal(size=(d, d)))[0]
  sqrt_sigma_DxD = rotation_DxD * np.sqrt(np.logspace(0, -np.log10(kappa), d))[None, :]
  xs = rng.normal(size=(b, n, d)) @ sqrt_sigma_DxD.T
  ys = np.einsum("bnd,bd->bn", xs, rng.normal(size=(b, d))) + noise * rng.normal(size=(b, n))
  return xs.astype(dtype), ys.astype(dtype), sqrt_sigma_DxD


def _lstsq(xs, ys):
  """Minimum-norm least squares in float64, prompt by prompt."""
  return np.stack([np.linalg.lstsq(x.astype(np.float64), y.astype(np.float64), rcond=None)[0] for x, y in zip(xs, ys)])


def _to_numpy(array, dtype):
  assert array.dtype == dtype, f"got {array.dtype}, expected {np.dtype(dtype)}"
  return np.asarray(array, np.float64)


def _max_relative_error(w, w_ref):
  return np.max(np.linalg.norm(w - w_ref, axis=-1) / np.linalg.norm(w_ref, axis=-1))


def _max_relative_prediction_error(w, w_ref, sqrt_sigma_DxD, seed=123):
  """Relative error of predictions on fresh queries from the prompts' distribution: the error measure that
  matters for regression, which weights each direction of w by the data's variance along it."""
  queries_QxD = np.random.default_rng(seed).normal(size=(256, sqrt_sigma_DxD.shape[0])) @ sqrt_sigma_DxD.T
  return _max_relative_error(w @ queries_QxD.T, w_ref @ queries_QxD.T)


def _whole(ws):
  """The whole prompt's estimates: prefix t = N, the last on the prefix axis (second to last)."""
  return ws[..., -1, :]


def _gd_loop(x, y, steps, learning_rate, scale=1.0, preconditioner=None):
  """Float64 gradient descent on one prompt, one update at a time: the iterates after each of `steps`."""
  p = np.eye(x.shape[1]) if preconditioner is None else preconditioner
  w, iterates = np.zeros(x.shape[1]), {}
  for k in range(max(steps) + 1):
    iterates[k] = w
    w = w - learning_rate * p @ (x.T @ x @ w - x.T @ y) / scale
  return np.stack([iterates[k] for k in steps])


def _largest_eigenvalue(s_BxDxD):
  return np.linalg.eigvalsh(s_BxDxD.astype(np.float64))[:, -1]


# ---------------------------------------------------------------------------------------------------------------
# Least squares.


@pytest.mark.parametrize(
  "n, d, kappa",
  [(30, 8, 1.0), (5, 8, 1.0), (30, 8, 1e4), (5, 8, 1e4)],
  ids=["overdetermined", "underdetermined", "ill_conditioned", "ill_conditioned_under"],
)
def test_least_squares_matches_numpy_lstsq(dtype, n, d, kappa):
  xs, ys, _ = _prompts(0, 4, n, d, dtype, kappa=kappa)
  ws = _to_numpy(algorithms.least_squares(jnp.asarray(xs), jnp.asarray(ys)), dtype)
  assert ws.shape == (4, n + 1, d)
  w = _whole(ws)
  # The SVD of X (not X^T X) keeps float32 at ~cond(X) eps, even with cond(Sigma) = 1e4.
  assert _max_relative_error(w, _lstsq(xs, ys)) < RTOL[dtype] / 10


def test_least_squares_rank_deficient_is_minimum_norm(dtype):
  xs, ys, _ = _prompts(1, 4, 30, 8, dtype)
  # A repeated column and a zero (padded) column: w is determined only up to the null space of X.
  xs[:, :, 1] = xs[:, :, 0]
  xs[:, :, -1] = 0
  w = _whole(_to_numpy(algorithms.least_squares(jnp.asarray(xs), jnp.asarray(ys)), dtype))
  np.testing.assert_allclose(w, _lstsq(xs, ys), rtol=RTOL[dtype], atol=RTOL[dtype])
  np.testing.assert_allclose(w[:, 0], w[:, 1], rtol=RTOL[dtype])
  assert np.all(w[:, -1] == 0)


def test_least_squares_empty_prompt_is_zero(dtype):
  w = algorithms.least_squares(jnp.zeros((2, 5, 3), dtype), jnp.zeros((2, 5), dtype))
  assert np.all(_to_numpy(w, dtype) == 0)


@pytest.mark.parametrize("n", [30, 5])
def test_ridge_matches_closed_form(dtype, n):
  xs, ys, _ = _prompts(2, 4, n, 8, dtype, noise=0.1)
  ridge = 0.7
  x64, y64 = xs.astype(np.float64), ys.astype(np.float64)
  s = np.einsum("bni,bnj->bij", x64, x64) + ridge * np.eye(8)
  expected = np.linalg.solve(s, np.einsum("bni,bn->bi", x64, y64)[..., None])[..., 0]
  w = _whole(_to_numpy(algorithms.least_squares(jnp.asarray(xs), jnp.asarray(ys), ridge=ridge), dtype))
  np.testing.assert_allclose(w, expected, rtol=RTOL[dtype] / 10, atol=RTOL[dtype] / 10)


# ---------------------------------------------------------------------------------------------------------------
# Iterative Newton.

NEWTON_CASES = {
  # name: (n, d, kappa of Sigma, steps). kappa(S) ~ kappa^2 needs log2(kappa(S)^2) steps before the quadratic
  # phase; in float32, rank-deficient S (n < d) must stop before null-space rounding, which doubles each
  # step, takes over (see `iterative_newton`).
  "overdetermined": (40, 10, 1.0, 30),
  "underdetermined": (6, 10, 1.0, 30),
  "ill_conditioned": (40, 10, 1e4, 50),
  "ill_conditioned_underdetermined": (6, 10, 1e4, 36),
}


@pytest.mark.parametrize("case", NEWTON_CASES)
def test_newton_converges_to_least_squares(dtype, case):
  n, d, kappa, num_steps = NEWTON_CASES[case]
  xs, ys, sqrt_sigma = _prompts(3, 8, n, d, dtype, kappa=kappa)
  ws = _to_numpy(algorithms.iterative_newton(jnp.asarray(xs), jnp.asarray(ys), num_steps), dtype)
  assert ws.shape == (8, num_steps + 1, n + 1, d)
  ws = _whole(ws)
  ols = _lstsq(xs, ys)
  errors = [_max_relative_prediction_error(ws[:, k], ols, sqrt_sigma) for k in range(num_steps + 1)]
  assert errors[-1] < RTOL[dtype]
  assert errors[0] > 0.1  # It did have something to converge from.
  if dtype == np.float64:
    assert _max_relative_error(ws[:, -1], ols) < 1e-8


def test_newton_initial_iterate_and_recursion(dtype):
  xs, ys, _ = _prompts(4, 3, 12, 5, dtype)
  ws = _whole(_to_numpy(algorithms.iterative_newton(jnp.asarray(xs), jnp.asarray(ys), 3), dtype))
  x64, y64 = xs.astype(np.float64), ys.astype(np.float64)
  for x, y, w in zip(x64, y64, ws):
    s = x.T @ x
    m = s / np.linalg.norm(s @ s.T)  # Fu et al.'s code: torch.linalg.norm, i.e. Frobenius.
    for k in range(4):
      np.testing.assert_allclose(w[k], m @ x.T @ y, rtol=RTOL[dtype] / 10)
      m = 2 * m - m @ s @ m


def test_newton_spectral_alpha_exact_arithmetic_loses_top_direction(dtype):
  # S = diag(4, 1) is exact in binary: alpha = 2 / 16 and the top eigenvalue of alpha S^2 is exactly 2, so
  # M_1 = M_0 (2 I - S M_0) has a 0 there and keeps it; the other direction converges.
  xs = jnp.asarray([[[2.0, 0.0], [0.0, 1.0]]], dtype)
  ys = jnp.asarray([[2.0, 3.0]], dtype)  # w_ols = (1, 3).
  spectral = _whole(_to_numpy(algorithms.iterative_newton(xs, ys, 40, alpha="spectral"), dtype))
  np.testing.assert_array_equal(spectral[0, 1:, 0], 0.0)
  np.testing.assert_allclose(spectral[0, -1, 1], 3.0, rtol=RTOL[dtype] / 10)
  frobenius = _whole(_to_numpy(algorithms.iterative_newton(xs, ys, 40), dtype))
  np.testing.assert_allclose(frobenius[0, -1], [1.0, 3.0], rtol=RTOL[dtype] / 10)


def test_newton_spectral_alpha_generic_data_stalls_in_top_direction(dtype):
  # With rounding, 1 - alpha lambda_max^2 = -1 + O(eps), so the top direction stays (nearly) missing until that
  # O(eps) has been squared up to O(1), ~log2(1/eps) steps (then it converges or diverges, by the sign of the
  # rounding); all other directions converge as usual. 12 steps keep float32 (2^-23) well inside the stall.
  xs, ys, _ = _prompts(5, 4, 40, 10, dtype)
  ws = _whole(_to_numpy(algorithms.iterative_newton(jnp.asarray(xs), jnp.asarray(ys), 12, alpha="spectral"), dtype))
  ols = _lstsq(xs, ys)
  top_BxD = np.linalg.eigh(np.einsum("bni,bnj->bij", xs.astype(np.float64), xs.astype(np.float64)))[1][..., -1]
  top_share = np.einsum("bkd,bd->bk", ws[:, 1:], top_BxD) / np.einsum("bd,bd->b", ols, top_BxD)[:, None]
  assert np.max(np.abs(top_share)) < 0.05
  rest = ws[:, -1] - ols
  rest -= np.einsum("bd,bd->b", rest, top_BxD)[:, None] * top_BxD
  assert np.max(np.linalg.norm(rest, axis=-1) / np.linalg.norm(ols, axis=-1)) < RTOL[dtype]


# ---------------------------------------------------------------------------------------------------------------
# Gradient descent.


@pytest.mark.parametrize("gradient_scale", ["sum", "mean"])
@pytest.mark.parametrize("n, d", [(30, 8), (5, 8)], ids=["overdetermined", "underdetermined"])
def test_gradient_descent_converges_to_least_squares(dtype, gradient_scale, n, d):
  xs, ys, _ = _prompts(6, 4, n, d, dtype)
  lambda_max = np.max(_largest_eigenvalue(np.einsum("bni,bnj->bij", xs, xs)))
  hessian_lambda_max = lambda_max if gradient_scale == "sum" else lambda_max / n
  learning_rate = 1.0 / hessian_lambda_max  # Below 2 / lambda_max: converges.
  ws = _to_numpy(
    algorithms.gradient_descent(jnp.asarray(xs), jnp.asarray(ys), (4000,), learning_rate, gradient_scale), dtype
  )
  assert ws.shape == (4, 1, n + 1, d)
  ws = _whole(ws)
  np.testing.assert_allclose(ws[:, 0], _lstsq(xs, ys), rtol=RTOL[dtype], atol=RTOL[dtype])
  # Above 2 / lambda_max it diverges.
  diverged = algorithms.gradient_descent(
    jnp.asarray(xs), jnp.asarray(ys), (200,), 2.5 / hessian_lambda_max, gradient_scale
  )
  assert np.max(np.abs(_whole(_to_numpy(diverged, dtype)))) > 1e3


def test_gradient_descent_iterates(dtype):
  xs, ys, _ = _prompts(7, 3, 12, 5, dtype)
  ws_sum = _whole(_to_numpy(algorithms.gradient_descent(jnp.asarray(xs), jnp.asarray(ys), range(4), 0.01), dtype))
  ws_mean = _whole(
    _to_numpy(algorithms.gradient_descent(jnp.asarray(xs), jnp.asarray(ys), range(4), 0.12, "mean"), dtype)
  )
  assert ws_sum.shape == ws_mean.shape == (3, 4, 5)
  for x, y, w_sum, w_mean in zip(xs.astype(np.float64), ys.astype(np.float64), ws_sum, ws_mean):
    w = np.zeros(5)
    for k in range(4):
      np.testing.assert_allclose(w_sum[k], w, rtol=RTOL[dtype] / 10, atol=1e-12)
      w = w - 0.01 * (x.T @ x @ w - x.T @ y)  # Fu et al.'s code: unnormalised gradient.
    w = np.zeros(5)
    for k in range(4):
      np.testing.assert_allclose(w_mean[k], w, rtol=RTOL[dtype] / 10, atol=1e-12)
      w = w - 0.12 * (x.T @ x @ w - x.T @ y) / 12


@pytest.mark.parametrize("gradient_scale", ["sum", "mean"])
def test_gradient_descent_unsorted_steps_match_a_loop_of_updates(dtype, gradient_scale):
  xs, ys, _ = _prompts(8, 4, 12, 6, dtype, kappa=30.0)
  learning_rate = 0.01 if gradient_scale == "sum" else 0.15
  steps = (300, 1, 37, 0, 64, 5, 64)  # Unsorted, with 0 and a repeat.
  at = _whole(
    _to_numpy(
      algorithms.gradient_descent(jnp.asarray(xs), jnp.asarray(ys), steps, learning_rate, gradient_scale), dtype
    )
  )
  assert at.shape == (4, len(steps), 6)
  scale = 1.0 if gradient_scale == "sum" else 12.0
  loop = np.stack(
    [_gd_loop(x, y, steps, learning_rate, scale) for x, y in zip(xs.astype(np.float64), ys.astype(np.float64))]
  )
  nonzero = [i for i, step in enumerate(steps) if step]
  assert _max_relative_error(at[:, nonzero], loop[:, nonzero]) < RTOL[dtype] / 10
  assert np.all(at[:, steps.index(0)] == 0)  # Zero steps: w_0 = 0 exactly.


def test_gradient_descent_long_run_matches_a_loop_of_updates(dtype):
  # Fu et al.'s grid reaches 4096 steps; squaring the step map must not accumulate rounding.
  xs, ys, _ = _prompts(9, 2, 41, 20, dtype)
  steps = tuple(2**i for i in range(13))
  at = _whole(_to_numpy(algorithms.gradient_descent(jnp.asarray(xs), jnp.asarray(ys), steps, 0.01), dtype))
  loop = np.stack([_gd_loop(x, y, steps, 0.01) for x, y in zip(xs.astype(np.float64), ys.astype(np.float64))])
  assert _max_relative_error(at, loop) < RTOL[dtype] / 10


def test_float64_hyperparameters_keep_float32_data_float32():
  xs, ys, _ = _prompts(16, 2, 10, 4, np.float32)
  xs, ys = jnp.asarray(xs), jnp.asarray(ys)
  with jax.enable_x64(True):
    learning_rate = np.float64(0.01)  # Strongly typed: would promote float32 data if used as is.
    preconditioner = jnp.eye(4, dtype=jnp.float64)
    weights = (
      algorithms.gradient_descent(xs, ys, (3,), learning_rate),
      algorithms.gradient_descent(xs, ys, [2], learning_rate, "mean", preconditioner),
      algorithms.least_squares(xs, ys, ridge=np.float64(0.5)),
      algorithms.iterative_newton(xs, ys, 2),
      algorithms.online_gradient_descent(xs, ys),
    )
    for result in weights + tuple(algorithms.predict(ws, xs) for ws in weights):
      assert result.dtype == jnp.float32


# ---------------------------------------------------------------------------------------------------------------
# Online and preconditioned gradient descent.


def test_online_gradient_descent_fits_each_new_point(dtype):
  xs, ys, _ = _prompts(10, 3, 9, 5, dtype)
  xs[:, 4] = 0  # A zero point must be skipped, not divided by.
  ws = _to_numpy(algorithms.online_gradient_descent(jnp.asarray(xs), jnp.asarray(ys)), dtype)
  assert ws.shape == (3, 10, 5)
  assert np.all(ws[:, 0] == 0)
  fitted = np.einsum("btd,btd->bt", ws[:, 1:], xs)  # x_t . w after point t.
  keep = np.arange(9) != 4
  np.testing.assert_allclose(fitted[:, keep], ys[:, keep], rtol=RTOL[dtype] / 10, atol=RTOL[dtype] / 10)
  np.testing.assert_array_equal(ws[:, 5], ws[:, 4])
  # Each step is the projection onto {w : x_t . w = y_t}, a step along x_t.
  x, y = xs.astype(np.float64), ys.astype(np.float64)
  expected = (
    ws[:, 2] + ((y[:, 2] - np.einsum("bd,bd->b", x[:, 2], ws[:, 2])) / np.sum(x[:, 2] ** 2, -1))[:, None] * x[:, 2]
  )
  np.testing.assert_allclose(ws[:, 3], expected, rtol=RTOL[dtype] / 10)


@pytest.mark.parametrize("shared", [False, True], ids=["per_prompt", "shared"])
def test_preconditioned_gradient_descent_one_step_to_least_squares(dtype, shared):
  xs, ys, _ = _prompts(11, 4, 30, 6, dtype, kappa=100.0)
  if shared:
    xs[:] = xs[:1]  # One X for all prompts, so one P fits all.
  s_BxDxD = np.einsum("bni,bnj->bij", xs.astype(np.float64), xs.astype(np.float64))
  preconditioner = np.linalg.inv(s_BxDxD / 30)
  preconditioner = (preconditioner[0] if shared else preconditioner).astype(dtype)
  ws = _whole(
    _to_numpy(
      algorithms.gradient_descent(jnp.asarray(xs), jnp.asarray(ys), range(3), 1.0, "mean", jnp.asarray(preconditioner)),
      dtype,
    )
  )
  assert ws.shape == (4, 3, 6)
  assert np.all(ws[:, 0] == 0)
  np.testing.assert_allclose(ws[:, 1], _lstsq(xs, ys), rtol=RTOL[dtype], atol=RTOL[dtype])
  np.testing.assert_allclose(ws[:, 2], _lstsq(xs, ys), rtol=RTOL[dtype], atol=RTOL[dtype])


@pytest.mark.parametrize("gradient_scale", ["sum", "mean"])
def test_preconditioned_gradient_descent_iterates(dtype, gradient_scale):
  xs, ys, _ = _prompts(17, 3, 10, 4, dtype)
  root = np.random.default_rng(17).normal(size=(3, 4, 4))
  preconditioner = (root @ root.transpose(0, 2, 1) / 4 + np.eye(4)).astype(dtype)  # SPD, not commuting with S.
  learning_rate = 0.02 if gradient_scale == "sum" else 0.2
  ws = _whole(
    _to_numpy(
      algorithms.gradient_descent(
        jnp.asarray(xs), jnp.asarray(ys), range(4), learning_rate, gradient_scale, jnp.asarray(preconditioner)
      ),
      dtype,
    )
  )
  scale = 1 if gradient_scale == "sum" else 10
  for x, y, p, w_k in zip(xs.astype(np.float64), ys.astype(np.float64), preconditioner.astype(np.float64), ws):
    w = np.zeros(4)
    for k in range(4):
      np.testing.assert_allclose(w_k[k], w, rtol=RTOL[dtype] / 10, atol=1e-12)
      w = w - learning_rate * p @ (x.T @ x @ w - x.T @ y) / scale


def test_preconditioned_gradient_descent_with_identity_is_gradient_descent(dtype):
  xs, ys, _ = _prompts(12, 3, 10, 4, dtype)
  pgd = algorithms.gradient_descent(jnp.asarray(xs), jnp.asarray(ys), range(6), 0.2, "mean", jnp.eye(4, dtype=dtype))
  gd = algorithms.gradient_descent(jnp.asarray(xs), jnp.asarray(ys), range(6), 0.2, "mean")
  np.testing.assert_allclose(_to_numpy(pgd, dtype), _to_numpy(gd, dtype), rtol=RTOL[dtype] / 100)


# ---------------------------------------------------------------------------------------------------------------
# Prefix evaluation against a brute-force loop over (a few) prefixes.

N_PREFIX, D_PREFIX = 7, 4
PREFIXES = (1, 3, N_PREFIX - 1)  # 3 < d: rank-deficient; 6 > d: overdetermined.
# Predictions against x_t . (the prefix weights), computed in float64 here: only the rounding of one D-term dot.
PREDICTION_RTOL = {np.float32: 1e-5, np.float64: 1e-12}


def _prefix_cases(dtype):
  """name -> (function of (xs, ys) returning every prefix's weights, stacked iterates on axis 1?)."""
  preconditioner = jnp.asarray(np.diag([1.0, 0.5, 2.0, 1.5]), dtype)
  return {
    "least_squares": (algorithms.least_squares, False),
    "ridge": (lambda x, y: algorithms.least_squares(x, y, ridge=0.3), False),
    "newton": (lambda x, y: algorithms.iterative_newton(x, y, 6), True),
    "newton_spectral": (lambda x, y: algorithms.iterative_newton(x, y, 3, "spectral"), True),
    "gd_sum": (lambda x, y: algorithms.gradient_descent(x, y, range(7), 0.05), True),
    "gd_mean": (lambda x, y: algorithms.gradient_descent(x, y, [9, 0, 2], 0.3, "mean"), True),
    "pgd": (lambda x, y: algorithms.gradient_descent(x, y, range(5), 0.3, "mean", preconditioner), True),
    "online_gd": (algorithms.online_gradient_descent, False),
  }


@pytest.mark.parametrize("case", list(_prefix_cases(np.float32)))
def test_prefix_weights_and_predictions_equal_brute_force(dtype, case):
  weights_fn, has_iterates = _prefix_cases(dtype)[case]
  xs, ys, _ = _prompts(13, 3, N_PREFIX, D_PREFIX, dtype, kappa=10.0)
  weights = weights_fn(jnp.asarray(xs), jnp.asarray(ys))
  predictions = _to_numpy(algorithms.predict(weights, jnp.asarray(xs)), dtype)
  weights = _to_numpy(weights, dtype)
  if not has_iterates:
    weights, predictions = weights[:, None], predictions[:, None]
  num_iterates = weights.shape[1]
  assert weights.shape == (3, num_iterates, N_PREFIX + 1, D_PREFIX)  # Iterates before prefixes.
  assert predictions.shape == (3, num_iterates, N_PREFIX)
  assert np.all(weights[:, :, 0] == 0) and np.all(predictions[:, :, 0] == 0)  # No points seen yet.
  # The predictions are the weights of the prefix before each query applied to it.
  from_weights = np.einsum("bktd,btd->bkt", weights[:, :, :-1], xs.astype(np.float64))
  np.testing.assert_allclose(
    predictions, from_weights, rtol=PREDICTION_RTOL[dtype], atol=PREDICTION_RTOL[dtype] * np.max(np.abs(from_weights))
  )
  for t in PREFIXES:
    w = _whole(_to_numpy(weights_fn(jnp.asarray(xs[:, :t]), jnp.asarray(ys[:, :t])), dtype))
    w = w if has_iterates else w[:, None]
    np.testing.assert_allclose(weights[:, :, t], w, rtol=RTOL[dtype] / 10, atol=RTOL[dtype] / 10)
    expected = np.einsum("bkd,bd->bk", w, xs[:, t].astype(np.float64))
    np.testing.assert_allclose(predictions[:, :, t], expected, rtol=RTOL[dtype] / 10, atol=RTOL[dtype] / 10)


def test_prefix_functions_are_finite_on_zero_padded_dimensions(dtype):
  # The curriculum zeroes trailing coordinates; rank-deficient S must not produce NaNs anywhere. Predictions are
  # the weights applied to queries, so finite weights make them finite too.
  xs, ys, _ = _prompts(15, 2, 9, 6, dtype)
  xs[:, :, 3:] = 0
  xs, ys = jnp.asarray(xs), jnp.asarray(ys)
  for weights in (
    algorithms.least_squares(xs, ys),
    algorithms.iterative_newton(xs, ys, 23),
    algorithms.gradient_descent(xs, ys, (1, 4096), 0.01),
    algorithms.online_gradient_descent(xs, ys),
  ):
    weights = _to_numpy(weights, dtype)
    assert np.all(np.isfinite(weights))
    assert np.all(weights[..., 3:] == 0)  # Zero coordinates stay exactly zero.


def test_steps_may_be_a_list_range_or_numpy_array():
  xs, ys, _ = _prompts(18, 2, 5, 3, np.float32)
  xs, ys = jnp.asarray(xs), jnp.asarray(ys)
  expected = np.asarray(algorithms.gradient_descent(xs, ys, (3, 1), 0.1))
  for steps in ([3, 1], np.array([3, 1]), range(3, 0, -2)):
    np.testing.assert_array_equal(np.asarray(algorithms.gradient_descent(xs, ys, steps, 0.1)), expected)
  np.testing.assert_array_equal(
    np.asarray(algorithms.gradient_descent(xs, ys, steps=[3, 1], learning_rate=0.1)), expected
  )


# ---------------------------------------------------------------------------------------------------------------
# Argument checks.

XS, YS = jnp.ones((2, 3, 4)), jnp.ones((2, 3))


@pytest.mark.parametrize(
  "call, argument",
  [
    (lambda: algorithms.iterative_newton(XS, YS, 3, alpha="l2"), "alpha"),
    (lambda: algorithms.iterative_newton(XS, YS, -1), "num_steps"),
    (lambda: algorithms.iterative_newton(XS, YS, 2.5), "num_steps"),
    (lambda: algorithms.gradient_descent(XS, YS, (1, 2), 0.1, gradient_scale="avg"), "gradient_scale"),
    (lambda: algorithms.gradient_descent(XS, YS, (), 0.1), "steps"),
    (lambda: algorithms.gradient_descent(XS, YS, [], 0.1), "steps"),
    (lambda: algorithms.gradient_descent(XS, YS, (1, -2), 0.1), "steps"),
    (lambda: algorithms.gradient_descent(XS, YS, jnp.asarray([1, 2]), 0.1), "steps"),  # Not static.
    (lambda: algorithms.gradient_descent(XS, YS, np.asarray([1.0, 2.0]), 0.1), "steps"),
    (lambda: algorithms.gradient_descent(XS, YS, 3, 0.1), "steps"),
    (lambda: algorithms.gradient_descent(XS, YS, (3,), 0.1, "mean", jnp.eye(3)), "preconditioner"),
    (lambda: algorithms.gradient_descent(XS, YS, (3,), 0.1, "mean", jnp.ones((3, 4, 4))), "preconditioner"),
    (lambda: algorithms.least_squares(XS, YS, ridge=-1.0), "ridge"),
    (lambda: algorithms.iterative_newton(XS, YS, 3, ridge=-0.5), "ridge"),
    (lambda: algorithms.gradient_descent(XS, YS, (3,), 0.1, ridge=float("inf")), "ridge"),
    (lambda: algorithms.conjugate_gradient(XS, YS, -1), "num_steps"),
    (lambda: algorithms.bfgs(XS, YS, 1.5), "num_steps"),
    (lambda: algorithms.lbfgs(XS, YS, 3, 0), "memory"),
  ],
)
def test_bad_arguments_raise_value_error_naming_them(call, argument):
  with pytest.raises(ValueError, match=argument):
    call()


# ---------------------------------------------------------------------------------------------------------------
# Conjugate gradient, BFGS and L-BFGS against float64 references written out here, one prompt at a time.


def _np_step(s, b, g, p):
  """The exact line search of `algorithms._line_search`, with its stop rules, in float64."""
  eps = 100 * np.finfo(np.float64).eps
  sp, curvature = s @ p, p @ s @ p
  live = curvature > eps * np.linalg.norm(s) * (p @ p) and g @ g > eps**2 * (b @ b)
  return (-(g @ p) / curvature if live else 0.0), sp


def _np_cg(s, b, num_steps):
  w, r, p, basis, out = np.zeros_like(b), b.copy(), b.copy(), [b / np.linalg.norm(b)], [np.zeros_like(b)]
  for _ in range(num_steps):
    alpha, sp = _np_step(s, b, -r, p)
    w, r_new = w + alpha * p, r - alpha * sp
    for _ in range(2):
      r_new = r_new - sum((q @ r_new) * q for q in basis)
    p = r_new + (r_new @ r_new) / (r @ r) * p if r @ r > 0 else r_new
    r = r_new
    basis.append(r / np.linalg.norm(r) if r @ r > (100 * np.finfo(np.float64).eps) ** 2 * (b @ b) else 0 * r)
    out.append(w)
  return np.stack(out)


def _np_bfgs(s, b, num_steps):
  d = len(b)
  w, g, h, out = np.zeros(d), -b, np.eye(d), [np.zeros(d)]
  for _ in range(num_steps):
    p = -h @ g
    alpha, sp = _np_step(s, b, g, p)
    step, y = alpha * p, alpha * sp
    if y @ step > 0:
      rho = 1 / (y @ step)
      h = (np.eye(d) - rho * np.outer(step, y)) @ h @ (np.eye(d) - rho * np.outer(y, step)) + rho * np.outer(step, step)
    w, g = w + step, g + y
    out.append(w)
  return np.stack(out)


def _np_lbfgs(s, b, num_steps, memory):
  w, g, pairs, gamma, out = np.zeros_like(b), -b, [], 1.0, [np.zeros_like(b)]
  for _ in range(num_steps):
    q, alphas = g.copy(), []
    for step, y in reversed(pairs):
      alphas.append((step @ q) / (y @ step))
      q = q - alphas[-1] * y
    r = gamma * q
    for (step, y), alpha in zip(pairs, reversed(alphas)):
      r = r + (alpha - (y @ r) / (y @ step)) * step
    alpha, sp = _np_step(s, b, g, -r)
    step, y = -alpha * r, alpha * sp
    if y @ step > 0:
      pairs, gamma = (pairs + [(step, y)])[-memory:], (y @ step) / (y @ y)
    w, g = w + step, g + y
    out.append(w)
  return np.stack(out)


QN_STEPS, QN_MEMORY = 25, 4
QN_METHODS = {
  "cg": (lambda x, y: algorithms.conjugate_gradient(x, y, QN_STEPS), lambda s, b: _np_cg(s, b, QN_STEPS)),
  "bfgs": (lambda x, y: algorithms.bfgs(x, y, QN_STEPS), lambda s, b: _np_bfgs(s, b, QN_STEPS)),
  "lbfgs": (
    lambda x, y: algorithms.lbfgs(x, y, QN_STEPS, QN_MEMORY),
    lambda s, b: _np_lbfgs(s, b, QN_STEPS, QN_MEMORY),
  ),
}
# (n, d, kappa of Sigma): prefixes of these prompts include rank-deficient ones (t < d) in every case.
QN_CASES = {"isotropic": (30, 8, 1.0), "rank_deficient": (5, 8, 1.0), "kappa100": (41, 20, 100.0)}


@pytest.mark.parametrize("case", QN_CASES)
@pytest.mark.parametrize("method", QN_METHODS)
def test_cg_bfgs_lbfgs_match_float64_references(method, case):
  """1e-4 relative on every prefix and step, wherever the iterate is determined by the problem: L-BFGS with a
  short memory (like CG without reorthogonalisation) amplifies rounding by ~30x a step on kappa = 100 prefixes
  after ~d/2 steps, where two float64 runs of the same reference then disagree too; those steps are skipped,
  judged by the reference itself (run again on b perturbed by 1e-13, it must move by < 1e-8)."""
  n, d, kappa = QN_CASES[case]
  jax_fn, reference = QN_METHODS[method]
  with jax.enable_x64(True):
    xs, ys, _ = _prompts(19, 3, n, d, np.float64, kappa=kappa)
    ws = np.asarray(jax_fn(jnp.asarray(xs), jnp.asarray(ys)))
  assert ws.shape == (3, QN_STEPS + 1, n + 1, d)
  compared = 0
  for t in sorted({1, min(3, n), d // 2, n}):
    for i in range(3):
      x, y = xs[i, :t], ys[i, :t]
      s, b = x.T @ x, x.T @ y
      expected = reference(s, b)
      perturbed = reference(s, b * (1 + 1e-13))
      scale = np.maximum(np.linalg.norm(expected, axis=-1), 1e-300)
      determined = np.linalg.norm(perturbed - expected, axis=-1) / scale < 1e-8
      assert determined[: d // 2].all()  # The sensitive steps, if any, come late.
      error = np.linalg.norm(ws[i, :, t] - expected, axis=-1) / scale
      assert np.all(error[determined] < 1e-4), (t, i, error)
      compared += determined.sum()
  assert compared > 0.8 * 3 * 4 * (QN_STEPS + 1) if method != "lbfgs" or case != "kappa100" else compared > 0


def test_cg_bfgs_and_lbfgs_are_one_algorithm_on_a_quadratic():
  """With exact line search from w = 0 and H_0 = I they minimise f over the same Krylov spaces: equal iterates
  (here in float64 on a well-conditioned prompt, before rounding matters), converging to least squares in d
  steps."""
  with jax.enable_x64(True):
    xs, ys, _ = _prompts(20, 2, 30, 6, np.float64, kappa=10.0)
    xs, ys = jnp.asarray(xs), jnp.asarray(ys)
    cg, bfgs, lbfgs = (
      np.asarray(f(xs, ys, 6))
      for f in (algorithms.conjugate_gradient, algorithms.bfgs, lambda x, y, k: algorithms.lbfgs(x, y, k, 2))
    )
    ols = np.asarray(algorithms.least_squares(xs, ys))
  np.testing.assert_allclose(bfgs, cg, rtol=1e-8, atol=1e-10)
  np.testing.assert_allclose(lbfgs, cg, rtol=1e-8, atol=1e-10)
  np.testing.assert_allclose(cg[:, -1, -1], ols[:, -1], rtol=1e-8)


def test_cg_bfgs_lbfgs_float32_and_ridge():
  xs, ys, _ = _prompts(21, 3, 12, 5, np.float32)
  for fn in (
    lambda x, y, **k: algorithms.conjugate_gradient(x, y, 8, **k),
    lambda x, y, **k: algorithms.bfgs(x, y, 8, **k),
    lambda x, y, **k: algorithms.lbfgs(x, y, 8, 3, **k),
  ):
    ws = fn(jnp.asarray(xs), jnp.asarray(ys))
    assert ws.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(ws)))
    np.testing.assert_allclose(np.asarray(ws)[:, -1, -1], _lstsq(xs, ys), rtol=1e-3, atol=1e-4)
    ridge = np.asarray(fn(jnp.asarray(xs), jnp.asarray(ys), ridge=0.5))[:, -1, -1]
    np.testing.assert_allclose(
      ridge, np.asarray(algorithms.least_squares(jnp.asarray(xs), jnp.asarray(ys), 0.5))[:, -1], rtol=1e-3, atol=1e-4
    )


@pytest.mark.parametrize("name", ["newton", "gd"])
def test_ridge_iterations_converge_to_ridge_least_squares(name):
  xs, ys, _ = _prompts(22, 3, 6, 8, np.float64, noise=0.1)  # Underdetermined: the ridge decides the solution.
  with jax.enable_x64(True):
    xs, ys = jnp.asarray(xs), jnp.asarray(ys)
    if name == "newton":
      w = algorithms.iterative_newton(xs, ys, 40, ridge=0.3)[:, -1]
    else:
      w = algorithms.gradient_descent(xs, ys, (20000,), 0.01, ridge=0.3)[:, 0]
    np.testing.assert_allclose(np.asarray(w), np.asarray(algorithms.least_squares(xs, ys, 0.3)), rtol=1e-8, atol=1e-10)


def test_online_gradient_descent_fixed_step_from_a_start():
  xs, ys, _ = _prompts(23, 2, 7, 3, np.float64)
  w0 = np.random.default_rng(0).uniform(size=(2, 3))
  with jax.enable_x64(True):
    ws = np.asarray(algorithms.online_gradient_descent(jnp.asarray(xs), jnp.asarray(ys), 0.05, jnp.asarray(w0)))
  for i in range(2):
    w = w0[i]
    for t in range(7):
      np.testing.assert_allclose(ws[i, t], w, rtol=1e-12)
      w = w + 0.05 * (ys[i, t] - xs[i, t] @ w) * xs[i, t]  # Fu et al.'s code's update.
    np.testing.assert_allclose(ws[i, 7], w, rtol=1e-12)


def test_newton_frobenius_2_alpha_recursion_and_its_rank_one_edge():
  xs, ys, _ = _prompts(24, 2, 12, 4, np.float64)
  with jax.enable_x64(True):
    ws = np.asarray(algorithms.iterative_newton(jnp.asarray(xs), jnp.asarray(ys), 3, alpha="frobenius_2"))
  for x, y, w in zip(xs, ys, ws[:, :, -1]):
    s = x.T @ x
    m = 2 * s / np.linalg.norm(s @ s.T)
    for k in range(4):
      np.testing.assert_allclose(w[k], m @ x.T @ y, rtol=1e-10)
      m = 2 * m - m @ s @ m
  # One point: S = x x^T has rank 1, alpha = 2 / lambda^2 sits on the edge, and M_1 = 0 exactly.
  np.testing.assert_allclose(ws[:, 1:, 1], 0.0, atol=1e-12)
