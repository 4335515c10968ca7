"""Many runs that share shapes, trained as one compiled program with the model axis vmapped.

Runs of a sweep with the same model and optimiser differ only in seed, kappa or noise: their states are
stacked on a leading axis and one jitted step updates them all (`train_step.make_train_chunk` with `hypers`).
Each run keeps its own workdir, checkpoints, config.json and metrics.jsonl, exactly as if trained alone, and
gets the same losses as training it alone (tests/test_multi_train.py).
"""

import contextlib

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from icl_jax import checkpointing
from icl_jax import config_checks
from icl_jax import data
from icl_jax import models
from icl_jax import optim
from icl_jax.runtime import run_logs
from icl_jax.runtime import storage
from icl_jax import train
from icl_jax import train_step
from icl_jax.runtime import workdir_lock

# Fields that may differ between runs trained together; everything else must be equal.
PER_RUN_FIELDS = ("seed", "task.kappa", "task.noise_std")


def shared_part(config: ml_collections.ConfigDict) -> dict:
  """The config without the fields a run may change within a group: runs with equal shared parts group."""
  flat = run_logs.flatten(run_logs.config_dict(config))
  return {k: v for k, v in flat.items() if k not in PER_RUN_FIELDS}


def train_group(configs: list[ml_collections.ConfigDict], workdirs: list[storage.Path], *, devices=None) -> list[dict]:
  """Trains (or resumes) runs that differ only in PER_RUN_FIELDS together; returns each run's result."""
  devices = jax.devices() if devices is None else list(devices)
  for config in configs:
    config_checks.validate(config, len(devices))
  shared = shared_part(configs[0])
  for config, workdir in zip(configs[1:], workdirs[1:]):
    if shared_part(config) != shared:
      raise ValueError(f"{workdir}: only {PER_RUN_FIELDS} may differ between runs trained together")
  base, train_config = configs[0], configs[0].train
  mesh = train.make_mesh(devices)
  model = models.build_model(base.model)
  optimizer = optim.make_optimizer(train_config)
  states = [train_step.init_state(c, model, optimizer, mesh) for c in configs]
  hypers = data.Hyper(jnp.asarray([c.task.kappa for c in configs], jnp.float32),
                      jnp.asarray([c.task.noise_std for c in configs], jnp.float32))
  logging.info("Training %d runs together: %s", len(configs), ", ".join(map(str, workdirs)))
  for workdir in workdirs:
    workdir.mkdir(parents=True, exist_ok=True)
  with contextlib.ExitStack() as held:  # Each run's workdir lock, as if trained alone, then its metrics log.
    for workdir in workdirs:
      held.enter_context(workdir_lock.hold(workdir, "sweep training", writer=run_logs.is_writer()))
    checkpoints = [checkpointing.Checkpoints(w / "checkpoints", train_config) for w in workdirs]
    try:
      with train.preemption_flag() as preempted:
        # Saves of the runs are not atomic together: resume every run from the newest step they all have.
        steps = [c.latest_step() for c in checkpoints]
        common = None if None in steps else min(steps)
        for config, workdir in zip(configs, workdirs):
          train.check_saved_config(workdir, config, common is not None, allow_config_change=False)
        if common is not None:
          states = [c.restore(common, s) for c, s in zip(checkpoints, states)]
          logging.info("Resumed the group at step %d.", common)
        for config, workdir in zip(configs, workdirs):
          train.write_config(workdir, config)
        state = jax.device_put(jax.tree.map(lambda *a: jnp.stack(a), *states), train_step.replicated(mesh))
        step = common or 0
        logs = [held.enter_context(run_logs.MetricsLog(w, step, train_config.num_steps)) for w in workdirs]
        metrics = [train.Metrics(log, train_config, column=m) for m, log in enumerate(logs)]
        run_chunk = train_step.make_train_chunk(base, model, optimizer, optim.learning_rate_schedule(train_config),
                                                mesh, hypers)

        def save(step, state):
          for m, checkpoint in enumerate(checkpoints):
            checkpoint.save(step, jax.tree.map(lambda a: a[m], state))

        state, step = train.run_steps(state, step, train_config, run_chunk, metrics, save, preempted)
    finally:
      for checkpoint in checkpoints:
        checkpoint.close()
    results = []
    for m, (config, workdir) in enumerate(zip(configs, workdirs)):
      result = {"step": step, "final": metrics[m].last, "preempted": preempted["set"]}
      if step == train_config.num_steps:
        params = jax.tree.map(lambda a: a[m], state.params)
        result["error_curve"] = train.write_error_curve(config, model, params, mesh, workdir)
      results.append(result)
    return results


def split_into_groups(configs: list[ml_collections.ConfigDict]) -> list[list[int]]:
  """Indices of `configs` grouped by their shared part, in first-appearance order."""
  groups: dict[str, list[int]] = {}
  for i, config in enumerate(configs):
    groups.setdefault(repr(sorted(shared_part(config).items())), []).append(i)
  return list(groups.values())

