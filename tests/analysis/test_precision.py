"""Every matrix product of the analysis runs at HIGHEST precision, so it computes the same numbers on CPU, GPU
(where JAX's default float32 matmul is TF32) and TPU (bf16 passes). CI sees only CPUs, so the guarantee is
checked in the programs themselves: each analysis program is lowered, and every dot_general in it must carry
precision = [HIGHEST, HIGHEST]."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import lsa as lsa_config
from icl_jax import models
from icl_jax.analysis import algorithms
from icl_jax.analysis import lsa_analysis
from icl_jax.analysis import probes
from icl_jax.analysis import probing
from icl_jax.analysis import similarity

B, N, D, L, Q = 2, 6, 3, 2, 4
XS, YS = jnp.ones((B, N, D)), jnp.ones((B, N))


def _dot_precisions(fn, *args) -> list[str]:
  """The precision of every dot_general in `fn`'s lowered program, as called from a caller's own jit."""
  text = jax.jit(fn).lower(*args).as_text()
  return re.findall(r"stablehlo\.dot_general.*?precision = \[(\w+), (\w+)\]", text)


def _assert_highest(fn, *args) -> None:
  precisions = _dot_precisions(fn, *args)
  assert precisions, "no matrix product found: the check would be vacuous"
  assert all(p == ("HIGHEST", "HIGHEST") for p in precisions), precisions


ALGORITHMS = {
  "least_squares": lambda x, y: algorithms.least_squares(x, y, 0.1),
  "iterative_newton": lambda x, y: algorithms.iterative_newton(x, y, 3),
  "gradient_descent": lambda x, y: algorithms.gradient_descent(x, y, (1, 5), 0.01, "mean", jnp.eye(D)),
  "conjugate_gradient": lambda x, y: algorithms.conjugate_gradient(x, y, 3),
  "bfgs": lambda x, y: algorithms.bfgs(x, y, 3),
  "lbfgs": lambda x, y: algorithms.lbfgs(x, y, 3, 2),
  "online_gradient_descent": lambda x, y: algorithms.online_gradient_descent(x, y, 0.1, jnp.ones(D)),
  "predict": lambda x, y: algorithms.predict(algorithms.least_squares(x, y), x),
}


@pytest.mark.parametrize("name", ALGORITHMS)
def test_algorithms_run_at_highest_precision(name):
  _assert_highest(ALGORITHMS[name], XS, YS)


def test_the_check_sees_default_precision():
  """Not vacuous: a plain product lowers with DEFAULT."""
  assert _dot_precisions(lambda x: x @ x.T, jnp.ones((3, 3))) == [("DEFAULT", "DEFAULT")]


def test_similarities_run_at_highest_precision():
  preds = jnp.ones((L, B, N))
  _assert_highest(lambda p, y: similarity.error_cosines(p, p, y, first=0), preds, YS)
  _assert_highest(lambda w: similarity.weight_cosines(w, w), jnp.ones((L, B, N, D)))
  _assert_highest(lambda q, p: similarity.induced_weights(q, p), jnp.ones((B, N, Q, D)), jnp.ones((L, B, N, Q)))


def _tiny_programs(tiny, readout="least_squares"):
  tiny.eval.readout = readout
  model = models.build_model(tiny.model)
  params = model.init(
    jax.random.key(0), jnp.zeros((1, tiny.task.n_points, tiny.task.n_dims)), jnp.zeros((1, tiny.task.n_points))
  )["params"]
  return probing._Programs(tiny, model), model, params


def test_evaluator_programs_run_at_highest_precision(tiny):
  programs, model, params = _tiny_programs(tiny)
  n, d, w = tiny.task.n_points, tiny.task.n_dims, tiny.model.width
  readouts = {"kernel": jnp.ones((tiny.model.num_layers, w)), "bias": jnp.ones((tiny.model.num_layers,))}
  xs, ys = jnp.ones((2, n, d)), jnp.ones((2, n))
  _assert_highest(programs.layer_chunk, params, readouts, xs, ys)
  _assert_highest(programs.sim_w_chunk, params, readouts, xs, ys, jnp.ones((2, n, 3, d)))
  _assert_highest(lambda x: probing._largest_hessian_eigenvalue(x, jnp.ones((n, n)), 0.0, False), xs)
  _assert_highest(lambda r, s: probes.apply(r, s), readouts, jnp.ones((tiny.model.num_layers, 2, n, w)))


def test_probe_programs_run_at_highest_precision(tiny):
  _, model, params = _tiny_programs(tiny)
  _assert_highest(probes.feature_batches(tiny, model), params, jax.random.key(0), 0)
  tiny.eval.update(readout="trained", probe_steps=2)
  _assert_highest(probes.make_fitter(tiny, model), params, jax.random.key(0))


def test_lsa_analysis_programs_run_at_highest_precision():
  config = lsa_config.get_config("quick")
  model = models.build_model(config.model)
  n, d = config.task.n_points, config.task.n_dims
  params = model.init(jax.random.key(0), jnp.zeros((1, n, d)), jnp.zeros((1, n)))["params"]
  xs, ys = jnp.ones((2, n, d)), jnp.ones((2, n))
  _assert_highest(lsa_analysis.model_predictions(model, params), xs, ys)
  _assert_highest(lsa_analysis.gd_predictions(3, jnp.eye(d)), xs, ys, jnp.float32(0.1))
  np.testing.assert_array_equal(lsa_analysis.gd_predictions(1, jnp.eye(d))(xs, ys, 0.0), 0.0)
