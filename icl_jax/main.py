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

from icl_jax import config_checks
from icl_jax import distributed
from icl_jax import evaluate
from icl_jax import run_logs
from icl_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/linreg.py:quick.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"],
                          "train: train (or resume) the run in --workdir; eval: evaluate its latest checkpoint "
                          "layer by layer, writing WORKDIR/eval/results.json and figures.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir even if its saved config differs from this one.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "detect", list(distributed.MODES),
    "Multi-process (multi-host) training. detect: explicit if --coordinator_address/--num_processes/--process_id "
    "is given, auto on a multi-host TPU environment (TPU_WORKER_HOSTNAMES etc.), else one process; auto: "
    "jax.distributed.initialize() with cluster auto-detection (Cloud TPU, GKE, Slurm, Open MPI); explicit: the "
    "three coordinator flags, all required; off: one process.")
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, where it runs the coordinator service, bound to exactly "
    "this address (not to every interface). The same on every process.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id, 0..num_processes-1 (with "
                                   "--coordinator_address); process 0 writes the logs and files.")
flags.mark_flags_as_required(["config", "workdir"])


def _initialize_distributed() -> None:
  """Starts JAX's distributed runtime if the flags or the environment ask for it (before any JAX work)."""
  plan = distributed.initialize(_DISTRIBUTED.value, _COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value,
                                _PROCESS_ID.value)
  if plan.kwargs is not None:
    logging.info("JAX distributed runtime started (%s): process %d of %d, %d local / %d global devices.",
                 plan.reason, jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())


def _refuse_distributed_eval() -> None:
  given = [f"--{name}" for name, flag in (("coordinator_address", _COORDINATOR_ADDRESS), ("num_processes",
           _NUM_PROCESSES), ("process_id", _PROCESS_ID)) if flag.value is not None]
  if _DISTRIBUTED.value in ("auto", "explicit"):
    given.insert(0, f"--distributed={_DISTRIBUTED.value}")
  if given:
    raise distributed.DistributedFlagError(f"--mode=eval runs in one process on one device; drop {', '.join(given)}.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run_logs.quiet_orbax()
  try:
    if _MODE.value == "train":
      _initialize_distributed()
      train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
    else:
      _refuse_distributed_eval()
      config_checks.validate(_CONFIG.value, num_devices=1)  # Evaluation runs on one device.
      evaluate.evaluate(_CONFIG.value, _WORKDIR.value)
  except (config_checks.ConfigError, train.ConfigChangedError, FloatingPointError, FileNotFoundError,
          distributed.DistributedFlagError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main)
