"""Fu et al.'s comparisons between predictors, as pure array functions batched over predictors and prompts.

A "predictor" is anything that predicts every y_t of a prompt from the points before it: a layer's read-out,
or an algorithm at some number of steps. Predictions are stacked as [C, B, N] (C predictors, B prompts,
N positions); the prediction at position t uses the t points before it. Similarities are computed per prompt
([A, K, B]) and averaged over prompts, each with a bootstrap interval over the prompts: every bootstrap sample
redraws the B prompts with replacement, the same draws for every quantity of one evaluation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from icl_jax.analysis.precision import highest_precision


@highest_precision
@jax.jit
def squared_errors(preds_CxBxN: jax.Array, ys_BxN: jax.Array, n_dims: int) -> jax.Array:
  """(prediction - y)^2 / d per predictor, prompt and position: [C, B, N] (Garg et al.'s error/d)."""
  return jnp.square(preds_CxBxN - ys_BxN[None]) / n_dims


def resample_counts(key: jax.Array, num_samples: int, num_prompts: int) -> np.ndarray:
  """How often each prompt is drawn in each bootstrap sample: [S, B], each row summing to B."""
  draws_SxB = jax.random.randint(key, (num_samples, num_prompts), 0, num_prompts)
  return np.asarray(jax.vmap(lambda d: jnp.bincount(d, length=num_prompts))(draws_SxB), np.float64)


def resampled_means(values_Bx___: np.ndarray, counts_SxB: np.ndarray) -> np.ndarray:
  """The mean over prompts (axis 0) in every bootstrap sample: [S, ...], in float64."""
  values = np.asarray(values_Bx___, np.float64)
  return np.tensordot(counts_SxB, values, axes=(1, 0)) / counts_SxB.shape[1]


def interval(samples_Sx___: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
  tail = (1 - confidence) / 2
  low, high = np.quantile(samples_Sx___, [tail, 1 - tail], axis=0)
  return low, high


def bootstrap_mean(values_Bx___: np.ndarray, counts_SxB: np.ndarray, confidence: float) -> dict:
  """Mean over prompts (axis 0) and its bootstrap interval: {"mean", "low", "high"}, each of the shape after
  axis 0 (Garg et al.: 1000 samples, 90%)."""
  values = np.asarray(values_Bx___, np.float64)
  low, high = interval(resampled_means(values, counts_SxB), confidence)
  return {"mean": values.mean(axis=0), "low": low, "high": high}


def bootstrap_means(values_CxBxN: np.ndarray, counts_SxB: np.ndarray, confidence: float) -> dict:
  """`bootstrap_mean` over prompts (axis 1) of every predictor and position: each statistic [C, N]."""
  return bootstrap_mean(np.moveaxis(np.asarray(values_CxBxN, np.float64), 1, 0), counts_SxB, confidence)


def _unit(v, axis):
  norm = jnp.linalg.norm(v, axis=axis, keepdims=True)
  return v / jnp.where(norm > 0, norm, 1.0)


@highest_precision
@functools.partial(jax.jit, static_argnames=("first",))
def error_cosines(preds_AxBxN: jax.Array, preds_KxBxN: jax.Array, ys_BxN: jax.Array, first: int) -> jax.Array:
  """Per prompt, the cosine similarity of two predictors' residual vectors (prediction - y over the positions
  from `first` on): [A, K, B]. Its mean over prompts is SimE. first = 0 counts position 0, where no point has
  been seen (Fu et al.'s code), 1 does not (their paper's footnote); algorithms predict 0 there, so including
  it adds a shared -y_0 to every residual."""
  residual_AxBxN = _unit((preds_AxBxN - ys_BxN[None])[..., first:], axis=-1)
  residual_KxBxN = _unit((preds_KxBxN - ys_BxN[None])[..., first:], axis=-1)
  return jnp.einsum("abn,kbn->akb", residual_AxBxN, residual_KxBxN)


@highest_precision
@jax.jit
def induced_weights(queries_BxNxQxD: jax.Array, preds_CxBxNxQ: jax.Array) -> jax.Array:
  """Least-squares weights fit to predictions on fresh queries, per predictor, prompt and prefix: [C, B, N, D].

  Fu et al.'s eq. 7: w~ = (X~^T X~)^-1 X~^T y~ over the Q queries of a prefix. Q >= D queries in general
  position make it exact for linear predictors (the algorithms) and the best linear fit for the model.
  """
  gram_BxNxDxD = jnp.einsum("bnqi,bnqj->bnij", queries_BxNxQxD, queries_BxNxQxD)
  moments_CxBxNxD = jnp.einsum("bnqi,cbnq->cbni", queries_BxNxQxD, preds_CxBxNxQ)
  return jnp.linalg.solve(gram_BxNxDxD[None], moments_CxBxNxD[..., None])[..., 0]


@highest_precision
@jax.jit
def weight_cosines(weights_AxBxNxD: jax.Array, weights_KxBxNxD: jax.Array) -> jax.Array:
  """Per prompt, the cosine similarity of induced weights averaged over the prefixes t >= 1: [A, K, B]. Its mean
  over prompts is SimW. The empty prefix is left out: every algorithm's estimate there is 0 and has no
  direction."""
  a_AxBxNxD = _unit(weights_AxBxNxD[:, :, 1:], axis=-1)
  k_KxBxNxD = _unit(weights_KxBxNxD[:, :, 1:], axis=-1)
  return jnp.einsum("abnd,kbnd->akb", a_AxBxNxD, k_KxBxNxD) / a_AxBxNxD.shape[2]


def bootstrap_similarity(cosines_AxKxB: np.ndarray, counts_SxB: np.ndarray, confidence: float) -> dict:
  """The similarity (mean over prompts) of every layer and setting, [A, K], with its bootstrap interval, and
  the bootstrap samples themselves [S, A, K] for `best_match`."""
  cosines_BxAxK = np.moveaxis(np.asarray(cosines_AxKxB, np.float64), -1, 0)
  samples_SxAxK = resampled_means(cosines_BxAxK, counts_SxB)
  low, high = interval(samples_SxAxK, confidence)
  return {"mean": cosines_BxAxK.mean(axis=0), "low": low, "high": high, "samples": samples_SxAxK}


def best_match(similarity: dict, steps_K) -> dict:
  """For each row (layer), the grid value with the highest similarity (Fu et al.'s Def. 3.4) and how sure that
  choice is, from `bootstrap_similarity`'s result:

    steps, similarity: the argmax of the mean and its value, per layer;
    low, high: that value's bootstrap interval;
    within_interval: the grid values whose mean similarity is at least `low` (indistinguishable from the
      argmax at this confidence), per layer;
    choice_fraction: [A, K], the fraction of bootstrap samples whose argmax is each grid value.

  Raises ValueError for a layer whose similarities are all NaN (nothing to choose from).
  """
  mean_AxK, steps_K = np.asarray(similarity["mean"]), np.asarray(steps_K)
  nan_rows = np.flatnonzero(np.all(np.isnan(mean_AxK), axis=1))
  if nan_rows.size:
    raise ValueError(f"best match of layer {nan_rows[0] + 1}: every similarity is NaN")
  index_A = np.nanargmax(mean_AxK, axis=1)
  rows = np.arange(len(index_A))
  low_A, high_A = np.asarray(similarity["low"])[rows, index_A], np.asarray(similarity["high"])[rows, index_A]
  samples_SxAxK = np.asarray(similarity["samples"])
  choices_SxA = np.argmax(np.where(np.isnan(samples_SxAxK), -np.inf, samples_SxAxK), axis=2)
  fraction_AxK = np.stack([np.bincount(choices_SxA[:, a], minlength=len(steps_K)) for a in rows]) / len(choices_SxA)
  return {
    "steps": [int(steps_K[i]) for i in index_A],
    "similarity": mean_AxK[rows, index_A].tolist(),
    "low": low_A.tolist(),
    "high": high_A.tolist(),
    "within_interval": [[int(v) for v in steps_K[mean_AxK[a] >= low_A[a]]] for a in rows],
    "choice_fraction": fraction_AxK.tolist(),
    "resampled_steps": steps_K[choices_SxA],
  }


def slope_interval(x, resampled_y_SxX, confidence: float) -> tuple[float, float] | tuple[None, None]:
  """The bootstrap interval of the least-squares slope of y against x, from resampled y [S, len(x)]."""
  x = np.asarray(x, np.float64)
  if len(np.unique(x)) < 2:
    return None, None
  centred_X = x - x.mean()
  slopes_S = np.asarray(resampled_y_SxX, np.float64) @ centred_X / np.sum(centred_X**2)
  low, high = interval(slopes_S, confidence)
  return float(low), float(high)


def linear_fit(x, y) -> dict:
  """Least-squares line y = slope * x + intercept and its R^2; all None for fewer than two distinct x. A flat
  y (every value equal) has slope exactly 0, R^2 1 and "flat" True."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if len(np.unique(x)) < 2:
    return {"slope": None, "intercept": None, "r2": None, "flat": None}
  if np.all(y == y[0]):
    return {"slope": 0.0, "intercept": float(y[0]), "r2": 1.0, "flat": True}
  slope, intercept = np.polyfit(x, y, 1)
  residual = y - (slope * x + intercept)
  total = np.sum(np.square(y - y.mean()))
  r2 = 1.0 - np.sum(np.square(residual)) / total
  return {"slope": float(slope), "intercept": float(intercept), "r2": float(r2), "flat": False}
