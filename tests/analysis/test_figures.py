"""icl_jax/figures.py on synthetic results shaped like evaluate.py's results.json."""

import json
import warnings

import numpy as np
import pytest
from matplotlib import image
from matplotlib import patches

from icl_jax.analysis import evaluate
from icl_jax.analysis import figures
from icl_jax.analysis import similarity

PAPER_GRIDS = {"newton": list(range(1, 24)), "gd": [1] + list(range(50, 1301, 50)), "gd_log": [2**k for k in range(13)]}


def synthetic_results(num_layers, n_points, n_dims, fit_layers, grids, kappa=1.0, checkpoint_step=None, seed=0):
  """A results dict with evaluate.py's keys and shapes, and values that behave like a trained model's: errors
  fall with depth and context, each layer's similarity peaks at a step count that grows with depth."""
  rng = np.random.default_rng(seed)
  n_N = np.arange(n_points)
  # Noiseless least squares is exact from n = d on, up to float32 round-off.
  ols_N = np.where(n_N < n_dims, (n_dims - n_N) / n_dims, 1e-12)

  def towards_ols(rate_K):
    return ols_N + (1 - ols_N) * np.asarray(rate_K)[:, None]

  layers_L = np.arange(1, num_layers + 1)
  # Past n = d, more examples make each layer's step more effective (Fu et al.'s Fig. 2).
  layer_rate_LxN = np.minimum(0.55 ** (2 * layers_L[:, None]) * (n_dims / np.maximum(n_N, 1)) ** layers_L[:, None], 1)
  means = {
    "layers": ols_N + (1 - ols_N) * layer_rate_LxN,
    "zero": np.ones((1, n_points)),
    "newton": towards_ols(0.6 ** np.asarray(grids["newton"])),
    "gd": towards_ols(np.exp(-np.asarray(grids["gd"]) / 300)),
    "gd_log": towards_ols(np.exp(-np.asarray(grids["gd_log"]) / 300)),
    "least_squares": ols_N[None],
    "online_gd": towards_ols([0.5]),
  }
  means["model"] = means["layers"][-1:] * 0.9
  spread = {k: np.exp(0.1 * rng.uniform(size=m.shape)) for k, m in means.items()}
  error = {k: {"mean": m, "low": m / spread[k], "high": m * spread[k]} for k, m in means.items()}

  targets = {
    "newton": np.maximum(2.9 * layers_L - 5, 1),
    "gd": np.exp2(np.maximum(1.4 * layers_L - 3, 0)),
    "gd_log": np.exp2(np.maximum(1.4 * layers_L - 3, 0)),
  }
  sim_e = {
    k: 0.99
    - 0.02 * np.square(np.log2(np.asarray(grids[k])[None] / targets[k][:, None]))
    + rng.normal(0, 0.003, (num_layers, len(grids[k])))
    for k in grids
  }
  sim_e = {k: np.clip(v, -1, 1) for k, v in sim_e.items()}
  sim_e["least_squares"] = np.clip(0.9 + 0.01 * layers_L[:, None], -1, 1)
  sim_e["online_gd"] = np.full((num_layers, 1), 0.8)
  # Fu et al.'s Fig. 9: SimW is near 0 for the first two layers.
  sim_w = {k: np.where(layers_L[:, None] <= 2, rng.normal(0, 0.05, v.shape), v - 0.02) for k, v in sim_e.items()}

  def with_interval(sim_AxK):
    """A bootstrap result around `sim_AxK`: 20 samples of noise 0.002."""
    samples_SxAxK = sim_AxK[None] + rng.normal(0, 0.002, (20,) + sim_AxK.shape)
    return {
      "mean": sim_AxK,
      "low": np.quantile(samples_SxAxK, 0.05, axis=0),
      "high": np.quantile(samples_SxAxK, 0.95, axis=0),
      "samples": samples_SxAxK,
    }

  best = {k: similarity.best_match(with_interval(sim_e[k]), grids[k]) for k in grids}
  best_w = {k: similarity.best_match(with_interval(sim_w[k]), grids[k]) for k in grids}
  interval = lambda b: {
    k: {f: v[f] for f in ("low", "high", "within_interval", "choice_fraction")} for k, v in b.items()
  }

  first, last = fit_layers
  fit_L = np.arange(first, last + 1)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # A one-layer fit is poorly conditioned, as it is in evaluate.py.
    newton = similarity.linear_fit(fit_L, np.asarray(best["newton"]["steps"])[fit_L - 1])
    gd_log = similarity.linear_fit(fit_L, np.log2(np.asarray(best["gd_log"]["steps"])[fit_L - 1]))
  results = {
    "settings": {
      "eval": {"gd_learning_rate": 0.01, "confidence": 0.9, "fit_layers": list(fit_layers)},
      "task": {"n_dims": n_dims, "n_points": n_points, "kappa": kappa, "spectrum": "two_level"},
      "model": {"num_layers": num_layers},
      "seed": 0,
      "checkpoint_step": checkpoint_step,
    },
    "layers": layers_L.tolist(),
    "context_lengths": n_N.tolist(),
    "grids": grids,
    "error_per_dim": error,
    "sim_e": sim_e,
    "sim_w": sim_w,
    "best_match": {k: v["steps"] for k, v in best.items()},
    "best_similarity": {k: v["similarity"] for k, v in best.items()},
    "best_match_interval": interval(best),
    "best_match_sim_w": {k: v["steps"] for k, v in best_w.items()},
    "best_similarity_sim_w": {k: v["similarity"] for k, v in best_w.items()},
    "best_match_sim_w_interval": interval(best_w),
    "fits": {
      "layers": list(fit_layers),
      "newton": {**newton, "steps_per_layer": newton["slope"]},
      "gd_log": {**gd_log, "doublings_per_layer": gd_log["slope"]},
    },
  }
  # What figures.py reads is results.json: plain lists and numbers.
  return json.loads(json.dumps(results, default=lambda a: np.asarray(a).tolist()))


CASES = {
  "paper": dict(num_layers=12, n_points=41, n_dims=20, fit_layers=(3, 9), grids=PAPER_GRIDS, checkpoint_step=500_000),
  "quick": dict(num_layers=4, n_points=11, n_dims=5, fit_layers=(1, 4), grids=PAPER_GRIDS, kappa=3.0),
  "one_layer": dict(
    num_layers=1, n_points=3, n_dims=2, fit_layers=(1, 1), grids={"newton": [1, 2, 3], "gd": [1], "gd_log": [1, 2]}
  ),
}
STEMS = ["error_vs_layer", "error_vs_context", "best_match"] + [
  f"{m}_{g}_heatmap" for m in ("sim_e", "sim_w") for g in ("newton", "gd", "gd_log")
]


@pytest.mark.parametrize("case", CASES)
def test_every_figure_is_written_as_png_and_pdf(case, tmp_path):
  paths = evaluate.write_figures(figures.makers(synthetic_results(**CASES[case])), figures.STYLE, tmp_path / "eval")

  assert sorted(p.name for p in paths) == sorted(f"{s}.{e}" for s in STEMS for e in ("png", "pdf"))
  for path in paths:
    assert path.parent == tmp_path / "eval" and path.stat().st_size > 0, path
    if path.suffix == ".pdf":
      assert path.read_bytes().startswith(b"%PDF"), path
    else:
      pixels_HxWxC = image.imread(path)
      assert 400 <= pixels_HxWxC.shape[0] <= 2500 and 800 <= pixels_HxWxC.shape[1] <= 2500, (path, pixels_HxWxC.shape)
      assert pixels_HxWxC.std() > 0.01, path  # Not blank.


def test_heatmap_boxes_each_layers_best_match():
  results = synthetic_results(**CASES["paper"])

  figure = figures.similarity_heatmap(results, "sim_e", "gd")

  ax = figure.axes[0]
  boxes = [p for p in ax.patches if isinstance(p, patches.Rectangle)]
  columns = sorted((round(b.get_y() + 0.5), round(b.get_x() + 0.5)) for b in boxes)
  grid = results["grids"]["gd"]
  assert columns == [(row, grid.index(step)) for row, step in enumerate(results["best_match"]["gd"])]


@pytest.mark.parametrize(
  "lengths, expected",
  [
    (range(41), [5, 10, 15, 20, 22, 25, 30, 35]),  # Fu et al.'s Fig. 2.
    (range(11), [1, 3, 5, 6, 8, 10]),
    (range(2), [1]),
  ],
)
def test_shown_context_lengths(lengths, expected):
  assert figures._shown_lengths(list(lengths)) == expected
