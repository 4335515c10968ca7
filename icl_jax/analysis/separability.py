"""Where a Newton-versus-GD comparison has power: how far apart the two algorithm families are at the model's
best matches, layer by layer, and the model's paired preference between them.

This diagnostic is this project's; it is in no paper or released code. At a layer whose best-matching Newton
step k* and GD step j* give almost the same predictor, no model can be much closer to one than to the other:
a model equal to Newton(k*) would have SimE 1 with it and 1 - s with GD(j*), where s = 1 - SimE(Newton(k*),
GD(j*)) is the families' *separation* (computed from the algorithms alone). A layer is *separable* when the
lower end of the separation's interval exceeds the model's own sampling noise there (the half-width of the
bootstrap interval of its best SimE with either family): only then can the model's preference be told from
noise. The model's preference is paired: per prompt, cos(layer, Newton(k*)) - cos(layer, GD(j*)), averaged
over prompts with a bootstrap interval from the evaluation's own draws.
"""

import numpy as np

from icl_jax.analysis import similarity

NEWTON = "newton"
GD_GRIDS = ("gd", "gd_log")


def bootstrap_mean(values_Bx___: np.ndarray, counts_SxB: np.ndarray, confidence: float) -> dict:
  """`similarity.bootstrap_mean` as plain lists (floats for one value per prompt), as results.json holds it."""
  return {k: np.asarray(v).tolist() for k, v in similarity.bootstrap_mean(values_Bx___, counts_SxB, confidence).items()}


def unit_residuals(preds_Bx_N: np.ndarray, ys_BxN: np.ndarray, first: int) -> np.ndarray:
  """(prediction - y) over the positions from `first` on, scaled to unit length per prompt (0 stays 0)."""
  residual = (np.asarray(preds_Bx_N, np.float64) - np.asarray(ys_BxN, np.float64))[..., first:]
  norm = np.linalg.norm(residual, axis=-1, keepdims=True)
  return residual / np.where(norm > 0, norm, 1.0)


def best_gd(sim_e_mean: dict) -> tuple[np.ndarray, np.ndarray]:
  """Per layer, the GD grid (index into GD_GRIDS) and setting with the highest mean SimE over both grids."""
  stacked = [np.asarray(sim_e_mean[g]) for g in GD_GRIDS]  # Each [L, K_g].
  best_L = np.stack([s.max(axis=1) for s in stacked])  # [G, L]
  grid_L = np.argmax(best_L, axis=0)
  setting_L = np.asarray([np.argmax(stacked[g][layer]) for layer, g in enumerate(grid_L)])
  return grid_L, setting_L


def analyse(
  cosines: dict, sim_e: dict, algos: dict, ys_BxN: np.ndarray, first: int, steps: dict, counts_SxB, confidence
) -> dict:
  """Per layer: the best Newton step and best GD setting (both grids), the families' separation with its
  interval, the model's noise, whether the layer is separable, and the model's paired preference.

  cosines: per algorithm the per-prompt error cosines [L, K, B] of each layer with each setting; sim_e: their
  bootstrap summaries (`similarity.bootstrap_similarity`); algos: predictions [K, B, N]; steps: each grid's
  step counts.
  """
  num_layers = np.asarray(sim_e[NEWTON]["mean"]).shape[0]
  layers = np.arange(num_layers)
  newton_L = np.argmax(np.asarray(sim_e[NEWTON]["mean"]), axis=1)
  grid_L, setting_L = best_gd({g: sim_e[g]["mean"] for g in GD_GRIDS})
  gd = [(GD_GRIDS[g], k) for g, k in zip(grid_L, setting_L)]  # Per layer: the best GD grid and its setting.
  newton_cos_LxB = np.asarray(cosines[NEWTON])[layers, newton_L]
  gd_cos_LxB = np.stack([np.asarray(cosines[g])[layer, k] for layer, (g, k) in enumerate(gd)])
  newton_unit_LxBxN = unit_residuals(np.asarray(algos[NEWTON])[newton_L], ys_BxN, first)
  gd_unit_LxBxN = unit_residuals(np.stack([np.asarray(algos[g])[k] for g, k in gd]), ys_BxN, first)
  separation_BxL = (1.0 - np.einsum("lbn,lbn->lb", newton_unit_LxBxN, gd_unit_LxBxN)).T
  separation = bootstrap_mean(separation_BxL, counts_SxB, confidence)
  half_width = lambda s, layer, k: (np.asarray(s["high"])[layer, k] - np.asarray(s["low"])[layer, k]) / 2
  noise_L = np.asarray(
    [
      max(half_width(sim_e[NEWTON], layer, newton_L[layer]), half_width(sim_e[g], layer, k))
      for layer, (g, k) in enumerate(gd)
    ]
  )
  separable_L = np.asarray(separation["low"]) > noise_L
  difference_BxL = (newton_cos_LxB - gd_cos_LxB).T
  chosen = np.flatnonzero(separable_L)
  return {
    "criterion": "separable: the separation's interval lies above the model's noise (the larger half-width of "
    "its best SimE intervals with Newton and GD at that layer)",
    "newton_steps": [int(steps[NEWTON][k]) for k in newton_L],
    "gd_grid": [g for g, _ in gd],
    "gd_steps": [int(steps[g][k]) for g, k in gd],
    "separation": separation,
    "noise": noise_L.tolist(),
    "separable": separable_L.tolist(),
    "separable_layers": (chosen + 1).tolist(),
    "newton_minus_gd": bootstrap_mean(difference_BxL, counts_SxB, confidence),
    # The model's preference averaged over the separable layers, per prompt, then over prompts.
    "newton_minus_gd_separable": (
      bootstrap_mean(difference_BxL[:, chosen].mean(axis=1), counts_SxB, confidence) if chosen.size else None
    ),
  }
