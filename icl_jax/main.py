"""Command line: `python -m icl_jax.main --config=configs/linreg.py --workdir=DIR [--config.FIELD=VALUE ...]`.

Kept short on purpose: the logic lives in library functions (`icl_jax.train.train_and_evaluate`) that tests
and notebooks import.
"""

import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from icl_jax import checkpointing
from icl_jax import cli
from icl_jax import train
from icl_jax.analysis import evaluate
from icl_jax.runtime import distributed
from icl_jax.runtime import errors
from icl_jax.runtime import run_logs

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  cli.CONFIG_HELP,
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_MODE = flags.DEFINE_enum(
  "mode",
  "train",
  ["train", "eval"],
  "train: train (or resume) the run in --workdir; eval: evaluate its latest checkpoint "
  "layer by layer, writing WORKDIR/eval/results.json and figures (without --config, with the run's own "
  "WORKDIR/config.json).",
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
  "allow_config_change", False, "Resume a workdir even if its saved config differs from this one."
)
_DISTRIBUTED_FLAGS = distributed.define_flags()
flags.adopt_module_key_flags(distributed)  # --help lists them too.
flags.mark_flags_as_required(["workdir"])


def _refuse_distributed_eval() -> None:
  given = [
    f"--{name}"
    for name in ("coordinator_address", "num_processes", "process_id")
    if _DISTRIBUTED_FLAGS[name].value is not None
  ]
  if _DISTRIBUTED_FLAGS["distributed"].value in ("auto", "explicit"):
    given.insert(0, f"--distributed={_DISTRIBUTED_FLAGS['distributed'].value}")
  if given:
    raise distributed.DistributedFlagError(f"--mode=eval runs in one process on one device; drop {', '.join(given)}.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run_logs.quiet_orbax()
  if _CONFIG.value is None and _MODE.value == "train":
    raise app.UsageError("--config is required to train (e.g. --config=configs/linreg.py:quick)")
  try:
    if _MODE.value == "train":
      distributed.initialize_from_flags(_DISTRIBUTED_FLAGS)
      result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
      if result["preempted"]:
        logging.info(
          "Stopped by SIGTERM at step %d with a checkpoint; exit status %d (rerun to resume).",
          result["step"],
          errors.EXIT_PREEMPTED,
        )
        sys.exit(errors.EXIT_PREEMPTED)
    else:
      _refuse_distributed_eval()
      config = _CONFIG.value if _CONFIG.value is not None else checkpointing.load_saved_config(_WORKDIR.value)
      evaluate.evaluate(config, _WORKDIR.value)  # Validates the config for one device first.
  except errors.UserError as e:
    cli.exit_with_error(e)


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main, flags_parser=cli.parse_flags)
