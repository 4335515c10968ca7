"""Ahn et al.'s linear self-attention (models/lsa.py), the trainer options of their setting, and the analysis."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import linreg
from configs import lsa as lsa_config
from icl_jax import data
from icl_jax import models
from icl_jax import optim
from icl_jax import train
from icl_jax import train_step
from icl_jax.analysis import algorithms
from icl_jax.analysis import constructions
from icl_jax.analysis import evaluate
from icl_jax.analysis import lsa_analysis
from icl_jax.models import lsa
from tests.helpers import assert_field_error


def _model(num_layers=3, sparse=False, init_std=0.1):
  return lsa.LSARegressor(
    ml_collections.ConfigDict(
      {"family": "lsa", "num_layers": num_layers, "lsa_sparse": sparse, "lsa_init_std": init_std}
    )
  )


def _prompts(seed, b, n, d):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k1, (b, n, d)), jax.random.normal(k2, (b, n))


# ---------------------------------------------------------------------------------------------------------------
# The model.


def test_construction_weights_give_preconditioned_gd_at_the_last_position():
  n, d, num_layers = 16, 4, 3
  xs, ys = _prompts(0, 8, n + 1, d)
  rng = np.random.default_rng(0)
  factor = rng.normal(size=(d, d))
  g_DxD = jnp.asarray(0.05 * factor @ factor.T + 0.1 * np.eye(d), jnp.float32)
  params = lsa.params_from_preconditioners([g_DxD] * num_layers)
  # The parameters embed as exactly the construction's weights.
  for mine, theirs in zip(lsa.matrices(params), constructions.preconditioned_gd_lsa_weights([g_DxD] * num_layers)):
    for a, b in zip(mine, theirs):
      np.testing.assert_array_equal(a, b)
  preds_BxN = _model(num_layers, sparse=True).apply({"params": params}, xs, ys)
  w_BxD = algorithms.gradient_descent(xs[:, :n], ys[:, :n], (num_layers,), 1.0, "mean", g_DxD)[:, 0, -1]
  np.testing.assert_allclose(preds_BxN[:, -1], jnp.einsum("bd,bd->b", w_BxD, xs[:, n]), rtol=1e-4, atol=1e-5)
  # Every prefix is preconditioned GD on its own points (1/t scaling = "mean" gradient over t points).
  prefix_BxN = algorithms.predict(algorithms.gradient_descent(xs, ys, (num_layers,), 1.0, "mean", g_DxD), xs)[:, 0]
  np.testing.assert_allclose(preds_BxN, prefix_BxN, rtol=1e-4, atol=1e-5)


def test_per_layer_preconditioners_match_the_construction():
  n, d = 12, 5
  xs, ys = _prompts(1, 6, n + 1, d)
  rng = np.random.default_rng(1)
  gs = [jnp.asarray(0.1 * np.eye(d) + 0.03 * rng.normal(size=(d, d)), jnp.float32) for _ in range(4)]
  preds_B = _model(4, sparse=True).apply({"params": lsa.params_from_preconditioners(gs)}, xs, ys, position=n)
  z = constructions.lsa_forward(
    constructions.lsa_prompt(xs[:, :n], ys[:, :n], xs[:, n]), *constructions.preconditioned_gd_lsa_weights(gs)
  )
  np.testing.assert_allclose(preds_B, constructions.lsa_prediction(z), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sparse", [False, True])
def test_every_prefix_equals_the_lsa_run_on_that_prefix_alone(sparse):
  n, d, num_layers = 6, 3, 2
  xs, ys = _prompts(2, 4, n, d)
  model = _model(num_layers, sparse)
  params = model.init(jax.random.key(3), xs, ys)["params"]
  assert set(params["layer_0"]) == ({"A"} if sparse else {"A", "B"})
  preds_BxN, hidden = model.apply({"params": params}, xs, ys, return_hidden=True)
  assert preds_BxN.shape == (4, n) and hidden.shape == (num_layers + 1, 4, n, d + 1, n)
  np.testing.assert_array_equal(preds_BxN[:, 0], 0.0)  # No context: nothing is added.
  ps, qs = lsa.matrices(params)
  for t in range(1, n):
    z0 = constructions.lsa_prompt(xs[:, :t], ys[:, :t], xs[:, t])
    zs = [z0]
    for layer in range(num_layers):
      zs.append(constructions.lsa_forward(z0, ps[: layer + 1], qs[: layer + 1]))
    np.testing.assert_allclose(preds_BxN[:, t], constructions.lsa_prediction(zs[-1]), rtol=1e-5, atol=1e-6)
    for layer, z in enumerate(zs):  # hidden[l, b, t] holds Z_l of prefix t in its first t + 1 columns.
      np.testing.assert_allclose(hidden[layer, :, t, :, : t + 1], z, rtol=1e-5, atol=1e-6)
      np.testing.assert_array_equal(hidden[layer, :, t, :, t + 1 :], 0.0)
    one_B = model.apply({"params": params}, xs, ys, position=t)
    np.testing.assert_allclose(one_B, preds_BxN[:, t], rtol=1e-5, atol=1e-7)


def test_init_std_and_registry():
  model = models.build_model(lsa_config.get_config("quick").model)
  assert isinstance(model, lsa.LSARegressor)
  xs, ys = _prompts(4, 1, 21, 5)
  params = model.init(jax.random.key(0), xs, ys)["params"]
  assert set(params["layer_0"]) == {"A"}  # configs/lsa.py: the sparse form.
  values = np.concatenate([np.ravel(p) for p in jax.tree.leaves(params)])
  assert 0.5e-4 < values.std() < 2e-4  # N(0, (1e-4)^2): the code's var is the std.


# ---------------------------------------------------------------------------------------------------------------
# Data options.


def _ahn_task(**overrides):
  task = lsa_config.get_config().task.copy_and_resolve_references()
  task.update(overrides)
  return task


def test_explicit_spectrum_per_run_rotation_and_inverse_covariance_w():
  task = _ahn_task(n_points=4000)
  sigma = np.asarray(data.covariance_matrix(task), np.float64)
  u = np.asarray(data.run_rotation(task))
  np.testing.assert_allclose(u @ u.T, np.eye(5), atol=1e-5)
  np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(sigma)), np.sort(task.eigenvalues), rtol=1e-5, atol=1e-6)
  batches = [data.sample_batch(data.step_key(jax.random.key(0), s), 0, 8, task, 5) for s in (0, 7)]
  for batch in batches:  # Every prompt of every step has the run's covariance.
    xs = np.asarray(batch.xs_BxNxD, np.float64).reshape(-1, 5)
    np.testing.assert_allclose(xs.T @ xs / len(xs), sigma, atol=0.04)
  assert not np.allclose(batches[0].xs_BxNxD, batches[1].xs_BxNxD)
  ws = np.asarray(
    data.sample_batch(data.step_key(jax.random.key(1), 0), 0, 20_000, _ahn_task(n_points=2), 5).ws_BxD, np.float64
  )
  np.testing.assert_allclose(ws.T @ ws / len(ws), np.linalg.inv(sigma), atol=0.25, rtol=0.05)
  identity_ws = data.sample_batch(
    data.step_key(jax.random.key(1), 0), 0, 20_000, _ahn_task(n_points=2, w_distribution="identity"), 5
  ).ws_BxD
  np.testing.assert_allclose(np.cov(np.asarray(identity_ws).T), np.eye(5), atol=0.05)
  # The eigenbasis follows rotation_seed (configs/lsa.py ties it to the run's seed).
  assert not np.allclose(data.run_rotation(_ahn_task(rotation_seed=1)), u)
  config = lsa_config.get_config()
  config.seed = 5
  assert config.task.rotation_seed == 5


def test_default_sampler_is_unchanged():
  """The defaults (isotropic, and kappa > 1 per prompt) draw exactly what the sampler drew before these options."""
  for kappa in (1.0, 100.0):
    task = linreg.get_config().task
    task.update(n_dims=4, n_points=6, kappa=kappa)
    key = data.step_key(jax.random.key(3), 2)
    batch = data.sample_batch(key, 0, 3, task, 4)
    examples_key = jax.random.split(key)[1]
    for i in range(3):
      key_x, key_w, _, key_rot = jax.random.split(jax.random.fold_in(examples_key, i), 4)
      zs = jax.random.normal(key_x, (6, 4))
      if kappa != 1.0:
        zs = (zs * jnp.sqrt(data.covariance_spectrum(task))[None]) @ data.random_rotation(key_rot, 4).T
      w = jax.random.normal(key_w, (4,))
      np.testing.assert_array_equal(batch.xs_BxNxD[i], zs)
      np.testing.assert_array_equal(batch.ws_BxD[i], w)
      np.testing.assert_array_equal(batch.ys_BxN[i], zs @ w)
  assert data.data_step(17, linreg.get_config().task) == 17


def _tiny_lsa(**train_overrides):
  config = lsa_config.get_config("quick")
  config.task.n_points = 8
  config.train.update(
    {
      "num_steps": 8,
      "batch_size": 16,
      "log_every": 1,
      "checkpoint_every": 8,
      "steps_per_dispatch": 3,
      "decay_every": 4,
      **train_overrides,
    }
  )
  config.eval.update(num_prompts=32, batch_size=16)
  return config


def _chunk_losses(config, num_steps, num_devices=2):
  """Losses of the first num_steps training steps, from the jitted chunk alone (no logs or checkpoints)."""
  mesh = train.make_mesh(jax.devices()[:num_devices])
  model = models.build_model(config.model)
  optimizer = optim.make_optimizer(config.train)
  state = train_step.init_state(config, model, optimizer, mesh)
  run = train_step.make_train_chunk(config, model, optimizer, optim.learning_rate_schedule(config.train), mesh)
  initial = jax.device_get(state)  # The chunk donates (deletes) its input state.
  _, metrics = run(state, num_steps)
  return np.asarray(metrics["loss"])[:num_steps], model, initial


def test_resample_every_keeps_one_batch_per_window():
  config = _tiny_lsa(learning_rate=1e-12, steps_per_dispatch=7)  # Parameters barely move: equal losses mean
  config.task.resample_every = 3  # equal batches.
  assert [int(data.data_step(s, config.task)) for s in range(7)] == [0, 0, 0, 1, 1, 1, 2]
  losses, _, _ = _chunk_losses(config, 7)
  np.testing.assert_allclose(losses[0:3], losses[0], rtol=1e-6)
  np.testing.assert_allclose(losses[3:6], losses[3], rtol=1e-6)
  assert abs(losses[3] - losses[0]) > 1e-3 * losses[0] and abs(losses[6] - losses[3]) > 1e-3 * losses[3]
  # A constant curriculum disables the in-loop batch cache: the per-step sampler gives the same losses.
  config.task.curriculum.update(
    enabled=True, dims_start=5, points_start=8, dims_interval=1, points_interval=1, dims_increment=0, points_increment=0
  )
  np.testing.assert_array_equal(_chunk_losses(config, 7)[0], losses)


# ---------------------------------------------------------------------------------------------------------------
# Loss positions and per-matrix clipping.


def test_last_position_loss_is_the_masked_last_column():
  xs, ys = _prompts(5, 6, 7, 3)
  batch = data.Batch(xs, ys, jnp.zeros((6, 3)))
  model = _model(2)
  params = model.init(jax.random.key(0), xs, ys)["params"]
  preds = model.apply({"params": params}, xs, ys)
  for n_points in (7, 4):  # With the curriculum, the last active position.
    expected = np.mean(np.square(np.asarray(preds[:, n_points - 1] - ys[:, n_points - 1])))
    np.testing.assert_allclose(
      train_step.last_position_loss(model, params, batch, jnp.int32(n_points)), expected, rtol=1e-5
    )

  class FullOnly:  # A model without the one-position path (as GPT-2): its full predictions are indexed.
    apply = staticmethod(lambda variables, xs, ys: model.apply(variables, xs, ys))

  np.testing.assert_allclose(
    train_step.last_position_loss(FullOnly, params, batch, jnp.int32(7)),
    train_step.last_position_loss(model, params, batch, jnp.int32(7)),
    rtol=1e-5,
  )


@pytest.mark.parametrize("positions", ["all", "last"])
def test_training_loss_positions(positions):
  config = _tiny_lsa(steps_per_dispatch=1)
  config.train.loss_positions = positions
  (loss,), model, state = _chunk_losses(config, 1, num_devices=1)
  batch = data.sample_batch(data.step_key(jax.random.wrap_key_data(state.data_key), 0), 0, 16, config.task, 5)
  preds_BxN = model.apply({"params": state.params}, batch.xs_BxNxD, batch.ys_BxN)
  errors_BxN = np.square(np.asarray(preds_BxN - batch.ys_BxN, np.float64))
  np.testing.assert_allclose(loss, errors_BxN.mean() if positions == "all" else errors_BxN[:, -1].mean(), rtol=1e-5)


def test_clip_per_matrix():
  grads = {"a": jnp.full((2, 2), 3.0), "b": jnp.full((3,), 1e-3), "c": jnp.zeros((2,))}
  clipped, _ = optim.clip_per_matrix(0.01).update(grads, optim.clip_per_matrix(0.01).init(grads))
  np.testing.assert_allclose(np.linalg.norm(clipped["a"]), 0.01, rtol=1e-6)
  np.testing.assert_allclose(clipped["a"], grads["a"] * 0.01 / 6.0, rtol=1e-6)  # Direction kept.
  np.testing.assert_array_equal(clipped["b"], grads["b"])  # Norm 1.7e-3 < 0.01: untouched.
  np.testing.assert_array_equal(clipped["c"], 0.0)
  # Off by default: the same optimiser (and state) as before.
  default = linreg.get_config().train
  params = {"w": jnp.ones((3,))}
  before = optax.adam(optim.learning_rate_schedule(default), default.adam_b1, default.adam_b2, default.adam_eps)
  assert jax.tree.structure(optim.make_optimizer(default).init(params)) == jax.tree.structure(before.init(params))
  # On: Adam sees the clipped gradients. Two steps, the first clipped (norm 8.7 > 0.01) and the second not
  # (norm 1.7e-3): Adam's first update is the sign of any gradient, the second depends on the first's size.
  default.clip_per_matrix = 0.01
  grads = [{"w": jnp.full((3,), 5.0)}, {"w": jnp.full((3,), 1e-3)}]
  seen_by_adam = [{"w": jnp.full((3,), 5.0 * 0.01 / np.sqrt(75.0))}, grads[1]]

  def updates_of(optimizer, sequence):
    state, out = optimizer.init(params), []
    for g in sequence:
      update, state = optimizer.update(g, state, params)
      out.append(np.asarray(update["w"]))
    return out

  clipped = updates_of(optim.make_optimizer(default), grads)
  np.testing.assert_allclose(clipped[1], updates_of(before, seen_by_adam)[1], rtol=1e-5)
  unclipped = updates_of(before, grads)[1]
  assert np.all(np.abs(clipped[1] - unclipped) > 0.1 * np.abs(unclipped))  # Clipping changed the update (by 17%).


def test_step_decay_schedule():
  t = ml_collections.ConfigDict(
    {
      "learning_rate": 0.02,
      "warmup_steps": 0,
      "num_steps": 30_000,
      "schedule": "step_decay",
      "decay_every": 2000,
      "decay_factor": 0.5,
    }
  )
  schedule = optim.learning_rate_schedule(t)
  for step, expected in ((0, 0.02), (1999, 0.02), (2000, 0.01), (4001, 0.005)):
    np.testing.assert_allclose(schedule(step), expected, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Configuration checks.


@pytest.mark.parametrize(
  "field, value, expected",
  [
    (
      "task.w_distribution",
      "sigma",
      "config.task.w_distribution = 'sigma': allowed values are 'identity', 'inverse_covariance'",
    ),
    ("task.resample_every", 0, "config.task.resample_every = 0: must be an integer >= 1"),
    (
      "task.eigenvalues",
      (1.0, 1.0),
      "config.task.eigenvalues = (1.0, 1.0): with config.task.spectrum = 'explicit' "
      "must be a tuple of config.task.n_dims = 5 numbers > 0",
    ),
    ("task.eigenvalues", (1.0, 1.0, 0.0, 1.0, 1.0), "config.task.eigenvalues = (1.0, 1.0, 0.0, 1.0, 1.0)"),
    ("task.rotation_seed", -1, "config.task.rotation_seed = -1: must be an integer >= 0"),
    (
      "task.rotation",
      "always",
      "config.task.rotation = 'always': allowed values are 'per_prompt', 'per_batch', 'per_run'",
    ),
    ("task.spectrum", "flat", "allowed values are 'two_level', 'log_spaced', 'explicit'"),
    ("train.loss_positions", "first", "config.train.loss_positions = 'first': allowed values are 'all', 'last'"),
    ("train.clip_per_matrix", -0.1, "config.train.clip_per_matrix = -0.1: must be a number >= 0.0"),
    ("train.decay_every", 0, "config.train.decay_every = 0: must be an integer >= 1"),
    (
      "train.decay_factor",
      1.5,
      "config.train.decay_factor = 1.5: with config.train.schedule = 'step_decay' must be a number in (0, 1]",
    ),
    ("train.schedule", "steps", "'constant', 'cosine', 'linear', 'step_decay'"),
    ("model.lsa_init_std", -1.0, "config.model.lsa_init_std = -1.0: must be a number >= 0"),
  ],
)
def test_invalid_field_is_named(field, value, expected):
  assert_field_error(lsa_config.get_config(), field, value, expected)


def test_lsa_model_fields_are_checked():
  model = ml_collections.ConfigDict({"family": "lsa", "num_layers": 0, "lsa_sparse": "yes", "lsa_init_std": 1e-4})
  errors = lsa.validate(model, None)
  assert "config.model.num_layers = 0: must be an integer >= 1" in errors[0]
  assert "config.model.lsa_sparse = 'yes': allowed values are True" in errors[1]


def test_configs_are_valid():
  for variant in ("paper", "quick"):
    assert evaluate.config_errors(lsa_config.get_config(variant), num_devices=8) == []
  assert evaluate.config_errors(linreg.get_config(), num_devices=8) == []
  # The new fields are optional: a config without them means their defaults.
  config = linreg.get_config()
  for field in ("w_distribution", "resample_every"):
    del config.task[field]
  for field in ("loss_positions", "clip_per_matrix"):
    del config.train[field]
  assert evaluate.config_errors(config, num_devices=8) == []


# ---------------------------------------------------------------------------------------------------------------
# The analysis.


def test_identity_fit():
  alpha, dist = lsa_analysis.identity_fit(-0.7 * np.eye(5))
  assert alpha == pytest.approx(-0.7) and dist == pytest.approx(0.0, abs=1e-12)
  alpha, dist = lsa_analysis.identity_fit(np.diag([1.0, -1.0]))  # Traceless: no multiple of I helps.
  assert alpha == pytest.approx(0.0) and dist == pytest.approx(1.0)


def test_read_off_recovers_planted_multiples_of_sigma_inverse():
  task = _ahn_task()
  sigma = np.asarray(data.covariance_matrix(task), np.float64)
  planted_a = (-0.69, -0.43, -1.71)
  params = {f"layer_{i}": {"A": jnp.asarray(a * np.linalg.inv(sigma), jnp.float32)} for i, a in enumerate(planted_a)}
  report = lsa_analysis.layer_report(params, sigma)
  np.testing.assert_allclose([r["a"] for r in report], planted_a, rtol=1e-4)
  np.testing.assert_allclose([r["dist"] for r in report], 0.0, atol=1e-4)
  assert all(r["dist_unscaled"] > 0.3 for r in report)  # Sigma^-1 is far from a multiple of I.
  # A non-symmetric A and a full-form B are read off as stored (Ahn et al.'s code's orientation).
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
  full = {"layer_0": {"A": jnp.asarray(a, jnp.float32), "B": jnp.asarray(b, jnp.float32)}}
  np.testing.assert_allclose(lsa_analysis.read_off(full)[0], a, rtol=1e-6)
  report = lsa_analysis.layer_report(full, np.eye(5))
  assert report[0]["b"] == pytest.approx(np.trace(b) / 5, rel=1e-5)


def test_quick_train_and_analysis_end_to_end(tmp_path):
  config = _tiny_lsa(learning_rate=0.05)
  config.train.update(num_steps=30, batch_size=64, steps_per_dispatch=30, checkpoint_every=30)
  config.eval.num_prompts = 128
  train.train_and_evaluate(config, tmp_path, devices=jax.devices()[:1])
  results = evaluate.evaluate(config, tmp_path)  # What --mode=eval runs: the family's own analysis.
  assert not (tmp_path / "eval").exists()
  out = tmp_path / "lsa_analysis"
  for name in ("results.json", "lsa_analysis.png", "lsa_analysis.pdf", "lsa_matrices.png", "lsa_matrices.pdf"):
    assert (out / name).stat().st_size > 0
  saved = json.loads((out / "results.json").read_text())
  assert saved["step"] == 30 and len(saved["a"]) == len(saved["dist"]) == 3
  assert saved["paper"]["a"] == [-0.69, -0.43, -1.71]
  loss = saved["test_loss"]
  for name in ("lsa", "preconditioned_gd", "gd", "preconditioned_gd_learned_steps", "least_squares", "zero"):
    assert len(loss[name]["mean"]) == config.task.n_points
  assert loss["preconditioned_gd"]["learning_rate"] in lsa_analysis.STEP_GRID
  assert loss["least_squares"]["mean"][-1] < 1e-6  # Noiseless, n = 7 > d = 5: exact.
  assert results["final_test_loss"]["lsa"] < loss["zero"]["mean"][-1]  # It learned something in 30 steps.
  assert len(lsa_analysis.summary_lines(results)) == 4
