"""How do depth and conditioning change what each layer computes? A grid of runs from one command.

  python -m icl_jax.sweep --config=configs/sweep_depth_kappa.py --root=runs/sweep          # the full grid
  python -m icl_jax.sweep --config=configs/sweep_depth_kappa.py:quick --root=runs/sweep_q  # 2-core CPU

Every field of configs/linreg.py applies to all runs; `sweep.*` lists the values each run takes. Runs that
share a depth (and so every shape) train together as one vmapped program (icl_jax/sweep/multi_train.py).
"""

from ml_collections import config_dict

from icl_jax.runtime import config_files

linreg = config_files.load("linreg.py", next_to=__file__)


def get_config(variant: str = "paper") -> config_dict.ConfigDict:
  """The grid around configs/linreg.py's paper settings ("paper") or its laptop size ("quick")."""
  if variant not in ("paper", "quick"):
    raise ValueError(f"configs/sweep_depth_kappa.py: unknown variant {variant!r}; allowed: 'paper', 'quick'.")
  config = linreg.get_config(variant)
  config.sweep = sweep = config_dict.ConfigDict()
  sweep.num_layers = (1, 2, 3, 4, 6, 8, 12, 16, 24)  # config.model.num_layers of each run.
  sweep.kappa = (1.0, 10.0, 100.0, 1000.0)  # config.task.kappa of each run.
  sweep.seeds = (0, 1, 2)  # config.seed of each run; intervals across seeds need two or more.
  # Every run is evaluated layer by layer when trained (`--mode=eval` on its workdir), for the report.
  sweep.evaluate = True
  if variant == "quick":
    sweep.num_layers = (1, 2, 4)
    sweep.kappa = (1.0, 100.0)
    sweep.seeds = (0,)
    config.train.num_steps = 3000
    config.train.checkpoint_every = 500
    config.eval.num_prompts = 640
  return config
