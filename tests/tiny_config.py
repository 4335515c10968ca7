"""A run small enough to train several times per test on 2 CPU cores, with the curriculum on.

Also usable from the command line: `python -m icl_jax.main --config=tests/tiny_config.py --workdir=DIR`.
"""

from icl_jax.runtime import config_files

linreg = config_files.load("../configs/linreg.py", next_to=__file__)


def get_config():
  config = linreg.get_config()
  config.task.update(n_dims=3, n_points=6)
  config.task.curriculum.update(dims_start=2, dims_interval=3, points_start=4, points_interval=3)
  config.model.update(num_layers=2, num_heads=2, width=16, n_positions=12)
  config.train.update(
    num_steps=8, batch_size=16, learning_rate=1e-3, log_every=1, checkpoint_every=4, steps_per_dispatch=3, keep_period=0
  )
  config.eval.update(
    num_prompts=32,
    batch_size=16,
    probe_prompts=32,
    sim_w_prompts=4,
    sim_w_queries=8,
    newton_steps=5,
    gd_steps=(1, 10, 20),
    gd_log_steps=(1, 2, 4, 8),
    cg_steps=4,
    bfgs_steps=4,
    lbfgs_steps=4,
    lbfgs_memory=2,
    bootstrap_samples=50,
    fit_layers=(1, 2),
  )
  return config
