"""The evaluator: similarity metrics, probes, best matches, and the whole `--mode=eval` on a trained tiny run."""

import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import linreg
from configs import linreg_ill_conditioned
from icl_jax import checkpointing
from icl_jax import data
from icl_jax import models
from icl_jax import train
from icl_jax.analysis import probes
from icl_jax.analysis import probing
from icl_jax.analysis import similarity
from icl_jax.runtime import config_files
from icl_jax.runtime import errors
from tests import helpers
from tests import tiny_config


def _prompts(b=64, n=12, d=4, seed=0):
  xs = jax.random.normal(jax.random.key(seed), (b, n, d))
  ws = jax.random.normal(jax.random.key(seed + 1), (b, d))
  return xs, jnp.einsum("bnd,bd->bn", xs, ws)


def test_sim_e_is_one_for_itself_and_minus_one_for_the_mirror():
  _, ys = _prompts()
  preds = ys[None] + jax.random.normal(jax.random.key(5), (1,) + ys.shape)
  mirror = 2 * ys[None] - preds  # Residual of opposite sign.
  cosines = similarity.error_cosines(preds, jnp.concatenate([preds, mirror]), ys, first=0)
  assert cosines.shape == (1, 2, ys.shape[0])  # Per prompt.
  np.testing.assert_allclose(cosines.mean(-1), [[1.0, -1.0]], atol=1e-6)


def test_sim_e_position_zero_is_counted_only_when_asked():
  _, ys = _prompts()
  a = ys[None] + 0.0
  a = a.at[:, :, 0].set(ys[:, 0] + 1.0)  # Errs only at position 0.
  b = jnp.zeros_like(a).at[:, :, 0].set(ys[:, 0] + 1.0) + ys[None]
  b = b.at[:, :, 1:].add(1.0)  # Errs everywhere after position 0 too.
  with_first = similarity.error_cosines(a, b, ys, first=0).mean(-1)
  without_first = similarity.error_cosines(a, b, ys, first=1).mean(-1)
  assert 0 < float(with_first[0, 0]) < 1 and float(without_first[0, 0]) == 0.0


def test_induced_weights_recover_a_linear_predictor_exactly():
  b, n, q, d = 3, 5, 12, 4
  queries = jax.random.normal(jax.random.key(0), (b, n, q, d))
  weights = jax.random.normal(jax.random.key(1), (2, b, n, d))
  preds = jnp.einsum("bnqd,cbnd->cbnq", queries, weights)
  np.testing.assert_allclose(similarity.induced_weights(queries, preds), weights, rtol=1e-4, atol=1e-5)
  cosines = similarity.weight_cosines(weights[:1], jnp.concatenate([weights[:1], -weights[:1]]))
  assert cosines.shape == (1, 2, b)
  np.testing.assert_allclose(cosines.mean(-1), [[1.0, -1.0]], atol=1e-6)


def test_bootstrap_interval_brackets_the_mean():
  values = jax.random.exponential(jax.random.key(0), (2, 500, 3))
  out = similarity.bootstrap_means(values, similarity.resample_counts(jax.random.key(1), 400, 500), confidence=0.9)
  np.testing.assert_allclose(out["mean"], np.asarray(values).mean(1), rtol=1e-6)
  assert np.all(out["low"] < out["mean"]) and np.all(out["mean"] < out["high"])
  standard_error = np.asarray(values).std(1) / np.sqrt(500)  # A 90% interval is about +-1.645 standard errors.
  np.testing.assert_allclose(out["high"] - out["low"], 2 * 1.645 * standard_error, rtol=0.25)
  constant = similarity.bootstrap_means(
    jnp.ones((1, 50, 2)), similarity.resample_counts(jax.random.key(1), 100, 50), 0.9
  )
  np.testing.assert_allclose(constant["low"], constant["high"])


def test_best_match_intervals_and_fits():
  # Layer 1: step 50 clearly best; layer 2: 100 and 1 within 0.01 of each other, inside the interval.
  cosines_AxKxB = np.stack([np.asarray([[0.1, 0.9, 0.3], [0.795, 0.2, 0.8]])] * 40, -1)
  cosines_AxKxB = cosines_AxKxB + np.random.default_rng(0).normal(0, 0.05, cosines_AxKxB.shape)
  sim = similarity.bootstrap_similarity(cosines_AxKxB, similarity.resample_counts(jax.random.key(0), 500, 40), 0.9)
  best = similarity.best_match(sim, [1, 50, 100])
  assert best["steps"][0] == 50 and best["within_interval"][0] == [50]
  assert set(best["within_interval"][1]) == {1, 100} and best["low"][1] < best["similarity"][1] < best["high"][1]
  fraction = np.asarray(best["choice_fraction"])
  np.testing.assert_allclose(fraction.sum(1), 1.0)
  assert fraction[0, 1] == 1.0 and 0.1 < fraction[1, 0] < 0.9  # The near-tie flips between resamples.
  assert best["resampled_steps"].shape == (500, 2)
  with pytest.raises(ValueError, match="layer 2: every similarity is NaN"):
    similarity.best_match({**sim, "mean": np.asarray([[0.1, 0.2, 0.3], [np.nan] * 3])}, [1, 50, 100])
  fit = similarity.linear_fit([3, 4, 5, 6], [4, 7, 10, 13])
  assert (
    fit["slope"] == pytest.approx(3.0) and fit["intercept"] == pytest.approx(-5.0) and fit["r2"] == pytest.approx(1)
  )
  # A flat sequence is flat: slope exactly 0, not round-off such as 5e-17.
  assert similarity.linear_fit([3, 4, 5, 6], [14, 14, 14, 14]) == {
    "slope": 0.0,
    "intercept": 14.0,
    "r2": 1.0,
    "flat": True,
  }
  resampled = np.asarray([[4, 7, 10, 13], [4, 6, 8, 10], [4, 8, 12, 16]])  # Slopes 3, 2 and 4.
  low, high = similarity.slope_interval([3, 4, 5, 6], resampled, 0.9)
  assert 2 <= low < 3 < high <= 4


def test_a_predictor_that_is_newton_at_k_steps_best_matches_k(tiny):
  """The whole comparison pipeline on a known answer: Newton's own k-step predictions as the 'layer'."""
  tiny.eval.update(newton_steps=12)
  xs, ys = _prompts(b=256, n=tiny.task.n_points, d=tiny.task.n_dims)
  algos = probing.algorithm_predictions(tiny, xs, ys)
  layers = algos["newton"][[1, 4, 7]]  # Steps 2, 5, 8.
  sim = similarity.bootstrap_similarity(
    similarity.error_cosines(layers, algos["newton"], ys, first=0),
    similarity.resample_counts(jax.random.key(0), 100, ys.shape[0]),
    0.9,
  )
  best = similarity.best_match(sim, probing._steps(tiny, "newton"))
  assert best["steps"] == [2, 5, 8] and [w[0] for w in best["within_interval"]] == [2, 5, 8]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  config = tiny_config.get_config()
  config.train.update(num_steps=40, checkpoint_every=20, log_every=20, steps_per_dispatch=20)
  workdir = tmp_path_factory.mktemp("tiny")
  train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  return config, workdir


def test_probes_model_readout_reproduces_the_output_and_least_squares_is_optimal(trained):
  config, workdir = trained
  params, _ = checkpointing.load_params(config, workdir)
  model = models.build_model(config.model)
  xs, ys = _prompts(b=32, n=config.task.n_points, d=config.task.n_dims, seed=3)
  preds, hidden = model.apply({"params": params}, xs, ys, return_hidden=True)
  own = probes.apply(probes.model_readout(params, config.model.num_layers), probes.x_position_states(hidden))
  np.testing.assert_allclose(own[-1], preds, rtol=1e-5, atol=1e-5)
  # On the prompts it is fit on, each layer's least-squares probe has the lowest squared error of any read-out.
  config.eval.update(probe_prompts=64, batch_size=64, probe_ridge=0.0)
  key = jax.random.key(9)
  prompts = probes._prompts(config, key, 0, 64)
  states = probes._states(model, params, prompts)
  mse = lambda readouts: np.mean(np.square(probes.apply(readouts, states) - prompts.ys_BxN[None]), axis=(1, 2))
  fitted, fit_mse_L = probes.make_fitter(config, model)(params, key)
  np.testing.assert_allclose(fit_mse_L, mse(fitted), rtol=1e-4)  # The reported fit residual is the real one.
  for other in (
    probes.model_readout(params, config.model.num_layers),
    jax.tree.map(lambda a: a + 0.01, fitted),
    jax.tree.map(lambda a: a - 0.01, fitted),
  ):
    assert np.all(mse(fitted) <= mse(other) + 1e-6)


class _Oracle(nn.Module):
  """A stand-in backbone whose layer-l state at x_t holds y_t scaled by l + 1: a linear probe can read y exactly."""

  width: int
  num_layers: int

  @nn.compact
  def __call__(self, xs_BxNxD, ys_BxN, return_hidden=True):
    b, n, d = xs_BxNxD.shape
    scale = self.param("scale", lambda key, shape: jnp.arange(1.0, shape[0] + 1), (self.num_layers + 1,))
    at_x_BxNxW = jnp.concatenate([ys_BxN[..., None], xs_BxNxD, jnp.zeros((b, n, self.width - d - 1))], -1)
    tokens_BxTxW = jnp.stack([at_x_BxNxW, jnp.zeros_like(at_x_BxNxW)], axis=2).reshape(b, 2 * n, self.width)
    return jnp.zeros_like(ys_BxN), scale[:, None, None, None] * tokens_BxTxW[None]


def test_least_squares_and_trained_probes_read_a_linearly_decodable_target(tiny):
  oracle = _Oracle(tiny.model.width, tiny.model.num_layers)
  params = oracle.init(jax.random.key(0), jnp.zeros((1, 6, 3)), jnp.zeros((1, 6)))["params"]
  tiny.eval.update(probe_prompts=64, batch_size=64)
  fitted, _ = probes.make_fitter(tiny, oracle)(params, jax.random.key(1))
  np.testing.assert_allclose(fitted["kernel"][:, 0], 1 / np.arange(2.0, tiny.model.num_layers + 2), rtol=1e-3)
  tiny.eval.update(readout="trained", probe_init="normal", probe_steps=400, probe_learning_rate=3e-2)
  trained, trained_mse_L = probes.make_fitter(tiny, oracle)(params, jax.random.key(1))
  prompts = probes._prompts(tiny, jax.random.key(2), 0, 64)
  errors = np.mean(
    np.square(probes.apply(trained, probes._states(oracle, params, prompts)) - prompts.ys_BxN[None]), (1, 2)
  )
  assert np.all(errors < 0.01 * np.mean(np.square(prompts.ys_BxN)))
  assert np.all(np.asarray(trained_mse_L) < 0.01 * np.mean(np.square(prompts.ys_BxN)))  # Its own fit error too.


def test_eval_mode_writes_results_and_figures(trained):
  config, workdir = trained
  result = subprocess.run(
    # No --config: the evaluation reads the run's own WORKDIR/config.json.
    [sys.executable, "-m", "icl_jax.main", f"--workdir={workdir}", "--mode=eval"],
    capture_output=True,
    text=True,
    timeout=600,
    env={**__import__("os").environ, "XLA_FLAGS": ""},
  )
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((workdir / "eval" / "results.json").read_text())
  num_layers = config.model.num_layers
  assert len(results["best_match"]["newton"]) == len(results["best_match"]["gd_log"]) == num_layers
  for key in ("slope", "r2"):
    assert np.isfinite(results["fits"]["newton"][key])
  assert np.isfinite(results["fits"]["gd_log"]["doublings_per_layer"])
  assert np.asarray(results["sim_e"]["newton"]).shape == (num_layers, config.eval.newton_steps)
  assert np.asarray(results["error_per_dim"]["layers"]["mean"]).shape == (num_layers, config.task.n_points)
  assert results["settings"]["checkpoint_step"] == 40
  # Every similarity, best match and slope carries its interval.
  for metric in ("sim_e", "sim_w"):
    for name, mean in results[metric].items():
      low, high = (np.asarray(results[f"{metric}_interval"][name][b]) for b in ("low", "high"))
      assert low.shape == np.shape(mean) and np.all(low <= np.asarray(mean) + 1e-12) and np.all(mean <= high + 1e-12)
  for suffix in ("", "_sim_w"):
    for grid, steps in results["best_match" + suffix].items():
      interval = results[f"best_match{suffix}_interval"][grid]
      assert all(s in within for s, within in zip(steps, interval["within_interval"]))
      np.testing.assert_allclose(np.sum(interval["choice_fraction"], axis=1), 1.0)
  for grid in ("newton", "gd_log", "cg", "bfgs", "lbfgs"):
    low, high = results["fits"][grid]["slope_interval"]
    assert np.isfinite(results["fits"][grid]["slope"]) and low <= high
  assert len(results["probe_fit"]["mse_per_dim"]) == num_layers
  provenance = results["provenance"]
  assert provenance["versions"]["jax"] == jax.__version__ and provenance["device_count"] == 1
  assert len(provenance["git_commit"] or "0" * 40) == 40 and provenance["config"]["model"]["num_layers"] == num_layers
  # TensorBoard: the evaluation's numbers, its figures and the hyper-parameters, next to the training scalars.
  values = [v for e in helpers.tensorboard_events(workdir / "tensorboard") for v in e.summary.value]
  tags = {v.tag for v in values}
  assert {"loss", "eval/fit/newton_slope", "eval/last_layer_sim_e/newton", "eval/best_match"} <= tags
  assert any(v.tag == "eval/best_match" and v.image.encoded_image_string for v in values)
  assert any(v.metadata.plugin_data.plugin_name == "hparams" for v in values)
  assert "Wrote " in result.stderr and "results.json" in result.stderr
  etas = re.findall(r"stage (\d)/5, [0-9.]+ s elapsed, ETA (\d+) s", result.stderr)
  assert [stage for stage, _ in etas] == ["1", "2", "3", "4", "5"], "a progress line per stage, with the ETA"
  assert "definition" in results["table1"] and "last_layer_best" in results
  for stem in ("error_vs_layer", "sim_e_newton_heatmap", "best_match", "separability", "error_vs_context"):
    for suffix in (".png", ".pdf"):
      assert (workdir / "eval" / (stem + suffix)).stat().st_size > 0
  assert "Best-matching Newton steps per layer" in result.stderr
  # docs/workdir.md documents exactly these fields.
  documented = re.search(
    r"## `eval/results.json`, field by field(.*?)(\n## |\Z)", helpers.DOCS_WORKDIR.read_text(), re.S
  )
  keys = {
    k
    for row in documented.group(1).splitlines()
    if row.startswith("| `")
    for k in re.findall(r"`(\w+)`", row.split("|")[1])
  }
  assert keys == set(results), keys ^ set(results)
  # Beside results.json, the model's outputs it was computed from: analysed again without the model, they give
  # the same results.
  outputs = probing.outputs_from_npz((workdir / "eval" / "predictions.npz").read_bytes())
  assert outputs.layers_LxBxN.shape == (num_layers, config.eval.num_prompts, config.task.n_points)
  assert outputs.prompts_sha256 == results["prompts_sha256"]
  again = json.loads(json.dumps(probing.Evaluator(config).analyse(outputs)))
  for key in ("error_per_dim", "sim_e", "sim_w", "best_match", "fits", "fits_adaptive", "separability", "convergence"):
    assert again[key] == results[key], key
  other = config.copy_and_resolve_references()
  other.seed += 1
  with pytest.raises(ValueError, match="other evaluation prompts"):
    probing.Evaluator(other).analyse(outputs)


def _eval(workdir, *overrides):
  return subprocess.run(
    [
      sys.executable,
      "-m",
      "icl_jax.main",
      "--config=tests/tiny_config.py",
      f"--workdir={workdir}",
      "--mode=eval",
      *overrides,
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_eval_without_a_run_says_so_and_creates_nothing(tmp_path):
  """A missing workdir, or one without config.json: one error line, exit 1, and no checkpoints/ left behind."""
  for workdir in (tmp_path / "missing", tmp_path):
    result = _eval(workdir)
    assert result.returncode == 1 and "config.json: no such file" in result.stderr, result.stderr[-2000:]
    assert not (workdir / "checkpoints").exists() and "Traceback" not in result.stderr
  (tmp_path / "config.json").write_text(json.dumps(config_files.config_dict(tiny_config.get_config())))
  result = _eval(tmp_path)
  assert result.returncode == 1 and "no checkpoint to evaluate" in result.stderr


def test_eval_refuses_a_model_other_than_the_saved_one(tmp_path):
  """Evaluating a 2-head run with --config.model.num_heads=1 would report the wrong model: it is refused,
  naming the differing field. Evaluation settings may differ."""
  config = tiny_config.get_config()
  config.train.num_steps = 4
  train.train_and_evaluate(config, tmp_path, devices=jax.devices()[:1])
  result = _eval(tmp_path, "--config.train.num_steps=4", "--config.model.num_heads=1")
  assert result.returncode == 1
  assert "config.model.num_heads: saved 2, now 1" in result.stderr and "Traceback" not in result.stderr
  assert not (tmp_path / "eval" / "results.json").exists()
  result = _eval(
    tmp_path, "--config.train.num_steps=4", "--config.eval.bootstrap_samples=20", "--config.model.dtype=bfloat16"
  )
  assert result.returncode == 0, result.stderr[-3000:]


def test_eval_benchmark_reports_its_time(tiny):
  from icl_jax.bench import benchmarks

  line = benchmarks.bench_eval(tiny)
  assert line["name"] == "eval" and line["seconds"] > 0 and line["first_call_with_compilation_s"] >= line["seconds"]
  assert set(line["stages_s"]) == {"probes_s", "model_s", "algorithms_s", "metrics_s", "sim_w_s"}


def test_evaluation_prompts_do_not_depend_on_the_batch_size(tiny):
  model = models.build_model(tiny.model)
  tiny.eval.batch_size = 8
  small = probing._Programs(tiny, model).prompts(jax.random.key(0), 20, 6)
  tiny.eval.batch_size = 32
  large = probing._Programs(tiny, model).prompts(jax.random.key(0), 20, 6)
  np.testing.assert_array_equal(small.xs_BxNxD, large.xs_BxNxD)
  np.testing.assert_array_equal(small.ys_BxN, large.ys_BxN)


def test_kappa100_gd_step_is_stable_at_the_papers_size():
  """configs/linreg_ill_conditioned.py: on 1280 prompts of d = 20, 41 points, kappa = 100, every GD step
  contracts (the guard passes), and Fu et al.'s step 0.01 would not (the guard names it)."""
  config = linreg_ill_conditioned.get_config()
  prompts = data.sample_batch(data.step_key(jax.random.key(0), 0), 0, 1280, config.task, config.task.n_dims)
  probing.check_gd_stability(config, prompts.xs_BxNxD)
  config.eval.gd_learning_rate = 0.01
  with pytest.raises(
    errors.ConfigError,
    match=r"config.eval.gd_learning_rate = 0.01 makes gradient descent "
    r"diverge on \d+\.\d% of the 1280 evaluation prompts",
  ):
    probing.check_gd_stability(config, prompts.xs_BxNxD)


@pytest.mark.parametrize("config_module", [linreg, linreg_ill_conditioned], ids=["isotropic", "kappa100"])
def test_every_algorithm_setting_is_finite_on_1280_prompts_of_the_papers_size(config_module):
  config = config_module.get_config()
  prompts = data.sample_batch(data.step_key(jax.random.key(0), 0), 0, 1280, config.task, config.task.n_dims)
  algos = probing.algorithm_predictions(config, prompts.xs_BxNxD, prompts.ys_BxN)
  assert set(algos) == set(probing.GRIDS + probing.SINGLE)
  for name, preds_KxBxN in algos.items():
    assert preds_KxBxN.shape == (len(probing._steps(config, name)), 1280, 41)
    assert np.all(np.isfinite(preds_KxBxN)), name


def test_non_finite_predictions_stop_the_evaluation_naming_the_setting():
  preds_KxBxN = np.zeros((3, 10, 4))
  preds_KxBxN[2, :3, 1] = np.inf
  with pytest.raises(FloatingPointError, match="gd, 300 steps: non-finite predictions on 30.0% of the 10"):
    probing.check_finite(["gd, 1 steps", "gd, 100 steps", "gd, 300 steps"], preds_KxBxN)
  probing.check_finite(["ok"], np.zeros((1, 2, 3)))


def test_fit_layers_default_to_the_middle_and_are_checked_against_the_model(tiny):
  tiny.eval.fit_layers = None
  for num_layers, expected in ((12, (3, 9)), (6, (2, 5)), (3, (1, 3)), (1, (1, 1)), (24, (5, 18))):
    tiny.model.num_layers = num_layers
    assert probing.fit_layers(tiny) == expected
  tiny.model.num_layers = 6
  tiny.eval.fit_layers = (3, 9)
  with pytest.raises(errors.ConfigError, match=r"config.eval.fit_layers = \(3, 9\): the model has 6 layers"):
    probing.Evaluator(tiny)


class _IllConditioned(nn.Module):
  """A backbone whose layer states are smooth features of the prompt with column scales over four decades, so
  the least-squares probes' features have a condition number above 1e4."""

  width: int
  num_layers: int

  @nn.compact
  def __call__(self, xs_BxNxD, ys_BxN, return_hidden=True):
    b, n, d = xs_BxNxD.shape
    # Singular values over four decades in a random basis: nearly collinear states, not merely rescaled ones.
    rotation_WxW = jnp.linalg.qr(jax.random.normal(jax.random.key(99), (self.width, self.width)))[0]
    squeeze_WxW = rotation_WxW * jnp.logspace(0.0, -4.0, self.width)[None] @ rotation_WxW.T
    mixes = [jax.random.normal(jax.random.key(i), (d + 1, self.width)) for i in range(self.num_layers + 1)]
    tokens_BxNxI = jnp.concatenate([xs_BxNxD, ys_BxN[..., None]], axis=-1)
    states = [jnp.tanh(tokens_BxNxI @ m) @ squeeze_WxW for m in mixes]
    # Both positions of a point carry its state; the probes read the x positions.
    hidden = jnp.stack([jnp.repeat(h, 2, axis=1) for h in states])
    return ys_BxN, hidden


def test_least_squares_probes_match_a_float64_solve_on_ill_conditioned_features(tiny):
  model = _IllConditioned(16, tiny.model.num_layers)
  params = {}
  tiny.eval.update(probe_prompts=64, batch_size=32, probe_ridge=0.0)
  key = jax.random.key(3)
  fitted, _ = probes.make_fitter(tiny, model)(params, key)
  batches = [probes.feature_batches(tiny, model)(params, key, i) for i in range(2)]
  features_LxMxF = np.concatenate([np.asarray(f, np.float64) for f, _ in batches], axis=1)
  ys_M = np.concatenate([np.asarray(y, np.float64) for _, y in batches])
  for layer in range(tiny.model.num_layers):
    assert np.linalg.cond(features_LxMxF[layer]) > 1e4
    expected = np.linalg.lstsq(features_LxMxF[layer], ys_M, rcond=None)[0]
    got = np.append(np.asarray(fitted["kernel"][layer], np.float64), float(fitted["bias"][layer]))
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-5
    # Not vacuous: the float32 normal equations, as solved before, miss by far more.
    f32 = features_LxMxF[layer].astype(np.float32)
    float32 = np.linalg.solve(f32.T @ f32, f32.T @ ys_M.astype(np.float32))
    assert np.linalg.norm(float32 - expected) / np.linalg.norm(expected) > 1e-3


def test_the_evaluation_runs_the_model_in_float32_whatever_it_trained_in(tiny):
  """A bfloat16-trained run's float32 parameters are evaluated in float32: the same numbers as its float32 twin."""
  xs, ys = jnp.zeros((1, tiny.task.n_points, tiny.task.n_dims)), jnp.zeros((1, tiny.task.n_points))
  params = models.build_model(tiny.model).init(jax.random.key(0), xs, ys)["params"]
  float32 = probing.Evaluator(tiny)(params)
  tiny.model.dtype = "bfloat16"
  bfloat16 = probing.Evaluator(tiny)(params)
  assert bfloat16["sim_e"] == float32["sim_e"] and bfloat16["error_per_dim"] == float32["error_per_dim"]
