"""The pure training step's losses: Ahn et al.'s last position against Garg et al.'s every position."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icl_jax import data
from icl_jax import train_step
from tests import helpers


def test_last_position_loss_is_the_masked_last_column():
  xs, ys = helpers.random_prompts(5, 6, 7, 3)
  batch = data.Batch(xs, ys, jnp.zeros((6, 3)))
  model = helpers.lsa_model(2)
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
  config = helpers.tiny_lsa_config(steps_per_dispatch=1)
  config.train.loss_positions = positions
  (loss,), model, state = helpers.chunk_losses(config, 1, num_devices=1)
  batch = data.sample_batch(data.step_key(jax.random.wrap_key_data(state.data_key), 0), 0, 16, config.task, 5)
  preds_BxN = model.apply({"params": state.params}, batch.xs_BxNxD, batch.ys_BxN)
  errors_BxN = np.square(np.asarray(preds_BxN - batch.ys_BxN, np.float64))
  np.testing.assert_allclose(loss, errors_BxN.mean() if positions == "all" else errors_BxN[:, -1].mean(), rtol=1e-5)
