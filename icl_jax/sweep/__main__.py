"""Command line: `python -m icl_jax.sweep --config=configs/sweep_depth_kappa.py --root=DIR`, a grid of runs.

`--shard=i/N` takes every N-th group of runs, so N processes on one machine (launch/local_sweep.sh) or N
machines share a sweep; `--stage=report` only re-reads the finished runs. The logic is `icl_jax.sweep`.
"""

import sys

import jax
from absl import app
from absl import flags
from ml_collections import config_flags

from icl_jax import cli
from icl_jax.runtime import distributed
from icl_jax.runtime import errors
from icl_jax.runtime import run_logs
from icl_jax.runtime import storage
from icl_jax.sweep import grid
from icl_jax.sweep import report

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Sweep config, e.g. configs/sweep_depth_kappa.py:quick.", lock_config=True
)
_ROOT = flags.DEFINE_string("root", None, "Directory of the sweep: one workdir per run, and sweep/ for the report.")
_SHARD = flags.DEFINE_string("shard", "0/1", "i/N: this process trains and evaluates every N-th group, from the i-th.")
_STAGE = flags.DEFINE_enum(
  "stage",
  "all",
  ["all", "runs", "report"],
  "runs: train and evaluate; report: write ROOT/sweep from finished runs; all: both.",
)
_DISTRIBUTED_FLAGS = distributed.define_flags()
flags.adopt_module_key_flags(distributed)  # --help lists them too.
flags.mark_flags_as_required(["config", "root"])


def _parse_shard(text: str) -> tuple[int, int]:
  try:
    index, count = (int(v) for v in text.split("/"))
  except ValueError:
    raise app.UsageError(f"--shard={text!r}: expected i/N, e.g. 0/2") from None
  if not 0 <= index < count:
    raise app.UsageError(f"--shard={text!r}: need 0 <= i < N")
  return index, count


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run_logs.quiet_orbax()
  config, stage, root = _CONFIG.value, _STAGE.value, storage.path(_ROOT.value)
  try:
    distributed.initialize_from_flags(_DISTRIBUTED_FLAGS)
    if stage in ("all", "runs") and not grid.run_sweep(config, root, _parse_shard(_SHARD.value)):
      sys.exit(errors.EXIT_PREEMPTED)  # Stopped by SIGTERM with checkpoints; the report waits for the rerun.
    if stage in ("all", "report"):
      runs = grid.validate(config)
      report.write(runs, root, [grid.run_name(r) for r in runs])
  except errors.UserError as e:
    cli.exit_with_error(e)


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main, flags_parser=cli.parse_flags)
