"""Command line: `python -m icl_jax.reproduce --scale=medium --root=DIR [--seeds=0,1,2]`, the papers' claims graded.

Trains (resuming, skipping finished runs; the seeds of an experiment together, but one after another at the
large scale), evaluates and grades every experiment of the scale (`icl_jax/reproduce/experiments.py`) against
the claims of `icl_jax/reproduce/claims.py`, and writes DIR/REPORT.md, DIR/report.json and DIR/figures/.
`--dry-run` (also spelt `--dry_run`) prints the runs and their projected training time on this machine (from a
timed step of each shape) and trains nothing. `--experiments=isotropic,kappa100` trains and evaluates those
alone and grades the rest from the summaries ROOT/summaries/ already holds: a scale too long for one session
runs in parts into one root. `--reanalyse` recomputes the summaries' measurements from the model outputs saved
beside them. A SIGTERM stops at a checkpoint with exit status 75; the same command resumes. `--partial` trains
nothing and evaluates every run at its latest checkpoint into ROOT/partial/ (a report of scale SCALE-partial
that gives each run's fraction of its steps and grades nothing): for a run stopped by a time budget, as
launch/gpu_check.sh stops the paper scale.
"""

import json
import pathlib
import shlex
import sys

import jax
from absl import app
from absl import flags
from absl import logging

from icl_jax import cli
from icl_jax.reproduce import experiments
from icl_jax.reproduce import pipeline
from icl_jax.runtime import errors
from icl_jax.runtime import run_logs
from icl_jax.runtime import storage

_SCALE = flags.DEFINE_enum("scale", None, list(experiments.SCALES), "Which configurations to run and grade.")
_ROOT = flags.DEFINE_string("root", None, "Directory of the reproduction: one workdir per run, and the report.")
_SEEDS = flags.DEFINE_list("seeds", [str(s) for s in experiments.DEFAULT_SEEDS], "Seeds of every experiment.")
_CONFIG_DIR = flags.DEFINE_string(
  "config_dir",
  str(experiments.default_config_dir()),
  "The configs/ directory the experiments' config files are read from.",
)
_EXPERIMENTS = flags.DEFINE_list(
  "experiments",
  None,
  "Train and evaluate only these experiments (default: all); the report still grades "
  "every experiment, from the summaries already under --root. For a scale longer than one machine's session.",
)
_REANALYSE = flags.DEFINE_bool(
  "reanalyse",
  False,
  "Before grading, recompute every summary's measurements from its saved model outputs "
  "(ROOT/summaries/RUN.npz) with the analysis as it is now; needs no checkpoint.",
)
_PARTIAL = flags.DEFINE_bool(
  "partial",
  False,
  "Train nothing: evaluate every run at its latest checkpoint and write ROOT/partial/ (summaries and a report "
  "of scale SCALE-partial, with each run's fraction of its steps; no claim graded). For runs stopped early.",
)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the runs and their projected cost; train nothing.")
flags.mark_flags_as_required(["scale", "root"])


def _seeds(values: list[str]) -> tuple[int, ...]:
  try:
    seeds = tuple(int(v) for v in values)
  except ValueError:
    raise app.UsageError(f"--seeds={','.join(values)}: expected integers, e.g. 0,1,2") from None
  if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
    raise app.UsageError(f"--seeds={','.join(values)}: need distinct non-negative integers")
  return seeds


def _experiments(values: list[str] | None) -> tuple[str, ...] | None:
  known = [e.name for e in experiments.EXPERIMENTS]
  if values is None:
    return None
  unknown = [v for v in values if v not in known]
  if unknown or not values:
    raise app.UsageError(
      f"--experiments={','.join(values)}: unknown {', '.join(unknown) or 'empty list'}; "
      f"the experiments are {', '.join(known)}"
    )
  return tuple(values)


def _dry_run(runs: list[pipeline.Run], scale: str) -> None:
  rows = []
  for row in pipeline.projected_cost(runs, scale):
    rows.append(row)
    print(json.dumps(row), flush=True)
  minutes = round(60 * sum(r["hours"] for r in rows))
  print(
    f"total: {minutes // 60} h {minutes % 60:02d} min of training on {rows[0]['devices']} x "
    f"{rows[0]['device']}: {len(rows)} programs one after another (the runs of a row train in one, vmapped, "
    "counted as that many runs' steps), plus the evaluations"
  )


def parse_flags(argv: list[str]) -> list[str]:
  """`cli.parse_flags`, accepting --dry-run (the spelling of launch/tpu.py and launch/local_sweep.sh) too."""
  return cli.parse_flags(["--dry_run" if a == "--dry-run" else a for a in argv])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run_logs.quiet_orbax()
  scale, root, seeds = _SCALE.value, storage.path(_ROOT.value), _seeds(_SEEDS.value)
  only = _experiments(_EXPERIMENTS.value)
  try:
    runs = pipeline.plan(scale, root, seeds, pathlib.Path(_CONFIG_DIR.value))
    absent = sorted(set(only or ()) - {r.experiment.name for r in runs})
    if absent:
      raise app.UsageError(
        f"--experiments: {', '.join(absent)} not of the {scale} scale, whose experiments are "
        f"{', '.join(e.name for e in experiments.scale_experiments(scale))}"
      )
    if _DRY_RUN.value:
      _dry_run(pipeline.selected(runs, only), scale)
      return
    selection = [f"--experiments={','.join(only)}"] if only else []
    selection += ["--partial"] if _PARTIAL.value else []
    command = shlex.join(
      [
        "python",
        "-m",
        "icl_jax.reproduce",
        f"--scale={scale}",
        f"--root={_ROOT.value}",
        f"--seeds={','.join(map(str, seeds))}",
        *selection,
      ]
    )
    grades = pipeline.reproduce(runs, root, scale, seeds, command, only, _REANALYSE.value, _PARTIAL.value)
    if grades is None:
      logging.warning(
        "Stopped by SIGTERM with every run's checkpoint saved; exit status %d (rerun the same command to resume).",
        errors.EXIT_PREEMPTED,
      )
      sys.exit(errors.EXIT_PREEMPTED)
  except errors.UserError as e:
    cli.exit_with_error(e)
  for grade in grades:
    logging.info("%-8s %s/%s", grade.verdict, grade.claim.experiment, grade.claim.id)
  logging.info("Report: %s", (root / pipeline.PARTIAL_DIR if _PARTIAL.value else root) / "REPORT.md")


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main, flags_parser=parse_flags)
