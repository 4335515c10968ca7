"""Fu et al. §4.3: the paper's set-up on ill-conditioned data, Cov(x) with condition number 100.

  python -m icl_jax.main --config=configs/linreg_ill_conditioned.py --workdir=runs/kappa100
  python -m icl_jax.main --config=configs/linreg_ill_conditioned.py:quick --workdir=runs/kappa100_quick
"""

from ml_collections import config_dict

from configs import linreg


def get_config(variant: str = "paper") -> config_dict.ConfigDict:
  config = linreg.get_config(variant)
  # Half the eigenvalues 100c, half c, trace normalised to d, a fresh eigenbasis for each prompt: the
  # distribution as the paper states it (Fu et al.'s code shares one eigenbasis per batch: task.rotation).
  config.task.kappa = 100.0
  return config
