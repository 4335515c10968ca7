"""The pure training step's losses: Ahn et al.'s last position against Garg et al.'s every position."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import lsa as lsa_config
from icl_jax import data
from icl_jax import models
from icl_jax import optim
from icl_jax import train
from icl_jax import train_step
from icl_jax.models import lsa


def _model(num_layers=3, sparse=False, init_std=0.1):
  return lsa.LSARegressor(
    ml_collections.ConfigDict(
      {"family": "lsa", "num_layers": num_layers, "lsa_sparse": sparse, "lsa_init_std": init_std}
    )
  )


def _prompts(seed, b, n, d):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k1, (b, n, d)), jax.random.normal(k2, (b, n))


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
