"""Fu et al.'s comparisons between predictors, as pure array functions batched over predictors and prompts.

A "predictor" is anything that predicts every y_t of a prompt from the points before it: a layer's read-out,
or an algorithm at some number of steps. Predictions are stacked as [C, B, N] (C predictors, B prompts,
N positions); the prediction at position t uses the t points before it.
"""

import jax
import jax.numpy as jnp
import numpy as np


def squared_errors(preds_CxBxN: jax.Array, ys_BxN: jax.Array, n_dims: int) -> jax.Array:
  """(prediction - y)^2 / d per predictor, prompt and position: [C, B, N] (Garg et al.'s error/d)."""
  return jnp.square(preds_CxBxN - ys_BxN[None]) / n_dims


def bootstrap_means(values_CxBxN: np.ndarray, key: jax.Array, num_samples: int, confidence: float) -> dict:
  """Mean over prompts (axis 1) and its bootstrap interval: {"mean", "low", "high"}, each [C, N].

  Every bootstrap sample redraws the B prompts with replacement (Garg et al.: 1000 samples, 90%); all the
  samples are one matrix product of resampling counts with the values.
  """
  values_CxBxN = jnp.asarray(values_CxBxN)
  b = values_CxBxN.shape[1]
  draws_SxB = jax.random.randint(key, (num_samples, b), 0, b)
  counts_SxB = jax.vmap(lambda d: jnp.bincount(d, length=b))(draws_SxB).astype(values_CxBxN.dtype)
  means_SxCxN = jnp.einsum("sb,cbn->scn", counts_SxB, values_CxBxN) / b
  tail = (1 - confidence) / 2
  low_CxN, high_CxN = jnp.quantile(means_SxCxN, jnp.asarray([tail, 1 - tail]), axis=0)
  return {"mean": np.asarray(values_CxBxN.mean(axis=1)), "low": np.asarray(low_CxN), "high": np.asarray(high_CxN)}


def _unit(v, axis):
  norm = jnp.linalg.norm(v, axis=axis, keepdims=True)
  return v / jnp.where(norm > 0, norm, 1.0)


def similarity_of_errors(preds_AxBxN: jax.Array, preds_KxBxN: jax.Array, ys_BxN: jax.Array,
                         include_first: bool) -> jax.Array:
  """SimE: cosine similarity of two predictors' residual vectors (prediction - y over positions), per prompt,
  averaged over prompts: [A, K].

  Args:
    include_first: count position 0, where no point has been seen (Fu et al.'s code: yes; their paper's
      footnote: no). Algorithms predict 0 there, so including it adds a shared -y_0 to every residual.
  """
  first = 0 if include_first else 1
  residual_AxBxN = _unit((preds_AxBxN - ys_BxN[None])[..., first:], axis=-1)
  residual_KxBxN = _unit((preds_KxBxN - ys_BxN[None])[..., first:], axis=-1)
  return jnp.einsum("abn,kbn->ak", residual_AxBxN, residual_KxBxN) / ys_BxN.shape[0]


def induced_weights(queries_BxNxQxD: jax.Array, preds_CxBxNxQ: jax.Array) -> jax.Array:
  """Least-squares weights fit to predictions on fresh queries, per predictor, prompt and prefix: [C, B, N, D].

  Fu et al.'s eq. 7: w~ = (X~^T X~)^-1 X~^T y~ over the Q queries of a prefix. Q >= D queries in general
  position make it exact for linear predictors (the algorithms) and the best linear fit for the model.
  """
  gram_BxNxDxD = jnp.einsum("bnqi,bnqj->bnij", queries_BxNxQxD, queries_BxNxQxD)
  moments_CxBxNxD = jnp.einsum("bnqi,cbnq->cbni", queries_BxNxQxD, preds_CxBxNxQ)
  return jnp.linalg.solve(gram_BxNxDxD[None], moments_CxBxNxD[..., None])[..., 0]


def similarity_of_weights(weights_AxBxNxD: jax.Array, weights_KxBxNxD: jax.Array) -> jax.Array:
  """SimW: cosine similarity of induced weights, averaged over prompts and the prefixes t >= 1: [A, K].

  The empty prefix is left out: every algorithm's estimate there is 0 and has no direction.
  """
  a_AxBxNxD = _unit(weights_AxBxNxD[:, :, 1:], axis=-1)
  k_KxBxNxD = _unit(weights_KxBxNxD[:, :, 1:], axis=-1)
  return jnp.einsum("abnd,kbnd->ak", a_AxBxNxD, k_KxBxNxD) / (a_AxBxNxD.shape[1] * a_AxBxNxD.shape[2])


def best_match(similarity_AxK: np.ndarray, steps_K) -> dict:
  """For each row (layer), the grid value with the highest similarity (Fu et al.'s Def. 3.4), and that value."""
  similarity_AxK = np.asarray(similarity_AxK)
  index_A = np.argmax(similarity_AxK, axis=1)
  return {"steps": [int(np.asarray(steps_K)[i]) for i in index_A],
          "similarity": similarity_AxK[np.arange(len(index_A)), index_A].tolist()}


def linear_fit(x, y) -> dict:
  """Least-squares line y = slope * x + intercept and its R^2; all None for fewer than two distinct x."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if len(np.unique(x)) < 2:
    return {"slope": None, "intercept": None, "r2": None}
  slope, intercept = np.polyfit(x, y, 1)
  residual = y - (slope * x + intercept)
  total = np.sum(np.square(y - y.mean()))
  r2 = 1.0 - np.sum(np.square(residual)) / total if total > 0 else 1.0
  return {"slope": float(slope), "intercept": float(intercept), "r2": float(r2)}
