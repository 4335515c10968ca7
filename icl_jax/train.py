"""`train_and_evaluate(config, workdir)`: the training loop around the jitted steps of `train_step`.

The loop only dispatches chunks of steps and handles what happens between them: metrics (fetched one chunk
late, so the device never waits for the host), checkpoints, preemption and non-finite losses.
"""

import contextlib
import json
import signal
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import parameter_overview
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from icl_jax import checkpointing
from icl_jax import data
from icl_jax import models
from icl_jax import optim
from icl_jax import train_step
from icl_jax.analysis import evaluate
from icl_jax.runtime import config_files
from icl_jax.runtime import errors
from icl_jax.runtime import run_logs
from icl_jax.runtime import storage
from icl_jax.runtime import workdir_lock


class ConfigChangedError(errors.UserError, RuntimeError):
  """The workdir holds a run with a different configuration."""


@contextlib.contextmanager
def preemption_flag():
  """Yields a dict whose "set" becomes True once the run is to save a checkpoint and stop (SIGTERM: Cloud TPU
  preemption, SLURM's time limit).

  One process: a SIGTERM handler (replacing the old one until the block ends) sets it; the loop stops after
  the chunk it is dispatching, one chunk after the one running when the signal came.
  Several processes: SIGTERM reaches the hosts at different times, and a process that stopped alone would
  leave the others waiting forever in a collective. Agreement comes from JAX's preemption service, which
  `jax.distributed.initialize` starts with its own SIGTERM handler (so none is installed here): once any
  process has the notice, the service picks the step after the largest one any process has reached, and
  `poll_preemption` finds it within the next chunk on every process, as with one process, when chunks last
  more than a second: JAX's notifier looks for the signal once a second (it logs "SIGTERM caught" on the
  process that got it), so shorter chunks may run for that second more. Cost: one call into the runtime per
  training step, no device work. Orbax's manager does not ask the service (`checkpointing._Manager`: its
  questions would move the service's step count backwards).
  """
  flag = {"set": False, "service": jax.process_count() > 1}
  if flag["service"] or threading.current_thread() is not threading.main_thread():
    yield flag
    return

  def handler(signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint and stopping.")
    flag["set"] = True

  previous = signal.signal(signal.SIGTERM, handler)
  try:
    yield flag
  finally:
    signal.signal(signal.SIGTERM, previous)


def poll_preemption(flag: dict, first_step: int, end: int) -> bool:
  """`flag["set"]` after the chunk of steps `first_step + 1 .. end`; with several processes, first updated
  from JAX's preemption service, asked about every one of these steps, in order.

  The service's step ids count from 1 at the first chunk of this process (they must be the same on every
  process and increase by one): a notice that came before any question (SIGTERM during start-up) sets the
  agreed id to 1, which absolute step numbers of a resumed run would never meet.
  """
  if flag["service"] and not flag["set"]:
    origin = flag.setdefault("origin", first_step)
    try:
      reached = [multihost_utils.reached_preemption_sync_point(s - origin) for s in range(first_step + 1, end + 1)]
    except RuntimeError as e:  # The service is off (jax_enable_preemption_service=False).
      logging.warning("JAX's preemption service is off (%s): SIGTERM ends the processes without a checkpoint.", e)
      flag["service"] = False
      return False
    if any(reached):
      logging.warning("A process received SIGTERM: every process saves a checkpoint at step %d and stops.", end)
      flag["set"] = True
  return flag["set"]


def check_saved_config(
  workdir: storage.Path, config: ml_collections.ConfigDict, resuming: bool, allow_config_change: bool
) -> bool:
  """Refuses to resume a run whose saved config differs, unless allowed; True if it differs (and is allowed).
  config.json is rewritten by `write_config` only once the checkpoint has restored, and for a changed config
  only with its first checkpoint, so a failed or diverging attempt leaves it as it was."""
  path = workdir / "config.json"
  current = config_files.config_dict(config)
  if resuming and path.exists():
    differences = config_files.config_differences(json.loads(path.read_text()), current)
    if differences and not allow_config_change:
      raise ConfigChangedError(
        f"{workdir} holds a run with a different configuration; resuming it would mix two experiments. "
        "Differing fields:\n  "
        + "\n  ".join(differences)
        + "\nUse a new --workdir, or pass --allow_config_change to resume with the new values on purpose."
      )
    if differences:
      logging.warning("Resuming with a changed configuration:\n  %s", "\n  ".join(differences))
      return True
  return False


def write_config(workdir: storage.Path, config: ml_collections.ConfigDict) -> None:
  """(Re)writes WORKDIR/config.json, whole then renamed: other processes reading it at the same moment never
  see a partial file."""
  if run_logs.is_writer():
    text = json.dumps(config_files.config_dict(config), indent=2, sort_keys=True) + "\n"
    run_logs.write_atomically(workdir / "config.json", text)


def _boundary(step: int, every: int) -> int:
  """The first multiple of `every` after `step`."""
  return (step // every + 1) * every


class Metrics:
  """Turns a chunk's device metrics into log records, checking that every loss is finite.

  `column` picks one model's metrics when several models train together (a trailing model axis).
  """

  def __init__(self, log: run_logs.MetricsLog, train: ml_collections.ConfigDict, column: int | None = None):
    self._log, self._train, self._column = log, train, column
    self._pending = None
    self.last = None

  def push(self, first_step: int, num_steps: int, metrics: dict) -> None:
    """Queues a dispatched chunk's metrics and processes the previous chunk's (already computed by now)."""
    self.flush()
    self._pending = (first_step, num_steps, metrics)

  def flush(self) -> None:
    if self._pending is None:
      return
    first_step, num_steps, metrics = self._pending
    self._pending = None
    host = {name: np.asarray(values)[:num_steps] for name, values in jax.device_get(metrics).items()}
    if self._column is not None:
      host = {name: values[:, self._column] for name, values in host.items()}
    bad = np.flatnonzero(~np.isfinite(host["loss"]))
    if bad.size:
      raise errors.NonFiniteError(
        f"non-finite training loss {host['loss'][bad[0]]} at step {first_step + bad[0]}; stopping without saving "
        "this state. Lower config.train.learning_rate or set config.train.grad_clip_norm."
      )
    end = first_step + num_steps
    record = {name: float(values[-1]) for name, values in host.items()}
    record["loss_per_dim"] = record["loss"] / record["n_dims"]
    self.last = {"step": end, **record}
    if end % self._train.log_every == 0 or end == self._train.num_steps:
      self._log.write(end, record)


def run_steps(
  state, step: int, train: ml_collections.ConfigDict, run_chunk, metrics: list[Metrics], save, preempted: dict
):
  """Dispatches chunks from `step` to `train.num_steps` (or a preemption), checkpointing with `save(step,
  state)` at every `train.checkpoint_every` steps and at the end; returns (state, step)."""
  while step < train.num_steps and not preempted["set"]:
    end = min(
      train.num_steps,
      step + train.steps_per_dispatch,
      _boundary(step, train.log_every),
      _boundary(step, train.checkpoint_every),
    )
    state, chunk_metrics = run_chunk(state, end - step)
    for m in metrics:
      m.push(step, end - step, chunk_metrics)
    stop = poll_preemption(preempted, step, end)  # On every process after every chunk (multi-process agreement).
    step = end
    if step % train.checkpoint_every == 0 or step == train.num_steps or stop:
      for m in metrics:
        m.flush()  # Never save a state whose losses have not been checked.
      save(step, state)
  for m in metrics:
    m.flush()
  return state, step


def make_mesh(devices) -> Mesh:
  return Mesh(np.asarray(devices), (train_step.AXIS,))


# Fields that may differ between runs trained together; everything else must be equal.
PER_RUN_FIELDS = ("seed", "task.kappa", "task.noise_std")


def shared_part(config: ml_collections.ConfigDict) -> dict:
  """The config without the fields a run may change within a group: runs with equal shared parts group."""
  flat = config_files.flatten(config_files.config_dict(config))
  return {k: v for k, v in flat.items() if k not in PER_RUN_FIELDS}


def split_into_groups(configs: list[ml_collections.ConfigDict]) -> list[list[int]]:
  """Indices of `configs` grouped by their shared part, in first-appearance order."""
  groups: dict[str, list[int]] = {}
  for i, config in enumerate(configs):
    groups.setdefault(repr(sorted(shared_part(config).items())), []).append(i)
  return list(groups.values())


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str | storage.Path, *, devices=None, allow_config_change: bool = False
) -> dict:
  """Trains (or resumes) the run in `workdir` and returns its final metrics and error curve.

  Args:
    config: the experiment (see configs/linreg.py).
    workdir: where checkpoints, config.json, metrics.jsonl, TensorBoard events and error_curve.json go.
    devices: devices to train on (default: all devices of all processes).
    allow_config_change: resume even if the saved config differs (the differences are logged).
  """
  return train_runs([config], [workdir], devices=devices, allow_config_change=allow_config_change)[0]


def train_runs(
  configs: list[ml_collections.ConfigDict], workdirs: list, *, devices=None, allow_config_change: bool = False
) -> list[dict]:
  """Trains (or resumes) runs that differ only in PER_RUN_FIELDS as one compiled program, their states stacked
  on a model axis that the step vmaps over (a single run is a group of one, not stacked); returns each run's
  result. Each run keeps its own workdir, lock, checkpoints, config.json and metrics.jsonl, exactly as if
  trained alone, and gets the same losses (tests/test_train.py)."""
  devices = jax.devices() if devices is None else list(devices)
  for config in configs:
    evaluate.validate(config, len(devices))
  workdirs = [storage.path(w) for w in workdirs]
  shared = shared_part(configs[0])
  for config, workdir in zip(configs[1:], workdirs[1:]):
    if shared_part(config) != shared:
      raise errors.ConfigError(f"{workdir}: only {PER_RUN_FIELDS} may differ between runs trained together")
  for workdir in workdirs:
    workdir_lock.prepare(workdir)
  with contextlib.ExitStack() as locks:
    for workdir in workdirs:
      locks.enter_context(workdir_lock.hold(workdir, "training", writer=run_logs.is_writer()))
    return _train_runs(configs, workdirs, devices, allow_config_change)


def _restore(checkpoints: list[checkpointing.Checkpoints], states: list) -> tuple[list, int | None]:
  """Each run's newest checkpoint that restores, all at one step: saves of a group are not atomic together, so
  a group resumes from the newest step every run has."""
  restored = [c.restore_latest(s) for c, s in zip(checkpoints, states)]
  steps = [step for _, step in restored]
  if None in steps:
    return states, None
  common = min(steps)
  return [
    state if step == common else c.restore(common, like)
    for c, like, (state, step) in zip(checkpoints, states, restored)
  ], common


def _train_runs(
  configs: list[ml_collections.ConfigDict], workdirs: list[storage.Path], devices: list, allow_config_change: bool
) -> list[dict]:
  base, train = configs[0], configs[0].train
  mesh = make_mesh(devices)
  model = models.build_model(base.model)
  optimizer = optim.make_optimizer(train)
  states = [train_step.init_state(c, model, optimizer, mesh) for c in configs]
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(states[0].params))
  logging.info(
    "Model %s has %s parameters; training on %d %s devices (%s, %d processes), %s.",
    base.model.family,
    f"{num_params:,}",
    len(devices),
    devices[0].platform.upper(),
    devices[0].device_kind,
    jax.process_count(),
    base.model.get("dtype", "float32"),
  )
  if run_logs.is_writer():  # After the device line, which a user reads first.
    parameter_overview.log_parameter_overview(states[0].params, msg="Model parameters")
  if len(configs) > 1:
    logging.info("Training %d runs together: %s", len(configs), ", ".join(map(str, workdirs)))
  stacked = len(configs) > 1
  with contextlib.ExitStack() as held:
    preempted = held.enter_context(preemption_flag())
    checkpoints = [
      held.enter_context(checkpointing.Checkpoints(w / "checkpoints", train, stop_requested=lambda: preempted["set"]))
      for w in workdirs
    ]
    changed = [
      check_saved_config(w, c, ck.latest_step() is not None, allow_config_change)
      for c, w, ck in zip(configs, workdirs, checkpoints)
    ]
    states, step = _restore(checkpoints, states)
    for checkpoint in checkpoints if step is not None else ():
      logging.info("Resumed from %s at step %d.", checkpoint.directory, step)
    for config, workdir, change in zip(configs, workdirs, changed):
      if not change:
        write_config(workdir, config)
    if stacked:
      state = jax.device_put(jax.tree.map(lambda *a: jnp.stack(a), *states), train_step.replicated(mesh))
      hypers = data.Hyper(
        jnp.asarray([c.task.kappa for c in configs], jnp.float32),
        jnp.asarray([c.task.noise_std for c in configs], jnp.float32),
      )
    else:
      state, hypers = states[0], None
    run_state = (lambda state, m: jax.tree.map(lambda a: a[m], state)) if stacked else (lambda state, m: state)

    def save(step, state):
      for m, (config, workdir, change) in enumerate(zip(configs, workdirs, changed)):
        checkpoints[m].save(step, run_state(state, m))
        if change:  # config.json describes the newest checkpoint: the new config's from its first one on.
          write_config(workdir, config)

    step = int(jax.device_get(states[0].step))
    if run_logs.is_writer():
      for workdir in workdirs:
        provenance = {**run_logs.provenance(), "start_step": step}
        run_logs.write_atomically(workdir / "provenance.json", json.dumps(provenance, indent=2) + "\n")
    logs = [held.enter_context(run_logs.MetricsLog(w, step, train.num_steps)) for w in workdirs]
    metrics = [Metrics(log, train, column=m if stacked else None) for m, log in enumerate(logs)]
    run_chunk = train_step.make_train_chunk(base, model, optimizer, optim.learning_rate_schedule(train), mesh, hypers)
    start_time = time.perf_counter()
    try:
      state, step = run_steps(state, step, train, run_chunk, metrics, save, preempted)
    except errors.NonFiniteError as e:
      kept = min((c.latest_step() for c in checkpoints), key=lambda s: -1 if s is None else s)
      raise errors.NonFiniteError(
        f"{e} "
        + (
          f"The last good checkpoint, step {kept}, is kept."
          if kept is not None
          else "No checkpoint had been written yet: a rerun starts from step 0."
        )
      ) from None
  logging.info("Trained to step %d in %.1f s.", step, time.perf_counter() - start_time)
  results = []
  for m, (config, workdir) in enumerate(zip(configs, workdirs)):
    result = {"step": step, "num_params": num_params, "final": metrics[m].last, "preempted": preempted["set"]}
    if step == train.num_steps:
      params = run_state(state, m).params
      result["error_curve"] = write_error_curve(config, model, params, mesh, workdir, step)
      if config.eval.after_training:
        result["evaluation"] = evaluate.evaluate(config, workdir, params=params)
    results.append(result)
  return results


def write_error_curve(config, model, params, mesh, workdir: storage.Path, step: int) -> dict:
  """Error/d at each context length on `config.eval.num_prompts` fresh prompts, vs predicting zero, of the
  parameters at `step`; written to WORKDIR/error_curve.json."""
  curve = train_step.make_error_curve(config, model, mesh)(params)
  summary = {
    "step": step,
    "num_prompts": config.eval.num_prompts,
    "error_per_dim": curve["error_per_dim"].tolist(),
    "zero_per_dim": curve["zero_per_dim"].tolist(),
    "last_error_per_dim": float(curve["error_per_dim"][-1]),
    "last_zero_per_dim": float(curve["zero_per_dim"][-1]),
  }
  summary["last_ratio_to_zero"] = summary["last_error_per_dim"] / summary["last_zero_per_dim"]
  logging.info(
    "error/d at the last context length (%d points): %.4g; predicting zero: %.4g; ratio %.4g.",
    config.task.n_points,
    summary["last_error_per_dim"],
    summary["last_zero_per_dim"],
    summary["last_ratio_to_zero"],
  )
  if run_logs.is_writer():
    run_logs.write_atomically(workdir / "error_curve.json", json.dumps(summary, indent=2) + "\n")
  return summary


def checkpoint_error_curve(config: ml_collections.ConfigDict, workdir: storage.Path) -> dict:
  """`write_error_curve` of the latest checkpoint in `workdir` (a run evaluated part-way through training)."""
  params, step = checkpointing.load_params(config, workdir)
  mesh = make_mesh(jax.devices())
  params = jax.device_put(params, train_step.replicated(mesh))
  return write_error_curve(config, models.build_model(config.model), params, mesh, workdir, step)
