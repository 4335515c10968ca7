"""`python -m icl_jax.sweep --config=configs/sweep_depth_kappa.py --root=DIR`: a grid of runs, resumable.

Each run (depth x kappa x seed) has its own workdir, ROOT/L{depth}_kappa{kappa}_seed{seed}, with everything a
single run writes. Runs of equal depth train together (icl_jax/multi_train.py); a finished run is skipped, an
interrupted one resumes from its checkpoints. Each finished run is then evaluated layer by layer, and
ROOT/sweep/ gets the report (icl_jax/sweep_report.py). `--shard=i/N` takes every N-th group of runs, so N
processes on one machine (launch/local_sweep.sh) or N machines share a sweep; `--stage=report` only
re-reads the runs.
"""

import pathlib
import sys

import jax
import ml_collections
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from icl_jax import checkpointing
from icl_jax import config_checks
from icl_jax import distributed
from icl_jax import evaluate
from icl_jax import multi_train
from icl_jax import run_logs

_FLAGS = {}


def _define_flags() -> None:
  """Flags exist only when this module is the program, so that importing it defines none."""
  _FLAGS["config"] = config_flags.DEFINE_config_file(
      "config", None, "Sweep config, e.g. configs/sweep_depth_kappa.py:quick.", lock_config=True)
  _FLAGS["root"] = flags.DEFINE_string("root", None, "Directory of the sweep: one workdir per run, and sweep/ for "
                                       "the report.")
  _FLAGS["shard"] = flags.DEFINE_string("shard", "0/1", "i/N: this process trains and evaluates every N-th group, "
                                        "from the i-th.")
  _FLAGS["stage"] = flags.DEFINE_enum("stage", "all", ["all", "runs", "report"],
                                      "runs: train and evaluate; report: write ROOT/sweep from finished runs; all: "
                                      "both.")
  _FLAGS["distributed"] = distributed.define_flags()
  flags.mark_flags_as_required(["config", "root"])


def run_name(config: ml_collections.ConfigDict) -> str:
  return f"L{config.model.num_layers}_kappa{config.task.kappa:g}_seed{config.seed}"


def expand(config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
  """One config per point of the grid, without the `sweep` section."""
  sweep = config.sweep
  runs = []
  for num_layers in sweep.num_layers:
    for kappa in sweep.kappa:
      for seed in sweep.seeds:
        run = ml_collections.ConfigDict(config.to_dict())
        del run["sweep"]
        run.model.num_layers, run.task.kappa, run.seed = int(num_layers), float(kappa), int(seed)
        # Fit the best-matching steps over the middle layers: all but the first and the last where there are
        # four or more, all of them otherwise.
        run.eval.fit_layers = (2, num_layers - 1) if num_layers >= 4 else (1, num_layers)
        runs.append(run)
  return runs


def validate(config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
  """The runs of the sweep, each checked; one message lists every problem."""
  sweep = config.get("sweep")
  errors = []
  for field, kind in (("num_layers", int), ("kappa", (int, float)), ("seeds", int)):
    values = sweep.get(field) if sweep is not None else None
    if not (isinstance(values, (tuple, list)) and values and all(isinstance(v, kind) for v in values)):
      errors.append(f"config.sweep.{field} = {values!r}: must be a non-empty tuple of numbers")
  if errors:
    raise config_checks.ConfigError("invalid sweep:\n  " + "\n  ".join(errors))
  runs = expand(config)
  for run in runs:
    try:
      config_checks.validate(run, jax.device_count())
    except (config_checks.ConfigError, distributed.DistributedFlagError) as e:
      raise config_checks.ConfigError(f"run {run_name(run)}: {e}") from e
  return runs


def is_trained(run: ml_collections.ConfigDict, workdir: pathlib.Path) -> bool:
  if not (workdir / "checkpoints").exists():
    return False
  with checkpointing.Checkpoints(workdir / "checkpoints", run.train) as checkpoints:
    return checkpoints.latest_step() == run.train.num_steps and (workdir / "error_curve.json").exists()


def run_sweep(config: ml_collections.ConfigDict, root: pathlib.Path, shard: tuple[int, int] = (0, 1)) -> None:
  """Trains and evaluates this shard's groups of runs, skipping what is done."""
  runs = validate(config)
  index, count = shard
  for g, group in enumerate(multi_train.split_into_groups(runs)):
    if g % count != index:
      continue
    workdirs = {i: root / run_name(runs[i]) for i in group}
    pending = [i for i in group if not is_trained(runs[i], workdirs[i])]
    logging.info("Group %d: %d runs, %d to train.", g, len(group), len(pending))
    if pending:
      multi_train.train_group([runs[i] for i in pending], [workdirs[i] for i in pending])
    if config.sweep.evaluate:
      for i in group:
        if not (workdirs[i] / "eval" / "results.json").exists():
          evaluate.evaluate(runs[i], workdirs[i])


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
  from icl_jax import sweep_report

  run_logs.quiet_orbax()
  config, stage = _FLAGS["config"].value, _FLAGS["stage"].value
  root = pathlib.Path(_FLAGS["root"].value)
  try:
    distributed.initialize_from_flags(_FLAGS["distributed"])
    if stage in ("all", "runs"):
      run_sweep(config, root, _parse_shard(_FLAGS["shard"].value))
    if stage in ("all", "report"):
      runs = validate(config)
      sweep_report.write(runs, root, [run_name(r) for r in runs])
  except (config_checks.ConfigError, distributed.DistributedFlagError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  _define_flags()
  jax.config.config_with_absl()
  app.run(main)
