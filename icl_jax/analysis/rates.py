"""Fu et al.'s Fig. 2 as a statistic: does the error fall faster than geometrically across the middle layers?

For a context length n, e_l is the mean error/d of layer l's read-out at position n (n points seen). Geometric
(linear) convergence keeps the log-ratio r_l = log e_{l+1} - log e_l constant; superlinear convergence makes it
fall (r_l -> -inf; for Newton's quadratic rate r_l = log e_l + c). The statistic is the least-squares slope of
r_l against l over the window's layers, averaged over the context lengths: below 0 for superlinear, 0 for
geometric, above 0 for sublinear (GD on a spread of curvatures, whose slowest modes dominate late). The same
statistic of GD with a fixed step, over as many consecutive steps as the window has layers, is the control.
Intervals: bootstrap over prompts (the evaluation's draws), the statistic recomputed in every sample.
"""

import numpy as np

from icl_jax.analysis import similarity

# Fu et al. Fig. 2: context lengths n in {5, 10, 15, 20, 22, 25, 30, 35} at d = 20; the claim is for n > d.
PAPER_LENGTHS, PAPER_DIMS = (5, 10, 15, 20, 22, 25, 30, 35), 20
# Fu et al. §4.2 on Fig. 2: "layers 3 to 8" of 12 converge superlinearly.
PAPER_WINDOW, PAPER_LAYERS = (3, 8), 12


def context_lengths(n_dims: int, n_points: int) -> list[int]:
  """The paper's lengths n > d, scaled by d / 20 and rounded, that exceed d and exist in prompts of n_points."""
  scaled = sorted({round(n * n_dims / PAPER_DIMS) for n in PAPER_LENGTHS if n > PAPER_DIMS})
  return [n for n in scaled if n_dims < n < n_points]


def figure_lengths(n_dims: int, n_points: int) -> list[int]:
  """All of the paper's lengths (n <= d too), scaled by d / 20 and rounded, from 1 to the prompt's last position:
  Fig. 2's curves."""
  return sorted({n for n in (round(m * n_dims / PAPER_DIMS) for m in PAPER_LENGTHS) if 1 <= n < n_points})


def window(num_layers: int) -> tuple[int, int]:
  """The paper's layers 3-8 of 12, scaled to the depth (first and last layer, 1-based)."""
  first = num_layers // 5 + 1  # The fit layers' start (probing.fit_layers): 3 of 12.
  return first, max(first, round(PAPER_WINDOW[1] * num_layers / PAPER_LAYERS))


def _trend(errors_SxLxT: np.ndarray) -> np.ndarray:
  """Slope of log(e_{l+1} / e_l) against l, averaged over the lengths: [S]."""
  ratios_SxRxT = np.diff(np.log(errors_SxLxT), axis=1)
  centred_R = np.arange(ratios_SxRxT.shape[1]) - (ratios_SxRxT.shape[1] - 1) / 2
  slopes_SxT = np.einsum("srt,r->st", ratios_SxRxT, centred_R) / np.sum(centred_R**2)
  return slopes_SxT.mean(axis=1)


def log_ratio_trend(squared_errors_LxBxT: np.ndarray, counts_SxB: np.ndarray, confidence: float) -> dict:
  """The statistic on per-prompt errors [L (layers or steps), B, T (context lengths)], with its interval.
  Needs at least three layers (two ratios); an error of exactly 0 (a predictor that is exact) has no ratio,
  and the statistic is then None."""
  errors_BxLxT = np.moveaxis(np.asarray(squared_errors_LxBxT, np.float64), 1, 0)
  mean_LxT = errors_BxLxT.mean(axis=0)
  if errors_BxLxT.shape[1] < 3 or np.any(mean_LxT <= 0):
    return {"value": None, "low": None, "high": None}
  samples_SxLxT = similarity.resampled_means(errors_BxLxT, counts_SxB)
  low, high = similarity.interval(_trend(np.maximum(samples_SxLxT, np.finfo(np.float64).tiny)), confidence)
  return {"value": float(_trend(mean_LxT[None])[0]), "low": float(low), "high": float(high)}


def analyse(
  layer_errors_LxBxN: np.ndarray,
  gd_errors_LxBxN: np.ndarray,
  n_dims: int,
  counts_SxB: np.ndarray,
  confidence: float,
) -> dict:
  """The statistic of the layers in the window and of GD over steps 1..(window size), at the scaled lengths.

  layer_errors_LxBxN: every layer's squared error / d per prompt and position; gd_errors_LxBxN: GD's after
  1, 2, ... steps (at least as many as the window has layers).
  """
  num_layers, _, n_points = np.asarray(layer_errors_LxBxN).shape
  first, last = window(num_layers)
  lengths = context_lengths(n_dims, n_points)
  size = last - first + 1
  if not lengths or size < 3:
    return {"layers": [first, last], "context_lengths": lengths, "model": None, "gd": None}
  return {
    "layers": [first, last],
    "context_lengths": lengths,
    "gd_steps": list(range(1, size + 1)),
    "model": log_ratio_trend(np.asarray(layer_errors_LxBxN)[first - 1 : last][..., lengths], counts_SxB, confidence),
    "gd": log_ratio_trend(np.asarray(gd_errors_LxBxN)[:size][..., lengths], counts_SxB, confidence),
  }
