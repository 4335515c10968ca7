"""Fu et al.'s Fig. 27: is each layer's read-out a linear function of the query, and do its induced weights lie
in the span of the examples seen?

Both statistics take the SimW inputs: queries per prefix [B, N, Q, D], the read-outs' predictions for them
[L, B, N, Q] and the induced weights fit to those predictions [L, B, N, D] (`similarity.induced_weights`).

- Linearity: the mean squared residual of the induced-weight fit, divided by E[y^2] of the prompts, so that it
  compares across d and noise (0 for a predictor linear in the query).
- Span: for prefixes of t < d examples (where the span is a proper subspace), the fraction of the induced
  weights' squared norm outside span{x_1, ..., x_t} (0 for any algorithm started at w = 0 whose updates are
  combinations of the x_i: GD, Newton, least squares' minimum-norm solution).
"""

import jax
import jax.numpy as jnp
import numpy as np

from icl_jax.analysis.precision import highest_precision


def fit_residual(queries_BxNxQxD, preds_LxBxNxQ, weights_LxBxNxD, y_power: float) -> np.ndarray:
  """Per layer, the mean squared residual of the linear fit over the queries of the prefixes t >= 1, over
  `y_power` (E[y^2]): [L]."""
  fitted_LxBxNxQ = np.einsum("bnqd,lbnd->lbnq", np.asarray(queries_BxNxQxD), np.asarray(weights_LxBxNxD))
  residual_LxBxNxQ = np.square(np.asarray(preds_LxBxNxQ, np.float64) - fitted_LxBxNxQ)[:, :, 1:]
  return residual_LxBxNxQ.mean(axis=(1, 2, 3)) / y_power


@highest_precision
@jax.jit
def _outside_span(xs_BxNxD, weights_LxBxTxD) -> jax.Array:
  """|(I - P_t) w|^2 / |w|^2 for the prefixes t = 1..T of each prompt and layer, P_t the projection onto
  span{x_1..x_t}: [L, B, T]."""
  n_points, t_count = xs_BxNxD.shape[1], weights_LxBxTxD.shape[2]
  mask_TxN = (jnp.arange(n_points)[None, :] < jnp.arange(1, t_count + 1)[:, None]).astype(xs_BxNxD.dtype)
  rows_BxTxNxD = xs_BxNxD[:, None] * mask_TxN[None, :, :, None]
  # pinv(X_t) X_t projects onto the row space of X_t (the zeroed rows add nothing).
  projector_BxTxDxD = jnp.linalg.pinv(rows_BxTxNxD) @ rows_BxTxNxD
  inside_LxBxTxD = jnp.einsum("btij,lbtj->lbti", projector_BxTxDxD, weights_LxBxTxD)
  norm_LxBxT = jnp.sum(jnp.square(weights_LxBxTxD), axis=-1)
  outside_LxBxT = jnp.sum(jnp.square(weights_LxBxTxD - inside_LxBxTxD), axis=-1)
  return outside_LxBxT / jnp.where(norm_LxBxT > 0, norm_LxBxT, 1.0)


def span_residual(xs_BxNxD, weights_LxBxNxD) -> np.ndarray | None:
  """Per layer, the mean over prompts and the prefixes t = 1..min(d, N) - 1 of the induced weights' squared-norm
  fraction outside span{x_1..x_t}: [L]; None when no prefix has fewer than d examples. weights_LxBxNxD[:, :, t]
  are the weights after t examples (those predicting position t)."""
  n_dims, n_points = np.shape(xs_BxNxD)[2], np.shape(xs_BxNxD)[1]
  last = min(n_dims, n_points) - 1
  if last < 1:
    return None
  weights = jnp.asarray(np.asarray(weights_LxBxNxD)[:, :, 1 : last + 1], jnp.float32)
  return np.asarray(_outside_span(jnp.asarray(xs_BxNxD, jnp.float32), weights), np.float64).mean(axis=(1, 2))
