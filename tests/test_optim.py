"""The optimiser's options of Ahn et al.'s setting: per-matrix clipping and the step-decay schedule."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from configs import linreg
from icl_jax import optim


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
