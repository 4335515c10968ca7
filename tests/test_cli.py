"""The command line as a user runs it: kill -9 and SIGTERM in the middle of a run, then the same command again."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# Long enough to be interrupted between checkpoints, short enough for CI.
FLAGS = ["--config=tests/tiny_config.py", "--config.train.num_steps=1500", "--config.train.checkpoint_every=100",
         "--config.train.log_every=50", "--config.train.steps_per_dispatch=10"]


def _command(workdir):
  return [sys.executable, "-m", "icl_jax.main", *FLAGS, f"--workdir={workdir}"]


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # One CPU device: the multi-device paths are covered in-process.
  return env


def _start(workdir):
  return subprocess.Popen(_command(workdir), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(process, workdir, timeout=120):
  deadline = time.time() + timeout
  checkpoints = workdir / "checkpoints"
  while time.time() < deadline:
    if process.poll() is not None:
      pytest.fail(f"the run ended before it could be interrupted:\n{process.stderr.read()[-3000:]}")
    if checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir()):
      return
    time.sleep(0.02)
  pytest.fail("no checkpoint appeared")


def _records(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _run_to_end(workdir):
  result = subprocess.run(_command(workdir), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  _run_to_end(workdir)
  return _records(workdir)


def _committed_steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_kill_9_then_same_command_gives_bit_identical_losses(tmp_path, uninterrupted):
  process = _start(tmp_path)
  _wait_for_checkpoint(process, tmp_path)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert _committed_steps(tmp_path)[-1] < 1500, "the kill came too late to test a resume"
  _run_to_end(tmp_path)
  resumed = _records(tmp_path)
  assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted]
  assert [r["loss"] for r in resumed] == [r["loss"] for r in uninterrupted]  # Bit for bit.


def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path, uninterrupted):
  process = _start(tmp_path)
  _wait_for_checkpoint(process, tmp_path)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr[-3000:]
  assert "SIGTERM received" in stderr
  stopped_at = _committed_steps(tmp_path)[-1]
  assert stopped_at < 1500 and stopped_at % 10 == 0
  _run_to_end(tmp_path)
  assert [r["loss"] for r in _records(tmp_path)] == [r["loss"] for r in uninterrupted]
