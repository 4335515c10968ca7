"""Two processes on one machine, joined by jax.distributed over loopback, train like one process.

Each subprocess has 2 CPU devices (4 in all) and runs `python -m icl_jax.main` with explicit coordinator flags
on 127.0.0.1; the single-process reference and the resume run in this process (on one of conftest.py's CPU
devices). Every subprocess is killed if it outlives its deadline or if its partner fails, so a broken
rendezvous fails the test in bounded time instead of hanging CI.
"""

import ipaddress
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import pytest

from icl_jax import checkpointing
from icl_jax import train
from icl_jax.runtime import distributed
from icl_jax.runtime import errors
from tests import helpers

REPO = pathlib.Path(__file__).resolve().parents[2]
FLAGS = ["--config=tests/tiny_config.py", "--config.train.num_steps=12", "--config.train.checkpoint_every=6"]
DEVICES_PER_PROCESS = 2
DEADLINE_S = 75  # Per phase; each takes 5-20 s on 2 CPU cores.


def _env(devices: int | None) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}  # Loopback only, no proxies.
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("XLA_FLAGS", None)  # conftest.py's 8 devices.
  if devices is not None:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _command(workdir, *extra):
  return [sys.executable, "-m", "icl_jax.main", *FLAGS, f"--workdir={workdir}", *extra]


def _start(command, devices=None, extra_env=None):
  log = tempfile.TemporaryFile("w+")  # Not a pipe: a full pipe would block a chatty process.
  process = subprocess.Popen(
    command, cwd=REPO, env={**_env(devices), **(extra_env or {})}, stdout=subprocess.DEVNULL, stderr=log, text=True
  )
  process.log = log
  return process


def _stderr(process) -> str:
  process.log.seek(0)
  return process.log.read()


def _kill(processes):
  for p in processes:
    if p.poll() is None:
      p.kill()
    p.wait()


def _listening_sockets(pids) -> set[str]:
  """Addresses on which the processes `pids` listen for TCP connections (Linux /proc); empty elsewhere."""
  inodes = set()
  for pid in pids:
    try:
      for fd in os.scandir(f"/proc/{pid}/fd"):
        target = os.readlink(fd.path)
        if target.startswith("socket:["):
          inodes.add(target[8:-1])
    except OSError:
      continue
  found = set()
  for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
    try:
      lines = pathlib.Path(table).read_text().splitlines()[1:]
    except OSError:
      continue
    for line in lines:
      fields = line.split()
      if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN.
        continue
      address, port = fields[1].split(":")
      raw = bytes.fromhex(address)
      raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # Host-order 32-bit words.
      ip = ipaddress.ip_address(raw)
      ip = getattr(ip, "ipv4_mapped", None) or ip
      found.add(f"{ip}:{int(port, 16)}")
  return found


def _run_together(processes, deadline_s=DEADLINE_S, on_poll=None, expected_status=0) -> list[str]:
  """Waits for all `processes`; kills all of them if one fails or the deadline passes. Returns their stderr."""
  deadline = time.monotonic() + deadline_s
  try:
    while any(p.poll() is None for p in processes):
      if any(p.returncode not in (None, expected_status) for p in processes):
        break
      if time.monotonic() > deadline:
        break
      if on_poll is not None:
        on_poll()
      time.sleep(0.1)
  finally:
    _kill(processes)
  stderrs = [_stderr(p) for p in processes]
  for i, (p, stderr) in enumerate(zip(processes, stderrs)):
    assert p.returncode == expected_status, (
      f"process {i} ended with {p.returncode} (deadline {deadline_s} s):\n{stderr[-4000:]}"
    )
  return stderrs


def _start_pair(workdir, *extra, devices=DEVICES_PER_PROCESS):
  address = f"127.0.0.1:{helpers.free_port()}"
  return [
    _start(
      _command(workdir, f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}", *extra),
      devices=devices,
    )
    for i in range(2)
  ]


def _records(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _committed_steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _assert_same_curve(records, reference):
  assert [r["step"] for r in records] == [r["step"] for r in reference] == list(range(1, 13))
  for got, want in zip(records, reference):
    for name in ("loss", "grad_norm", "loss_per_dim"):
      assert got[name] == pytest.approx(want[name], abs=1e-5), (got["step"], name)
    for name in ("learning_rate", "n_dims", "n_points"):
      assert got[name] == want[name], (got["step"], name)


def _tiny_config():
  from tests import tiny_config

  config = tiny_config.get_config()
  config.train.update(num_steps=12, checkpoint_every=6)  # As FLAGS.
  return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Two processes on two devices each (global batch 16), and the same run in this process on one device."""
  single, pair = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("pair")
  listening = set()
  processes = _start_pair(pair)
  start = time.monotonic()
  stderrs = _run_together(processes, on_poll=lambda: listening.update(_listening_sockets([p.pid for p in processes])))
  print(f"\ntwo processes: {time.monotonic() - start:.1f} s")
  train.train_and_evaluate(_tiny_config(), single, devices=jax.devices()[:1])
  return {"single": single, "pair": pair, "stderrs": stderrs, "listening": listening}


def test_two_processes_train_the_same_curve_as_one(runs):
  p0, p1 = runs["stderrs"]
  assert "process 0 of 2, 2 local / 4 global devices" in p0, p0[-3000:]
  assert "process 1 of 2, 2 local / 4 global devices" in p1, p1[-3000:]
  assert "training on 4 CPU devices (cpu, 2 processes), float32" in p0
  _assert_same_curve(_records(runs["pair"]), _records(runs["single"]))
  # Only process 0 logs and writes metrics.
  assert "step 12/12" in p0 and "step 12/12" not in p1
  pair_curve = json.loads((runs["pair"] / "error_curve.json").read_text())
  single_curve = json.loads((runs["single"] / "error_curve.json").read_text())
  assert pair_curve["error_per_dim"] == pytest.approx(single_curve["error_per_dim"], abs=1e-5)
  assert json.loads((runs["pair"] / "config.json").read_text()) == json.loads(
    (runs["single"] / "config.json").read_text()
  )
  assert _committed_steps(runs["pair"]) == [6, 12]
  assert not list(runs["pair"].glob("**/*.orbax-checkpoint-tmp*"))


def test_processes_listen_on_loopback_only(runs):
  if not pathlib.Path("/proc/net/tcp").exists():
    pytest.skip("no /proc/net/tcp to list listening sockets")
  assert runs["listening"], "saw no listening socket (coordinator, gloo) while the processes ran"
  for address in runs["listening"]:
    host = address.rpartition(":")[0]
    assert ipaddress.ip_address(host).is_loopback, f"a process listened on {address}: {runs['listening']}"


def test_one_process_resumes_the_checkpoint_of_two(runs, tmp_path):
  workdir = tmp_path / "resumed"
  shutil.copytree(runs["pair"], workdir)
  shutil.rmtree(workdir / "checkpoints" / "12")  # Resume from step 6, written by the two processes.
  with checkpointing.Checkpoints(workdir / "checkpoints", _tiny_config().train) as checkpoints:
    assert checkpoints.latest_step() == 6
  result = train.train_and_evaluate(_tiny_config(), workdir, devices=jax.devices()[:1])
  assert result["step"] == 12
  _assert_same_curve(_records(workdir), _records(runs["single"]))


def _wait_until(processes, condition, what: str) -> None:
  """Polls `condition` while all `processes` run; kills them all if one ends first or DEADLINE_S passes."""
  deadline = time.monotonic() + DEADLINE_S
  try:
    while not condition():
      assert all(p.poll() is None for p in processes), f"a process ended before {what}"
      assert time.monotonic() < deadline, f"waited {DEADLINE_S} s for {what}"
      time.sleep(0.01)
  except BaseException:
    _kill(processes)
    raise


def test_sigterm_to_one_process_stops_both_within_one_chunk(tmp_path):
  """Cloud TPU preemption: SIGTERM reaches the hosts at different times, here only one of them. Both stop at the
  same step, after the chunk that follows the one running when the signal came (as one process does)."""
  # Steps per chunk: 2 s on 2 idle cores (10 s when busy), longer than the second JAX's notifier may take to
  # see the signal plus the service's round trips (with 40 steps, ~1 s, one run stopped a chunk later).
  chunk = 80
  processes = _start_pair(
    tmp_path,
    "--config.train.num_steps=100000",
    "--config.train.checkpoint_every=100000",
    f"--config.train.log_every={chunk}",
    f"--config.train.steps_per_dispatch={chunk}",
    devices=1,
  )
  metrics = tmp_path / "metrics.jsonl"

  def logged_steps():  # Complete lines only: process 0 may be writing the next one.
    text = metrics.read_text() if metrics.exists() else ""
    return [json.loads(line)["step"] for line in text.split("\n")[:-1]]

  _wait_until(processes, lambda: len(logged_steps()) >= 1, "a record in metrics.jsonl")  # Past compiling.
  logged = logged_steps()[-1]  # Its chunk has ended; the next one runs now.
  processes[1].send_signal(signal.SIGTERM)
  p0, p1 = _run_together(processes, deadline_s=60, expected_status=errors.EXIT_PREEMPTED)
  [stop] = _committed_steps(tmp_path)
  print(f"\nlogged step {logged} when signalled, stopped at {stop}, chunks of {chunk}")
  for stderr in (p0, p1):
    assert f"A process received SIGTERM: every process saves a checkpoint at step {stop} and stops." in stderr
  assert logged < stop <= logged + 2 * chunk, (logged, stop)


def test_sigterm_during_start_up_stops_both_after_the_first_chunk(tmp_path):
  """A notice that comes before the first chunk (preemption while compiling) is not lost: both processes stop
  at the end of the first chunk of the resumed run."""
  chunk = 5
  flags = (
    "--config.train.num_steps=100000",
    "--config.train.checkpoint_every=100000",
    "--config.train.log_every=5",
    f"--config.train.steps_per_dispatch={chunk}",
  )
  _run_together(_start_pair(tmp_path, *flags[1:], "--config.train.num_steps=10", devices=1))  # Resumed from 10.
  processes = _start_pair(tmp_path, *flags, "--allow_config_change", devices=1)
  _wait_until(processes, lambda: "JAX distributed runtime started" in _stderr(processes[1]), "the runtime's start")
  processes[1].send_signal(signal.SIGTERM)
  p0, p1 = _run_together(processes, deadline_s=60, expected_status=errors.EXIT_PREEMPTED)
  assert _committed_steps(tmp_path) == [10, 10 + chunk]
  for stderr in (p0, p1):
    assert f"every process saves a checkpoint at step {10 + chunk} and stops." in stderr


def test_flags_are_checked_before_anything_starts():
  with pytest.raises(distributed.DistributedFlagError, match="--process_id=2 is out of range"):
    distributed.plan("detect", "127.0.0.1:1234", 2, 2)
  with pytest.raises(distributed.DistributedFlagError, match="missing: --coordinator_address"):
    distributed.plan("explicit", None, 2, 0)
  with pytest.raises(distributed.DistributedFlagError, match="missing: --num_processes, --process_id"):
    distributed.plan("detect", "127.0.0.1:1234")
  with pytest.raises(distributed.DistributedFlagError, match="--coordinator_address='127.0.0.1' must be HOST:PORT"):
    distributed.plan("explicit", "127.0.0.1", 2, 0)
  with pytest.raises(distributed.DistributedFlagError, match="port 'x'"):
    distributed.plan("explicit", "127.0.0.1:x", 2, 0)
  with pytest.raises(distributed.DistributedFlagError, match="wildcard"):
    distributed.plan("explicit", "0.0.0.0:1234", 2, 0)
  with pytest.raises(
    distributed.DistributedFlagError,
    match="--distributed=off runs one process; drop --coordinator_address, --num_processes, --process_id",
  ):
    distributed.plan("off", "127.0.0.1:1234", 2, 0)
  with pytest.raises(distributed.DistributedFlagError, match="--num_processes=0 must be at least 1"):
    distributed.plan("explicit", "127.0.0.1:1234", 0, 0)


def test_plans():
  assert distributed.plan(environ={}).kwargs is None  # The default: one process, nothing initialised.
  assert distributed.plan("off", environ={"TPU_WORKER_HOSTNAMES": "a,b"}).kwargs is None
  pod = distributed.plan(environ={"TPU_WORKER_HOSTNAMES": "a,b"})
  assert (pod.mode, pod.kwargs) == ("auto", {})  # jax.distributed.initialize() with no arguments.
  assert distributed.plan(environ={"TPU_WORKER_HOSTNAMES": "a"}).kwargs is None  # One host.
  assert distributed.plan("auto", environ={}).kwargs == {}
  explicit = distributed.plan("detect", "10.0.0.1:8476", 4, 3, environ={})
  assert explicit.kwargs == {
    "coordinator_address": "10.0.0.1:8476",
    "coordinator_bind_address": "10.0.0.1:8476",
    "num_processes": 4,
    "process_id": 3,
    "cluster_detection_method": "deactivate",
  }
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}
  assert distributed.plan(environ=slurm).mode == "auto"  # A task of `srun -n 2`.
  assert distributed.plan(environ={**slurm, "SLURM_NTASKS": "1"}).kwargs is None
  assert distributed.plan(environ={k: v for k, v in slurm.items() if k != "SLURM_STEP_NODELIST"}).kwargs is None
  assert distributed.plan(environ={"OMPI_COMM_WORLD_SIZE": "4"}).mode == "auto"  # A rank of `mpirun -np 4`.
  assert distributed.plan(environ={"OMPI_COMM_WORLD_SIZE": "1"}).kwargs is None
  assert distributed.loopback_host("127.0.0.1:1") == "127.0.0.1"
  assert distributed.loopback_host("[::1]:1") == "::1"
  assert distributed.loopback_host("localhost:1") == "127.0.0.1"
  assert distributed.loopback_host("10.0.0.1:1") is None


def test_bad_flags_stop_the_command_line_with_a_message(tmp_path):
  result = subprocess.run(
    _command(tmp_path, "--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=5"),
    cwd=REPO,
    env=_env(None),
    capture_output=True,
    text=True,
    timeout=DEADLINE_S,
  )
  assert result.returncode == 1
  assert "error: --process_id=5 is out of range for --num_processes=2" in result.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_a_slurm_step_finds_its_processes_by_itself(tmp_path):
  """Two tasks of a (simulated) `srun -n 2` step: the process count and ids come from Slurm's environment
  through JAX's cluster detection; only the coordinator address is given, to keep it on 127.0.0.1 (Slurm's
  default would listen on every interface of the first node)."""
  address = f"127.0.0.1:{helpers.free_port()}"
  slurm = lambda i: {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_NODELIST": "127.0.0.1",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": str(i),
    "SLURM_LOCALID": str(i),
    "SLURM_STEP_NUM_NODES": "1",
  }
  command = _command(tmp_path / "slurm", "--distributed=auto", f"--coordinator_address={address}")
  p0, p1 = _run_together([_start(command, DEVICES_PER_PROCESS, slurm(i)) for i in range(2)])
  assert "process 0 of 2, 2 local / 4 global devices" in p0, p0[-3000:]
  assert "process 1 of 2, 2 local / 4 global devices" in p1, p1[-3000:]
  assert [r["step"] for r in _records(tmp_path / "slurm")] == list(range(1, 13))
