"""Tests of icl_jax.constructions: the explicit transformers reproduce algorithms' estimates in float32."""

import jax.numpy as jnp
import numpy as np
import pytest

from icl_jax.analysis import algorithms
from icl_jax.analysis import constructions

TOL = 1e-4
MAX_NEWTON_STEPS = 8


def _prompts(seed, b, n, d):
  """xs [b, n, d], ys = xs w and queries [b, d], all N(0, 1), float32."""
  rng = np.random.default_rng(seed)
  xs = rng.normal(size=(b, n, d))
  ys = np.einsum("bnd,bd->bn", xs, rng.normal(size=(b, d)))
  x_query = rng.normal(size=(b, d))
  return (jnp.asarray(a, jnp.float32) for a in (xs, ys, x_query))


def _assert_weights_close(w_BxD, w_ref_BxD):
  """Each prompt's estimate within TOL of the reference, relative to the reference's norm."""
  w_BxD, w_ref_BxD = np.asarray(w_BxD, np.float64), np.asarray(w_ref_BxD, np.float64)
  errors_B = np.linalg.norm(w_BxD - w_ref_BxD, axis=-1) / np.linalg.norm(w_ref_BxD, axis=-1)
  assert errors_B.max() < TOL, errors_B


def _assert_predictions_close(prediction_B, x_query_BxD, w_ref_BxD):
  """Predictions within TOL of x_query . w_ref, relative to |x_query| |w_ref| (a prediction may be near 0)."""
  x_query_BxD, w_ref_BxD = np.asarray(x_query_BxD, np.float64), np.asarray(w_ref_BxD, np.float64)
  expected_B = np.einsum("bd,bd->b", x_query_BxD, w_ref_BxD)
  scale_B = np.linalg.norm(x_query_BxD, axis=-1) * np.linalg.norm(w_ref_BxD, axis=-1)
  errors_B = np.abs(np.asarray(prediction_B, np.float64) - expected_B) / scale_B
  assert errors_B.max() < TOL, errors_B


# ---------------------------------------------------------------------------------------------------------------
# Iterative Newton (Fu et al. Theorem 5.1).


@pytest.mark.parametrize("seed,n,d", [(0, 10, 4), (1, 16, 5), (2, 20, 6)])
def test_newton_transformer_matches_iterative_newton(seed, n, d):
  xs, ys, x_query = _prompts(seed, 8, n, d)
  ws_BxKxD = algorithms.iterative_newton(xs, ys, MAX_NEWTON_STEPS, alpha="frobenius")[:, :, -1]
  for k in range(MAX_NEWTON_STEPS + 1):
    w_BxD, prediction_B = constructions.newton_transformer(xs, ys, x_query, k)
    _assert_weights_close(w_BxD, ws_BxKxD[:, k])
    _assert_predictions_close(prediction_B, x_query, ws_BxKxD[:, k])


@pytest.mark.parametrize("k", [0, 1, 5])
def test_newton_construction_shape(k):
  """k Newton steps take k + 3 blocks (Theorem 5.1: k + 8) of 2 heads on a stream of 4 d + 3 rows."""
  d, n = 5, 12
  layers = constructions.newton_construction(d, n, k, 0.1)
  assert len(layers) == k + 3
  for layer in layers:
    assert layer.query_HxAxR.shape[0] == layer.key_HxAxR.shape[0] == layer.value_HxRxR.shape[0] == 2
    assert layer.value_HxRxR.shape[1:] == (4 * d + 3, 4 * d + 3) == (constructions.newton_width(d),) * 2
  assert [layer.mlp_in_FxR.shape[0] for layer in layers] == [0] + [2 * d] * k + [0, 0]


def test_newton_layer_with_equal_value_matrices_computes_absolute_values():
  """Fu et al.'s V_2 = V_1 (papers.md §1.7) turns the Newton layer into 2 t_i + sum_l t_l |x_i . t_l|: the sign
  slip that the construction fixes with V_2 = -V_1."""
  n, d = 12, 4
  xs, ys, x_query = _prompts(3, 1, n, d)
  xs_NxD, ys_N = np.asarray(xs[0], np.float64), np.asarray(ys[0], np.float64)
  s_DxD = xs_NxD.T @ xs_NxD
  alpha = 1 / np.linalg.norm(s_DxD @ s_DxD)
  layers = constructions.newton_construction(d, n, 1, jnp.float32(alpha))
  values_HxRxR = layers[1].value_HxRxR
  paper_layers = [layers[0], layers[1]._replace(value_HxRxR=values_HxRxR.at[1].set(values_HxRxR[0]))] + layers[2:]
  h_RxT = constructions.newton_prompt(xs[0], ys[0], x_query[0])
  w_D, _ = constructions.newton_readout(constructions.transformer_forward(h_RxT, paper_layers))

  t_NxD = alpha * xs_NxD @ s_DxD  # Rows t_i = M_0 x_i.
  paper_t_NxD = 2 * t_NxD + np.abs(xs_NxD @ t_NxD.T) @ t_NxD
  _assert_weights_close(w_D[None], (paper_t_NxD.T @ ys_N)[None])
  newton_w_D = algorithms.iterative_newton(xs, ys, 1)[0, 1, -1]
  assert np.linalg.norm(w_D - newton_w_D) > 0.1 * np.linalg.norm(newton_w_D)


# ---------------------------------------------------------------------------------------------------------------
# Preconditioned gradient descent by linear self-attention (Ahn et al. Lemma 1).


def _lsa(xs, ys, x_query, preconditioners):
  z_BxExT = constructions.lsa_forward(
    constructions.lsa_prompt(xs, ys, x_query), *constructions.preconditioned_gd_lsa_weights(preconditioners)
  )
  return constructions.lsa_prediction(z_BxExT), z_BxExT


def _assert_residual_labels(z_BxExT, xs, ys, w_ref_BxD):
  """Lemma 1's invariant: the context points' labels have become the residuals y_i - w_L . x_i."""
  residuals_BxN = np.asarray(ys) - np.einsum("bnd,bd->bn", np.asarray(xs), np.asarray(w_ref_BxD))
  np.testing.assert_allclose(z_BxExT[:, -1, :-1], residuals_BxN, atol=TOL * np.abs(np.asarray(ys)).max())


def test_lsa_weights_are_ahn_sparse_form():
  a_DxD = jnp.arange(9.0).reshape(3, 3)
  (p_ExE,), (q_ExE,) = constructions.preconditioned_gd_lsa_weights([a_DxD])
  np.testing.assert_array_equal(p_ExE, np.diag([0.0, 0, 0, 1]))
  np.testing.assert_array_equal(q_ExE, np.pad(-np.asarray(a_DxD).T, ((0, 1), (0, 1))))


@pytest.mark.parametrize("num_layers", [1, 2, 3, 4])
def test_lsa_with_scaled_identity_is_gradient_descent(num_layers):
  n, d, learning_rate = 12, 5, 0.15
  xs, ys, x_query = _prompts(10 + num_layers, 8, n, d)
  prediction_B, z_BxExT = _lsa(xs, ys, x_query, [learning_rate * jnp.eye(d)] * num_layers)
  w_ref_BxD = algorithms.gradient_descent(xs, ys, (num_layers,), learning_rate, gradient_scale="mean")[:, 0, -1]
  _assert_predictions_close(prediction_B, x_query, w_ref_BxD)
  _assert_residual_labels(z_BxExT, xs, ys, w_ref_BxD)


@pytest.mark.parametrize("num_layers", [1, 2, 3, 4])
def test_lsa_with_one_preconditioner_is_preconditioned_gradient_descent(num_layers):
  n, d = 16, 4
  xs, ys, x_query = _prompts(20 + num_layers, 8, n, d)
  factor_DxD = np.random.default_rng(num_layers).normal(size=(d, d))
  a_DxD = jnp.asarray(0.05 * factor_DxD @ factor_DxD.T + 0.1 * np.eye(d), jnp.float32)
  prediction_B, z_BxExT = _lsa(xs, ys, x_query, [a_DxD] * num_layers)
  w_ref_BxD = algorithms.gradient_descent(xs, ys, (num_layers,), 1.0, "mean", a_DxD)[:, 0, -1]
  _assert_predictions_close(prediction_B, x_query, w_ref_BxD)
  _assert_residual_labels(z_BxExT, xs, ys, w_ref_BxD)


def test_lsa_with_a_preconditioner_per_layer():
  """Different, non-symmetric A_l: each layer steps w <- w - A_l grad R(w) (Q's transpose makes it A_l, not
  A_l^T)."""
  n, d, num_layers = 14, 5, 4
  xs, ys, x_query = _prompts(30, 8, n, d)
  rng = np.random.default_rng(31)
  preconditioners = [
    jnp.asarray(0.1 * np.eye(d) + 0.03 * rng.normal(size=(d, d)), jnp.float32) for _ in range(num_layers)
  ]
  prediction_B, z_BxExT = _lsa(xs, ys, x_query, preconditioners)

  xs64, ys64 = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
  w_BxD = np.zeros((xs.shape[0], d))
  for a_DxD in preconditioners:
    gradient_BxD = np.einsum("bnd,bn->bd", xs64, np.einsum("bnd,bd->bn", xs64, w_BxD) - ys64) / n
    w_BxD = w_BxD - gradient_BxD @ np.asarray(a_DxD, np.float64).T
  _assert_predictions_close(prediction_B, x_query, w_BxD)
  _assert_residual_labels(z_BxExT, xs, ys, w_BxD)
