"""Runs trained together in one vmapped program get the losses and parameters they get when trained alone."""

import jax
import numpy as np

from icl_jax.sweep import multi_train
from icl_jax import train
from tests import helpers
from tests import tiny_config

SETTINGS = [{"seed": 0, "kappa": 1.0, "noise_std": 0.0}, {"seed": 1, "kappa": 100.0, "noise_std": 0.0},
            {"seed": 0, "kappa": 10.0, "noise_std": 0.1}]


def _config(seed, kappa, noise_std):
  config = tiny_config.get_config()
  config.seed = seed
  config.task.update(kappa=kappa, noise_std=noise_std)
  return config


def test_vmapped_runs_equal_separate_runs(tmp_path):
  configs = [_config(**s) for s in SETTINGS]
  together = [tmp_path / f"together{i}" for i in range(len(configs))]
  results = multi_train.train_group(configs, together)
  for i, config in enumerate(configs):
    alone = train.train_and_evaluate(config, tmp_path / f"alone{i}")
    steps, losses = helpers.losses(together[i])
    alone_steps, alone_losses = helpers.losses(tmp_path / f"alone{i}")
    assert steps == alone_steps
    np.testing.assert_allclose(losses, alone_losses, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results[i]["error_curve"]["error_per_dim"], alone["error_curve"]["error_per_dim"],
                               rtol=1e-4)
    a = jax.device_get(helpers.final_state(config, together[i]).params)
    b = jax.device_get(helpers.final_state(config, tmp_path / f"alone{i}").params)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), a, b)
  # The runs really differ from each other.
  assert not np.allclose(helpers.losses(together[0])[1], helpers.losses(together[1])[1])


def test_groups_split_on_anything_but_seed_kappa_and_noise():
  configs = [_config(**s) for s in SETTINGS]
  deeper = _config(0, 1.0, 0.0)
  deeper.model.num_layers = 3
  assert multi_train.split_into_groups(configs + [deeper]) == [[0, 1, 2], [3]]
