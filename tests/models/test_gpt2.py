"""GPT-2 regressor: parameter count, shapes, causality and the Hugging Face hidden-state convention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import linreg
from icl_jax import models
from icl_jax.models import gpt2


def _init(config, batch=2, seed=0):
  model = models.build_model(config.model)
  xs = jax.random.normal(jax.random.key(seed), (batch, config.task.n_points, config.task.n_dims))
  ys = jax.random.normal(jax.random.key(seed + 1), (batch, config.task.n_points))
  params = model.init(jax.random.key(2), xs, ys)["params"]
  return model, params, xs, ys


def test_paper_model_has_garg_et_al_parameter_count():
  config = linreg.get_config()
  model = models.build_model(config.model)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 41, 20)), jnp.zeros((1, 41)))
  count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes["params"]))
  # 12 blocks x (12 D^2 + 13 D) + wpe 202 x 256 + ln_f + read-in 20 -> 256 + read-out 256 -> 1 (papers.md §1.2).
  assert count == 12 * (12 * 256**2 + 13 * 256) + 202 * 256 + 2 * 256 + (20 * 256 + 256) + 257 == 9_534_977


@pytest.fixture(scope="module")
def quick():
  config = linreg.get_config("quick")
  return (config, *_init(config))


def test_shapes_and_hidden_states(quick):
  config, model, params, xs, ys = quick
  preds, hidden = model.apply({"params": params}, xs, ys, return_hidden=True)
  assert preds.shape == (2, 11)
  assert hidden.shape == (config.model.num_layers + 1, 2, 22, config.model.width)


def test_predictions_alone_skip_unused_work_and_agree_with_the_full_pass(quick):
  # Without hidden states the forward drops y_N and runs the last block at the x positions only.
  _, model, params, xs, ys = quick
  preds, _ = model.apply({"params": params}, xs, ys, return_hidden=True)
  np.testing.assert_allclose(model.apply({"params": params}, xs, ys), preds, rtol=1e-5, atol=1e-6)


def test_hugging_face_convention_only_last_hidden_state_is_normalised(quick):
  _, model, params, xs, ys = quick
  preds, hidden = model.apply({"params": params}, xs, ys, return_hidden=True)
  # The last entry is the read-out's input: applying the read-out to it gives the predictions.
  read_out = params["read_out"]
  np.testing.assert_allclose(
    hidden[-1][:, ::2] @ read_out["kernel"][:, 0] + read_out["bias"][0], preds, rtol=1e-5, atol=1e-5
  )
  # ln_f has scale 1 and bias 0 at initialisation: only the last entry has zero mean and unit variance per token.
  assert np.allclose(hidden[-1].mean(-1), 0, atol=1e-5) and np.allclose(hidden[-1].var(-1), 1, atol=1e-3)
  for layer in range(hidden.shape[0] - 1):
    assert not np.allclose(hidden[layer].var(-1), 1, atol=1e-2)


def test_predictions_are_causal(quick):
  _, model, params, xs, ys = quick
  preds = model.apply({"params": params}, xs, ys)
  k = 4  # Changing x_{k+1} and y_k must leave the predictions for y_0..y_k unchanged, and change later ones.
  preds2 = model.apply({"params": params}, xs.at[:, k + 1].add(1.0), ys.at[:, k].add(1.0))
  np.testing.assert_array_equal(preds[:, : k + 1], preds2[:, : k + 1])
  assert not np.allclose(preds[:, k + 1 :], preds2[:, k + 1 :])


def test_tokens_interleave_x_and_padded_y():
  xs = jnp.arange(12.0).reshape(1, 2, 6) + 1
  tokens = gpt2.interleave(xs, jnp.asarray([[-1.0, -2.0]]))
  np.testing.assert_array_equal(tokens[0, 0], xs[0, 0])
  np.testing.assert_array_equal(tokens[0, 1], [-1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(tokens[0, 2], xs[0, 1])
  np.testing.assert_array_equal(tokens[0, 3], [-2, 0, 0, 0, 0, 0])


def test_query_stream_equals_putting_each_query_in_place_of_x_n(quick):
  config, model, params, xs, ys = quick
  queries = jax.random.normal(jax.random.key(7), (2, 11, 3, 5))
  out = model.apply({"params": params}, xs, ys, queries=queries)
  preds, hidden = model.apply({"params": params}, xs, ys, return_hidden=True)
  np.testing.assert_allclose(out.preds_BxN, preds, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out.hidden_Lx, hidden, rtol=1e-5, atol=1e-5)
  assert out.query_hidden_Lx.shape == (config.model.num_layers + 1, 2, 11, 3, config.model.width)
  for n in (0, 4, 10):
    for q in range(3):
      replaced = model.apply({"params": params}, xs.at[:, n].set(queries[:, n, q]), ys, return_hidden=True)
      np.testing.assert_allclose(out.query_preds_BxNxQ[:, n, q], replaced[0][:, n], rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(out.query_hidden_Lx[:, :, n, q], replaced[1][:, :, 2 * n], rtol=1e-4, atol=1e-4)


def test_bfloat16_computes_matmuls_in_bfloat16_and_the_rest_in_float32(quick):
  """config.model.dtype = "bfloat16": the same float32 parameters; matmuls take bfloat16 inputs; softmax (exp),
  LayerNorm (rsqrt) and the read-out stay float32; predictions are float32 and close to float32's."""
  config, model, params, xs, ys = quick
  bf16_config = linreg.get_config("quick")
  bf16_config.model.dtype = "bfloat16"
  bf16 = models.build_model(bf16_config.model)
  bf16_params = bf16.init(jax.random.key(2), xs, ys)["params"]
  assert jax.tree.map(lambda p: (p.shape, p.dtype), bf16_params) == jax.tree.map(lambda p: (p.shape, p.dtype), params)
  preds = bf16.apply({"params": params}, xs, ys)
  assert preds.dtype == jnp.float32
  # bfloat16 keeps 8 significant bits (relative rounding 2^-9 per operation); 4 layers of matmuls with
  # float32 accumulation stay within a few percent. Tolerance set at 5% before measuring.
  reference = model.apply({"params": params}, xs, ys)
  assert np.linalg.norm(preds - reference) / np.linalg.norm(reference) < 0.05
  jaxpr = jax.make_jaxpr(lambda p: bf16.apply({"params": p}, xs, ys))(params).jaxpr
  equations = list(_equations(jaxpr))
  dots = [e for e in equations if e.primitive.name == "dot_general"]
  bf16_dots = [e for e in dots if all(v.aval.dtype == jnp.bfloat16 for v in e.invars)]
  # Every block's 4 dense layers, 2 attention matmuls, and the read-in; only the read-out is float32.
  assert len(bf16_dots) == 6 * config.model.num_layers + 1 and len(dots) == len(bf16_dots) + 1
  for name in ("exp", "rsqrt"):
    assert {e.outvars[0].aval.dtype for e in equations if e.primitive.name == name} == {jnp.dtype(jnp.float32)}
  outputs = bf16.apply({"params": params}, xs, ys, queries=xs[:, :, None].repeat(2, axis=2))
  assert outputs.query_preds_BxNxQ.dtype == jnp.float32 and np.all(np.isfinite(outputs.query_preds_BxNxQ))


def test_mixed_matmul_gradients_are_the_matmuls_of_the_rounded_operands():
  """gpt2.mixed_matmul's custom gradients: in float32 exactly JAX's own; in bfloat16 the float32 products of the
  bfloat16-rounded operands and cotangent (the input's gradient then rounded to bfloat16). Tolerances set before
  measuring: float32 reassociation (1e-6) and one bfloat16 rounding (2^-8)."""
  x_BxTxK = jax.random.normal(jax.random.key(0), (3, 5, 16))
  kernel_KxF = jax.random.normal(jax.random.key(1), (16, 8))
  w_BxTxF = jax.random.normal(jax.random.key(2), (3, 5, 8))
  plain = lambda x, k: jnp.sum(w_BxTxF * jnp.einsum("btk,kf->btf", x, k))
  for dtype in (jnp.float32, jnp.bfloat16):
    mixed = lambda x, k: jnp.sum(w_BxTxF * gpt2.mixed_matmul(x, k, dtype))
    x = x_BxTxK.astype(dtype)
    dx, dkernel = jax.grad(mixed, argnums=(0, 1))(x, kernel_KxF)
    assert dx.dtype == dtype and dkernel.dtype == jnp.float32
    if dtype == jnp.float32:
      dx_reference, dkernel_reference = jax.grad(plain, argnums=(0, 1))(x_BxTxK, kernel_KxF)
    else:
      round_trip = lambda a: a.astype(dtype).astype(jnp.float32)
      w = round_trip(w_BxTxF)
      dx_reference = jnp.einsum("btf,kf->btk", w, round_trip(kernel_KxF))
      dkernel_reference = jnp.einsum("btk,btf->kf", round_trip(x_BxTxK), w)
    tolerance = 1e-6 if dtype == jnp.float32 else 2.0**-8
    np.testing.assert_allclose(dx.astype(jnp.float32), dx_reference, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(dkernel, dkernel_reference, rtol=1e-6, atol=1e-5)


def _equations(jaxpr):
  """Every equation of `jaxpr`, inside sub-jaxprs (pjit, custom_jvp, ...) too."""
  for equation in jaxpr.eqns:
    yield equation
    for value in equation.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _equations(inner)


@pytest.mark.parametrize("family", ["lstm", "lsa"])
def test_other_families_refuse_bfloat16(family):
  config = linreg.get_config("quick")
  config.model.family, config.model.dtype = family, "bfloat16"
  assert any(
    "config.model.dtype = 'bfloat16'" in e and "float32 only" in e
    for e in models.REGISTRY[family].validate(config.model, config.task)
  )
