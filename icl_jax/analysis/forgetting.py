"""The forgetting test of Fu et al. (Fig. 5, App. A.6): after n examples, is an early example still recalled?

Fu et al. give n = 20 examples at d = 20 and gaps g in {19, 15, 11, 7, 3}, and show that the LSTM and online GD
forget early examples while the Transformer does not. This project reads the test as: a prompt of n examples
whose query repeats example n - g (1-based; g = 0 is the last example seen, g = n - 1 the first), scored by the
squared error of the prediction against that example's own label, / d. A predictor that uses every example
(least squares interpolates them while n <= d) recalls each one; one that overwrites old examples with new ones
(online GD) recalls recent ones best. n is scaled to d (n = d) and every gap 0..n-1 is measured.

`forgetting_statistic` condenses the curve: per prompt, the mean error over the older half of the gaps minus
the mean over the recent half, over the zero predictor's error on the same targets; > 0 means older examples
are recalled worse. Interval: bootstrap over prompts.
"""

import jax.numpy as jnp
import numpy as np

from icl_jax.analysis import separability
from icl_jax.analysis import similarity

PAPER_EXAMPLES, PAPER_DIMS, PAPER_GAPS = 20, 20, (19, 15, 11, 7, 3)


def num_examples(n_dims: int, n_points: int) -> int | None:
  """n = 20 at d = 20, scaled to d (n = d); None when the prompts have no room for n examples and a query."""
  n = round(PAPER_EXAMPLES * n_dims / PAPER_DIMS)
  return n if 1 <= n < n_points else None


def prompts(xs_BxNxD, ys_BxN, n: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The test's prompts for every gap g = 0..n-1 of every prompt, [G * B, n + 1, D] and [G * B, n + 1] (gap-major):
  the prompt's first n examples, then as the query example n - g (index n - 1 - g), whose label is the target."""
  xs, ys = jnp.asarray(xs_BxNxD)[:, :n], jnp.asarray(ys_BxN)[:, :n]
  source_G = n - 1 - jnp.arange(n)
  query_xs = jnp.concatenate(
    [jnp.broadcast_to(xs[None], (n, *xs.shape)), xs[:, source_G].swapaxes(0, 1)[:, :, None]], axis=2
  )
  query_ys = jnp.concatenate([jnp.broadcast_to(ys[None], (n, *ys.shape)), ys[:, source_G].T[:, :, None]], axis=2)
  return query_xs.reshape(-1, n + 1, xs.shape[-1]), query_ys.reshape(-1, n + 1)


def errors(preds_GxB: np.ndarray, targets_GxB: np.ndarray, n_dims: int) -> np.ndarray:
  """Squared error / d of each gap's recall on each prompt: [G, B]."""
  return np.square(np.asarray(preds_GxB, np.float64) - np.asarray(targets_GxB, np.float64)) / n_dims


def forgetting_statistic(errors_GxB: np.ndarray, zero_GxB: np.ndarray, counts_SxB, confidence: float) -> dict:
  """(older half's mean error - recent half's) / the zero predictor's mean error, per prompt, with its bootstrap
  interval over prompts: {"value", "low", "high"}."""
  gaps = errors_GxB.shape[0]
  recent, older = slice(0, gaps // 2), slice(gaps - gaps // 2, gaps)
  scale = np.mean(zero_GxB)
  difference_B = (errors_GxB[older].mean(axis=0) - errors_GxB[recent].mean(axis=0)) / scale
  found = similarity.bootstrap_mean(difference_B, counts_SxB, confidence)
  return {"value": float(found["mean"]), "low": float(found["low"]), "high": float(found["high"])}


def curve(errors_GxB: np.ndarray, counts_SxB, confidence: float) -> dict:
  """Mean error / d per gap with its bootstrap interval: lists over g = 0..G-1."""
  return separability.bootstrap_mean(np.asarray(errors_GxB).T, counts_SxB, confidence)
