"""The evaluator: similarity metrics, probes, best matches, and the whole `--mode=eval` on a trained tiny run."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from icl_jax.analysis import probing
from icl_jax import checkpointing
from icl_jax import models
from icl_jax.analysis import probes
from icl_jax.analysis import similarity
from icl_jax import train
from tests import tiny_config


def _prompts(b=64, n=12, d=4, seed=0):
  xs = jax.random.normal(jax.random.key(seed), (b, n, d))
  ws = jax.random.normal(jax.random.key(seed + 1), (b, d))
  return xs, jnp.einsum("bnd,bd->bn", xs, ws)


def test_sim_e_is_one_for_itself_and_minus_one_for_the_mirror():
  _, ys = _prompts()
  preds = ys[None] + jax.random.normal(jax.random.key(5), (1,) + ys.shape)
  mirror = 2 * ys[None] - preds  # Residual of opposite sign.
  sim = similarity.similarity_of_errors(preds, jnp.concatenate([preds, mirror]), ys, include_first=True)
  np.testing.assert_allclose(sim, [[1.0, -1.0]], atol=1e-6)


def test_sim_e_position_zero_is_counted_only_when_asked():
  _, ys = _prompts()
  a = ys[None] + 0.0
  a = a.at[:, :, 0].set(ys[:, 0] + 1.0)  # Errs only at position 0.
  b = jnp.zeros_like(a).at[:, :, 0].set(ys[:, 0] + 1.0) + ys[None]
  b = b.at[:, :, 1:].add(1.0)  # Errs everywhere after position 0 too.
  with_first = similarity.similarity_of_errors(a, b, ys, include_first=True)
  without_first = similarity.similarity_of_errors(a, b, ys, include_first=False)
  assert 0 < float(with_first[0, 0]) < 1 and float(without_first[0, 0]) == 0.0


def test_induced_weights_recover_a_linear_predictor_exactly():
  b, n, q, d = 3, 5, 12, 4
  queries = jax.random.normal(jax.random.key(0), (b, n, q, d))
  weights = jax.random.normal(jax.random.key(1), (2, b, n, d))
  preds = jnp.einsum("bnqd,cbnd->cbnq", queries, weights)
  np.testing.assert_allclose(similarity.induced_weights(queries, preds), weights, rtol=1e-4, atol=1e-5)
  sim = similarity.similarity_of_weights(weights[:1], jnp.concatenate([weights[:1], -weights[:1]]))
  np.testing.assert_allclose(sim, [[1.0, -1.0]], atol=1e-6)


def test_bootstrap_interval_brackets_the_mean():
  values = jax.random.exponential(jax.random.key(0), (2, 500, 3))
  out = similarity.bootstrap_means(values, jax.random.key(1), num_samples=400, confidence=0.9)
  np.testing.assert_allclose(out["mean"], np.asarray(values).mean(1), rtol=1e-6)
  assert np.all(out["low"] < out["mean"]) and np.all(out["mean"] < out["high"])
  standard_error = np.asarray(values).std(1) / np.sqrt(500)  # A 90% interval is about +-1.645 standard errors.
  np.testing.assert_allclose(out["high"] - out["low"], 2 * 1.645 * standard_error, rtol=0.25)
  constant = similarity.bootstrap_means(jnp.ones((1, 50, 2)), jax.random.key(1), 100, 0.9)
  np.testing.assert_allclose(constant["low"], constant["high"])


def test_best_match_and_fits():
  best = similarity.best_match(np.asarray([[0.1, 0.9, 0.3], [0.5, 0.2, 0.8]]), [1, 50, 100])
  assert best == {"steps": [50, 100], "similarity": [0.9, 0.8]}
  fit = similarity.linear_fit([3, 4, 5, 6], [4, 7, 10, 13])
  assert fit["slope"] == pytest.approx(3.0) and fit["intercept"] == pytest.approx(-5.0) and fit["r2"] == pytest.approx(1)


def test_a_predictor_that_is_newton_at_k_steps_best_matches_k(tiny):
  """The whole comparison pipeline on a known answer: Newton's own k-step predictions as the 'layer'."""
  tiny.eval.update(newton_steps=12)
  xs, ys = _prompts(b=256, n=tiny.task.n_points, d=tiny.task.n_dims)
  algos = probing.algorithm_predictions(tiny, xs, ys)
  layers = algos["newton"][[1, 4, 7]]  # Steps 2, 5, 8.
  sim = similarity.similarity_of_errors(layers, algos["newton"], ys, include_first=True)
  assert similarity.best_match(sim, probing._steps(tiny, "newton"))["steps"] == [2, 5, 8]


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
  fitted = probes.make_fitter(config, model)(params, key)
  for other in (probes.model_readout(params, config.model.num_layers),
                jax.tree.map(lambda a: a + 0.01, fitted), jax.tree.map(lambda a: a - 0.01, fitted)):
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
  fitted = probes.make_fitter(tiny, oracle)(params, jax.random.key(1))
  np.testing.assert_allclose(fitted["kernel"][:, 0], 1 / np.arange(2.0, tiny.model.num_layers + 2), rtol=1e-3)
  tiny.eval.update(readout="trained", probe_init="normal", probe_steps=400, probe_learning_rate=3e-2)
  trained = probes.make_fitter(tiny, oracle)(params, jax.random.key(1))
  prompts = probes._prompts(tiny, jax.random.key(2), 0, 64)
  errors = np.mean(np.square(probes.apply(trained, probes._states(oracle, params, prompts)) - prompts.ys_BxN[None]),
                   (1, 2))
  assert np.all(errors < 0.01 * np.mean(np.square(prompts.ys_BxN)))


def test_eval_mode_writes_results_and_figures(trained):
  config, workdir = trained
  result = subprocess.run(
      [sys.executable, "-m", "icl_jax.main", "--config=tests/tiny_config.py", f"--workdir={workdir}", "--mode=eval"],
      capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "XLA_FLAGS": ""})
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
  for stem in ("error_vs_layer", "sim_e_newton_heatmap", "best_match", "error_vs_context"):
    for suffix in (".png", ".pdf"):
      assert (workdir / "eval" / (stem + suffix)).stat().st_size > 0
  assert "Best-matching Newton steps per layer" in result.stderr


def test_eval_without_a_checkpoint_says_so(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "icl_jax.main", "--config=tests/tiny_config.py", f"--workdir={tmp_path}", "--mode=eval"],
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert "no checkpoint to evaluate" in result.stderr


def test_eval_benchmark_reports_its_time(tiny):
  from icl_jax.tools import benchmarks as bench

  line = bench.bench_eval(tiny)
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
