"""Command line: convert Garg et al.'s PyTorch checkpoint into a workdir that `--mode=eval` reads.

  python -m icl_jax.garg_checkpoint --checkpoint=models/linear_regression/pretrained/state.pt \
      --config=configs/linreg.py --workdir=runs/garg

The conversion itself is `icl_jax.garg_checkpoint.convert`; this module only parses flags.
"""

import sys

import jax
from absl import app
from absl import flags
from ml_collections import config_flags

from icl_jax.garg_checkpoint import convert
from icl_jax.runtime import run_logs

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Garg et al.'s state.pt (or a model_STEP.pt).")
_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "The configuration the model is converted into, with the checkpoint's model fields: configs/linreg.py (the paper's).",
  lock_config=False,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config.json and the converted parameters.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", 8, "Attention heads; the weights do not record them.")
flags.mark_flags_as_required(["checkpoint", "config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run_logs.quiet_orbax()
  try:
    params, overrides = convert.load_garg_checkpoint(_CHECKPOINT.value, num_heads=_NUM_HEADS.value)
    convert.write_workdir(
      _WORKDIR.value, params, convert.garg_config(overrides, _CONFIG.value, source=_CHECKPOINT.value)
    )
  except (OSError, ValueError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  num_params = sum(a.size for a in jax.tree.leaves(params))
  print(
    f"Converted {_CHECKPOINT.value} ({num_params:,} parameters; "
    f"{', '.join(f'{k}={v}' for k, v in overrides.items())}) to {_WORKDIR.value}."
  )


if __name__ == "__main__":
  app.run(main)
