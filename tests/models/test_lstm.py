"""LSTM baseline: parameter count, shapes, causality, the query stream, training and evaluation through the
same trainer and evaluator as GPT-2."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import lstm as lstm_config
from icl_jax import checkpointing
from icl_jax import models
from icl_jax import train
from icl_jax.analysis import evaluate
from icl_jax.analysis import probing
from icl_jax.runtime import errors


def test_paper_model_has_torch_lstm_parameter_count():
  config = lstm_config.get_config()
  model = models.build_model(config.model)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 41, 20)), jnp.zeros((1, 41)))
  count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes["params"]))
  # torch.nn.LSTM(256, 256, num_layers=10): 4 (W W + W W + 2 W) per layer; read-in 20 -> 256; read-out 256 -> 1.
  assert count == 10 * 4 * (256 * 256 + 256 * 256 + 2 * 256) + (20 * 256 + 256) + 257 == 5_268_993


@pytest.fixture(scope="module")
def quick():
  config = lstm_config.get_config("quick")
  model = models.build_model(config.model)
  xs = jax.random.normal(jax.random.key(0), (2, config.task.n_points, config.task.n_dims))
  ys = jax.random.normal(jax.random.key(1), (2, config.task.n_points))
  params = model.init(jax.random.key(2), xs, ys)["params"]
  # Compiled once per shape: eagerly, every call would trace and compile its scans anew.
  return config, jax.jit(model.apply, static_argnames="return_hidden"), params, xs, ys


def test_shapes_and_hidden_states(quick):
  config, apply, params, xs, ys = quick
  preds, hidden = apply({"params": params}, xs, ys, return_hidden=True)
  assert preds.shape == (2, 11)
  assert hidden.shape == (config.model.num_layers + 1, 2, 22, config.model.width)
  np.testing.assert_array_equal(preds, apply({"params": params}, xs, ys))
  # Entry 0 is the read-in, the last entry the read-out's input (no final LayerNorm), and LSTM outputs are
  # bounded by the tanh.
  read_in, read_out = params["read_in"], params["read_out"]
  tokens = jnp.stack([xs, jnp.zeros_like(xs).at[..., 0].set(ys)], axis=2).reshape(2, 22, -1)
  np.testing.assert_allclose(hidden[0], tokens @ read_in["kernel"] + read_in["bias"][None, None], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    hidden[-1][:, ::2] @ read_out["kernel"][:, 0] + read_out["bias"][0], preds, rtol=1e-5, atol=1e-6
  )
  assert np.all(np.abs(hidden[1:]) < 1)


def test_predictions_are_causal(quick):
  _, apply, params, xs, ys = quick
  preds = apply({"params": params}, xs, ys)
  k = 4  # Changing x_{k+1} and y_k must leave the predictions for y_0..y_k unchanged, and change later ones.
  preds2 = apply({"params": params}, xs.at[:, k + 1].add(1.0), ys.at[:, k].add(1.0))
  np.testing.assert_array_equal(preds[:, : k + 1], preds2[:, : k + 1])
  assert not np.allclose(preds[:, k + 1 :], preds2[:, k + 1 :])


def test_query_stream_equals_putting_each_query_in_place_of_x_n(quick):
  config, apply, params, xs, ys = quick
  queries = jax.random.normal(jax.random.key(7), (2, 11, 3, 5))
  out = apply({"params": params}, xs, ys, queries=queries)
  preds, hidden = apply({"params": params}, xs, ys, return_hidden=True)
  np.testing.assert_allclose(out.preds_BxN, preds, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out.hidden_Lx, hidden, rtol=1e-6, atol=1e-6)
  assert out.query_preds_BxNxQ.shape == (2, 11, 3)
  assert out.query_hidden_Lx.shape == (config.model.num_layers + 1, 2, 11, 3, config.model.width)
  for n in (0, 1, 4, 10):
    for q in range(3):
      replaced = apply({"params": params}, xs.at[:, n].set(queries[:, n, q]), ys, return_hidden=True)
      np.testing.assert_allclose(out.query_preds_BxNxQ[:, n, q], replaced[0][:, n], rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(out.query_hidden_Lx[:, :, n, q], replaced[1][:, :, 2 * n], rtol=1e-5, atol=1e-6)


def test_validate_names_each_bad_field(tiny):
  tiny.model.update(family="lstm", num_layers=0, width=0, num_heads=3, n_positions=1)  # Neither is read.
  with pytest.raises(errors.ConfigError) as error:
    evaluate.validate(tiny, 1)
  fields = [line.split(" = ")[0].strip() for line in str(error.value).splitlines()[1:]]
  assert [f for f in fields if f.startswith("config.model.")] == ["config.model.num_layers", "config.model.width"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  from tests import tiny_config

  config = tiny_config.get_config()
  config.model.family = "lstm"
  workdir = tmp_path_factory.mktemp("lstm")
  return config, workdir, train.train_and_evaluate(config, workdir)


def test_trains_through_the_shared_trainer(trained):
  config, workdir, result = trained
  assert result["step"] == config.train.num_steps
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == list(range(1, config.train.num_steps + 1))
  assert all(np.isfinite(r["loss"]) for r in records)
  assert np.isfinite(result["error_curve"]["last_ratio_to_zero"])


def test_evaluator_matches_every_layer(trained):
  config, workdir, _ = trained
  params, step = checkpointing.load_params(config, workdir)
  assert step == config.train.num_steps
  results = probing.Evaluator(config)(params)
  assert results["layers"] == [1, 2]
  for grid in probing.GRIDS:
    assert len(results["best_match"][grid]) == len(results["best_match_sim_w"][grid]) == config.model.num_layers
  assert np.all(np.isfinite(np.asarray(results["sim_w"]["newton"])))
