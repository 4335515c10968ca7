"""Fu et al. 2024's LSTM baseline (App. A.1): a 10-layer unidirectional LSTM of width 256 (5.3M parameters),
"trained in an identical manner" to the transformer, then probed layer by layer like it.

  python -m icl_jax.main --config=configs/lstm.py --workdir=runs/lstm              # the paper's baseline
  python -m icl_jax.main --config=configs/lstm.py:quick --workdir=runs/lstm_quick  # laptop size, minutes
  python -m icl_jax.main --config=configs/lstm.py:quick --workdir=runs/lstm_quick --mode=eval

Task, curriculum, trainer and evaluation are configs/linreg.py's (of the same variant); only the model differs.
The LSTM does not read config.model.num_heads, mlp_ratio, n_positions, layer_norm_epsilon or init_std (it has
no attention, MLP, position table or LayerNorm, and uses torch.nn.LSTM's initialisation), so overriding them
changes nothing.
"""

from ml_collections import config_dict

from icl_jax.runtime import config_files

linreg = config_files.load("linreg.py", next_to=__file__)


def get_config(variant: str = "paper") -> config_dict.ConfigDict:
  """The paper's LSTM baseline, or a named variant of it ("paper", "medium", "quick"). "medium" is the quick
  LSTM on the medium task and schedule."""
  config = linreg.get_config(variant)
  config.model.family = "lstm"  # icl_jax/models/lstm.py: torch.nn.LSTM's cell, read-in and read-out linear.
  if variant in ("quick", "medium"):
    # Shallower than the quick transformer (4 layers): each layer is a sequential scan over the 2N tokens,
    # the CPU's bottleneck, and 3 layers of width 64 keep training to a few minutes on 2 cores.
    config.model.num_layers = 3
    config.model.width = 64  # The quick transformer's width.
    config.eval.fit_layers = (1, 3)  # Every layer: a trend over depth, if any.
  else:
    config.model.num_layers = 10  # Fu et al.: 10 layers.
    config.model.width = 256  # Fu et al.'s 5.3M parameters (5,268,993 with d = 20).
    # Fu et al. find no progression with depth for the LSTM (Fig. 7c), hence no linear stretch to fit: fit
    # over all layers, so the slope says whether steps grow with depth at all.
    config.eval.fit_layers = (1, 10)
  return config
