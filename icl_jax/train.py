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
import ml_collections
import numpy as np
from absl import logging
from clu import parameter_overview
from jax.sharding import Mesh

from icl_jax import checkpointing
from icl_jax import config_checks
from icl_jax.analysis import evaluate
from icl_jax import models
from icl_jax import optim
from icl_jax import run_logs
from icl_jax import storage
from icl_jax import train_step
from icl_jax import workdir_lock


class ConfigChangedError(RuntimeError):
  """The workdir holds a run with a different configuration."""


class _PreemptionVote:
  """With several processes: whether any process has received SIGTERM, the same answer on every process.

  A process that stopped alone would leave the others waiting forever in a collective, and SIGTERM reaches
  hosts at different times. Each chunk dispatches a tiny all-reduce of the processes' flags over every device;
  its result is read one chunk later (like the metrics), so the host never waits for the device any longer.
  """

  def __init__(self):
    mesh = Mesh(np.asarray(jax.devices()), ("processes",))
    self._sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("processes"))
    self._num_local = len(mesh.local_devices)
    self._any = jax.jit(jax.shard_map(lambda f: jax.lax.pmax(f, "processes"), mesh=mesh,
                                      in_specs=jax.sharding.PartitionSpec("processes"),
                                      out_specs=jax.sharding.PartitionSpec()))
    self._pending = None

  def poll(self, received: bool) -> bool:
    """Dispatches this chunk's vote; returns the previous chunk's outcome."""
    previous = self._pending
    local = np.full((self._num_local,), int(received), np.int32)
    self._pending = self._any(jax.make_array_from_process_local_data(self._sharding, local))
    return previous is not None and bool(np.asarray(jax.device_get(previous)).any())


# Exit status of a run stopped by SIGTERM after saving its checkpoint: EX_TEMPFAIL of sysexits.h ("try again
# later"), distinct from 0 (finished) and 1 (failed), so that a scheduler can requeue exactly these runs.
EXIT_PREEMPTED = 75


@contextlib.contextmanager
def preemption_flag():
  """Yields a dict whose "set" becomes True on SIGTERM (Cloud TPU preemption); restores the old handler.

  With several processes, "set" changes only in `poll_preemption`, at the same chunk on every process.
  """
  flag = {"set": False}
  if jax.process_count() > 1:
    flag.update(received=False, vote=_PreemptionVote())
  if threading.current_thread() is not threading.main_thread():
    yield flag
    return

  def handler(signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint and stopping.")
    flag["received" if "vote" in flag else "set"] = True

  previous = signal.signal(signal.SIGTERM, handler)
  try:
    yield flag
  finally:
    signal.signal(signal.SIGTERM, previous)


def poll_preemption(flag: dict) -> bool:
  """`flag["set"]`, first updated from the processes' vote when there are several. Every process must call
  this once per chunk, at the same chunks."""
  if "vote" in flag and flag["vote"].poll(flag["received"]) and not flag["set"]:
    logging.warning("A process received SIGTERM: every process saves a checkpoint and stops.")
    flag["set"] = True
  return flag["set"]


def check_saved_config(workdir: storage.Path, config: ml_collections.ConfigDict, resuming: bool,
                        allow_config_change: bool) -> bool:
  """Refuses to resume a run whose saved config differs, unless allowed; True if it differs (and is allowed).
  config.json is rewritten by `write_config` only once the checkpoint has restored, and for a changed config
  only with its first checkpoint, so a failed or diverging attempt leaves it as it was."""
  path = workdir / "config.json"
  current = run_logs.config_dict(config)
  if resuming and path.exists():
    differences = run_logs.config_differences(json.loads(path.read_text()), current)
    if differences and not allow_config_change:
      raise ConfigChangedError(
          f"{workdir} holds a run with a different configuration; resuming it would mix two experiments. "
          "Differing fields:\n  " + "\n  ".join(differences) +
          "\nUse a new --workdir, or pass --allow_config_change to resume with the new values on purpose.")
    if differences:
      logging.warning("Resuming with a changed configuration:\n  %s", "\n  ".join(differences))
      return True
  return False


def write_config(workdir: storage.Path, config: ml_collections.ConfigDict) -> None:
  """(Re)writes WORKDIR/config.json, whole then renamed: other processes reading it at the same moment never
  see a partial file."""
  if run_logs.is_writer():
    text = json.dumps(run_logs.config_dict(config), indent=2, sort_keys=True) + "\n"
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
      raise FloatingPointError(
          f"non-finite training loss {host['loss'][bad[0]]} at step {first_step + bad[0]}; stopping without saving "
          "this state. Lower config.train.learning_rate or set config.train.grad_clip_norm.")
    end = first_step + num_steps
    record = {name: float(values[-1]) for name, values in host.items()}
    record["loss_per_dim"] = record["loss"] / record["n_dims"]
    self.last = {"step": end, **record}
    if end % self._train.log_every == 0 or end == self._train.num_steps:
      self._log.write(end, record)


def run_steps(state, step: int, train: ml_collections.ConfigDict, run_chunk, metrics: list[Metrics], save,
              preempted: dict):
  """Dispatches chunks from `step` to `train.num_steps` (or a preemption), checkpointing with `save(step,
  state)` at every `train.checkpoint_every` steps and at the end; returns (state, step)."""
  while step < train.num_steps and not preempted["set"]:
    end = min(train.num_steps, step + train.steps_per_dispatch, _boundary(step, train.log_every),
              _boundary(step, train.checkpoint_every))
    state, chunk_metrics = run_chunk(state, end - step)
    for m in metrics:
      m.push(step, end - step, chunk_metrics)
    step = end
    stop = poll_preemption(preempted)  # On every process after every chunk (multi-process agreement).
    if step % train.checkpoint_every == 0 or step == train.num_steps or stop:
      for m in metrics:
        m.flush()  # Never save a state whose losses have not been checked.
      save(step, state)
  for m in metrics:
    m.flush()
  return state, step


def make_mesh(devices) -> Mesh:
  return Mesh(np.asarray(devices), (train_step.AXIS,))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | storage.Path, *, devices=None,
                       allow_config_change: bool = False) -> dict:
  """Trains (or resumes) the run in `workdir` and returns its final metrics and error curve.

  Args:
    config: the experiment (see configs/linreg.py).
    workdir: where checkpoints, config.json, metrics.jsonl, TensorBoard events and error_curve.json go.
    devices: devices to train on (default: all devices of all processes).
    allow_config_change: resume even if the saved config differs (the differences are logged).
  """
  devices = jax.devices() if devices is None else list(devices)
  config_checks.validate(config, len(devices))
  workdir = storage.path(workdir)
  workdir_lock.prepare(workdir)
  with workdir_lock.hold(workdir, "training", writer=run_logs.is_writer()):
    return _train_and_evaluate(config, workdir, devices, allow_config_change)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: storage.Path, devices: list,
                        allow_config_change: bool) -> dict:
  train = config.train
  mesh = make_mesh(devices)
  model = models.build_model(config.model)
  optimizer = optim.make_optimizer(train)
  schedule = optim.learning_rate_schedule(train)
  state = train_step.init_state(config, model, optimizer, mesh)
  if run_logs.is_writer():
    parameter_overview.log_parameter_overview(state.params, msg="Model parameters")
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  logging.info("Model %s has %s parameters; training on %d %s devices (%s, %d processes), %s.", config.model.family,
               f"{num_params:,}", len(devices), devices[0].platform.upper(), devices[0].device_kind,
               jax.process_count(), config.model.get("dtype", "float32"))

  with checkpointing.Checkpoints(workdir / "checkpoints", train) as checkpoints, preemption_flag() as preempted:
    latest = checkpoints.latest_step()
    changed = check_saved_config(workdir, config, latest is not None, allow_config_change)
    if latest is not None:
      state, latest = checkpoints.restore_latest(state)
      logging.info("Resumed from %s at step %d.", checkpoints.directory, latest)
    if not changed:
      write_config(workdir, config)

    def save(step, state):
      checkpoints.save(step, state)
      if changed:  # config.json describes the newest checkpoint: the new config's from its first one on.
        write_config(workdir, config)
    step = int(jax.device_get(state.step))
    if run_logs.is_writer():
      provenance = {**run_logs.provenance(), "start_step": step}
      run_logs.write_atomically(workdir / "provenance.json", json.dumps(provenance, indent=2) + "\n")
    log = run_logs.MetricsLog(workdir, step, train.num_steps)
    metrics = Metrics(log, train)
    run_chunk = train_step.make_train_chunk(config, model, optimizer, schedule, mesh)
    start_time = time.perf_counter()
    try:
      state, step = run_steps(state, step, train, run_chunk, [metrics], save, preempted)
    except FloatingPointError as e:
      kept = checkpoints.latest_step()
      raise FloatingPointError(f"{e} " + (f"The last good checkpoint, step {kept}, is kept." if kept is not None else
                                          "No checkpoint had been written yet: a rerun starts from step 0.")) from None
    finally:
      log.close()
  logging.info("Trained to step %d in %.1f s.", step, time.perf_counter() - start_time)
  result = {"step": step, "num_params": num_params, "final": metrics.last, "preempted": preempted["set"]}
  if step == train.num_steps:
    result["error_curve"] = write_error_curve(config, model, state.params, mesh, workdir)
    if config.eval.after_training:
      result["evaluation"] = evaluate.evaluate(config, workdir, params=state.params)
  return result


def write_error_curve(config, model, params, mesh, workdir: storage.Path) -> dict:
  """Error/d at each context length on `config.eval.num_prompts` fresh prompts, vs predicting zero."""
  curve = train_step.make_error_curve(config, model, mesh)(params)
  summary = {
      "num_prompts": config.eval.num_prompts,
      "error_per_dim": curve["error_per_dim"].tolist(),
      "zero_per_dim": curve["zero_per_dim"].tolist(),
      "last_error_per_dim": float(curve["error_per_dim"][-1]),
      "last_zero_per_dim": float(curve["zero_per_dim"][-1]),
  }
  summary["last_ratio_to_zero"] = summary["last_error_per_dim"] / summary["last_zero_per_dim"]
  logging.info("error/d at the last context length (%d points): %.4g; predicting zero: %.4g; ratio %.4g.",
               config.task.n_points, summary["last_error_per_dim"], summary["last_zero_per_dim"],
               summary["last_ratio_to_zero"])
  if run_logs.is_writer():
    run_logs.write_atomically(workdir / "error_curve.json", json.dumps(summary, indent=2) + "\n")
  return summary
