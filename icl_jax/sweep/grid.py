"""A depth x kappa x seed grid of runs (configs/sweep_depth_kappa.py), trained and evaluated resumably.

Each run has its own workdir, ROOT/L{depth}_kappa{kappa}_seed{seed}, with everything a single run writes. Runs
of equal depth train together (`train.train_runs`); a finished run is skipped, an interrupted one resumes from its
checkpoints. `run_sweep` takes every N-th group of runs (a shard), so N processes or machines share a sweep.
"""

import jax
import ml_collections
from absl import logging

from icl_jax import checkpointing
from icl_jax import train
from icl_jax.analysis import evaluate
from icl_jax.runtime import distributed
from icl_jax.runtime import errors
from icl_jax.runtime import storage


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
  found = []
  for field, kind in (("num_layers", int), ("kappa", (int, float)), ("seeds", int)):
    values = sweep.get(field) if sweep is not None else None
    if not (isinstance(values, (tuple, list)) and values and all(isinstance(v, kind) for v in values)):
      found.append(f"config.sweep.{field} = {values!r}: must be a non-empty tuple of numbers")
  if found:
    raise errors.ConfigError("invalid sweep:\n  " + "\n  ".join(found))
  runs = expand(config)
  for run in runs:
    try:
      evaluate.validate(run, jax.device_count())
    except (errors.ConfigError, distributed.DistributedFlagError) as e:
      raise errors.ConfigError(f"run {run_name(run)}: {e}") from e
  return runs


def is_trained(run: ml_collections.ConfigDict, workdir: storage.Path) -> bool:
  return checkpointing.latest_step(run, workdir) == run.train.num_steps and (workdir / "error_curve.json").exists()


def run_sweep(config: ml_collections.ConfigDict, root: storage.Path, shard: tuple[int, int] = (0, 1)) -> bool:
  """Trains and evaluates this shard's groups of runs, skipping what is done. Returns False if a SIGTERM
  stopped it (the group's checkpoints saved; no later group starts), True when every group is done."""
  runs = validate(config)
  index, count = shard
  for g, group in enumerate(train.split_into_groups(runs)):
    if g % count != index:
      continue
    workdirs = {i: root / run_name(runs[i]) for i in group}
    pending = [i for i in group if not is_trained(runs[i], workdirs[i])]
    logging.info("Group %d: %d runs, %d to train.", g, len(group), len(pending))
    if pending:
      results = train.train_runs([runs[i] for i in pending], [workdirs[i] for i in pending])
      if any(r["preempted"] for r in results):
        logging.info("Group %d stopped by SIGTERM; the sweep stops here (rerun to resume).", g)
        return False
    if config.sweep.evaluate:
      for i in group:
        if not (workdirs[i] / "eval" / "results.json").exists():
          evaluate.evaluate(runs[i], workdirs[i])
  return True
