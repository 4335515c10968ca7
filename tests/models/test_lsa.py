"""Ahn et al.'s linear self-attention (models/lsa.py): the construction of preconditioned GD, every prefix, the
registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import lsa as lsa_config
from icl_jax import models
from icl_jax.analysis import algorithms
from icl_jax.analysis import constructions
from icl_jax.models import lsa
from tests import helpers


def test_construction_weights_give_preconditioned_gd_at_the_last_position():
  n, d, num_layers = 16, 4, 3
  xs, ys = helpers.random_prompts(0, 8, n + 1, d)
  rng = np.random.default_rng(0)
  factor = rng.normal(size=(d, d))
  g_DxD = jnp.asarray(0.05 * factor @ factor.T + 0.1 * np.eye(d), jnp.float32)
  params = lsa.params_from_preconditioners([g_DxD] * num_layers)
  # The parameters embed as exactly the construction's weights.
  for mine, theirs in zip(lsa.matrices(params), constructions.preconditioned_gd_lsa_weights([g_DxD] * num_layers)):
    for a, b in zip(mine, theirs):
      np.testing.assert_array_equal(a, b)
  preds_BxN = helpers.lsa_model(num_layers, sparse=True).apply({"params": params}, xs, ys)
  w_BxD = algorithms.gradient_descent(xs[:, :n], ys[:, :n], (num_layers,), 1.0, "mean", g_DxD)[:, 0, -1]
  np.testing.assert_allclose(preds_BxN[:, -1], jnp.einsum("bd,bd->b", w_BxD, xs[:, n]), rtol=1e-4, atol=1e-5)
  # Every prefix is preconditioned GD on its own points (1/t scaling = "mean" gradient over t points).
  prefix_BxN = algorithms.predict(algorithms.gradient_descent(xs, ys, (num_layers,), 1.0, "mean", g_DxD), xs)[:, 0]
  np.testing.assert_allclose(preds_BxN, prefix_BxN, rtol=1e-4, atol=1e-5)


def test_per_layer_preconditioners_match_the_construction():
  n, d = 12, 5
  xs, ys = helpers.random_prompts(1, 6, n + 1, d)
  rng = np.random.default_rng(1)
  gs = [jnp.asarray(0.1 * np.eye(d) + 0.03 * rng.normal(size=(d, d)), jnp.float32) for _ in range(4)]
  preds_B = helpers.lsa_model(4, sparse=True).apply({"params": lsa.params_from_preconditioners(gs)}, xs, ys, position=n)
  z = constructions.lsa_forward(
    constructions.lsa_prompt(xs[:, :n], ys[:, :n], xs[:, n]), *constructions.preconditioned_gd_lsa_weights(gs)
  )
  np.testing.assert_allclose(preds_B, constructions.lsa_prediction(z), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sparse", [False, True])
def test_every_prefix_equals_the_lsa_run_on_that_prefix_alone(sparse):
  n, d, num_layers = 6, 3, 2
  xs, ys = helpers.random_prompts(2, 4, n, d)
  model = helpers.lsa_model(num_layers, sparse)
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
  xs, ys = helpers.random_prompts(4, 1, 21, 5)
  params = model.init(jax.random.key(0), xs, ys)["params"]
  assert set(params["layer_0"]) == {"A"}  # configs/lsa.py: the sparse form.
  values = np.concatenate([np.ravel(p) for p in jax.tree.leaves(params)])
  assert 0.5e-4 < values.std() < 2e-4  # N(0, (1e-4)^2): the code's var is the std.
