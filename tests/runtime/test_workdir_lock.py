"""One process per workdir: two runs started together on one workdir, stale locks, locks held elsewhere."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

from icl_jax import train
from icl_jax.runtime import workdir_lock
from tests import helpers

REPO = pathlib.Path(__file__).resolve().parents[2]


def _command(workdir, seed):
  return [
    sys.executable,
    "-m",
    "icl_jax.main",
    "--config=tests/tiny_config.py",
    "--config.train.num_steps=300",
    "--config.train.log_every=10",
    "--config.train.checkpoint_every=100",
    f"--config.seed={seed}",
    f"--workdir={workdir}",
  ]


def test_two_runs_on_one_workdir_one_trains_the_other_stops_naming_it(tmp_path):
  """Started together with seeds 0 and 1 on one workdir, exactly one trains; the other exits 1 within
  seconds, naming the holder; the workdir (config.json, checkpoints, metrics.jsonl) is the winner's alone."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  processes = [
    subprocess.Popen(
      _command(tmp_path, seed), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    for seed in (0, 1)
  ]
  start = time.monotonic()
  ended = None
  while ended is None:
    ended = next((p for p in processes if p.poll() is not None), None)
    assert time.monotonic() - start < 120, "neither process ended"
    time.sleep(0.05)
  loser_s = time.monotonic() - start
  winner = next(p for p in processes if p is not ended)
  _, loser_err = ended.communicate()
  _, winner_err = winner.communicate(timeout=300)
  assert ended.returncode == 1 and winner.returncode == 0, winner_err[-2000:]
  assert loser_s < 60  # Before compiling anything (about 5 s of start-up on 2 cores).
  assert f"is in use: training by pid {winner.pid} on {socket.gethostname()}" in loser_err
  assert loser_err.count("\n") < 5, loser_err  # One error line, no traceback.
  winner_seed = processes.index(winner)
  assert json.loads((tmp_path / "config.json").read_text())["seed"] == winner_seed
  assert helpers.losses(tmp_path)[0] == list(range(10, 301, 10))
  assert not (tmp_path / workdir_lock.LOCK_FILE).exists()


def _dead_pid() -> int:
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  return process.pid


def test_a_stale_lock_of_a_dead_process_is_taken_over(tiny, tmp_path, caplog):
  """What `kill -9` leaves behind: the holder is gone, so the next run takes the lock with a warning."""
  (tmp_path / workdir_lock.LOCK_FILE).write_text(
    json.dumps(
      {"host": socket.gethostname(), "pid": _dead_pid(), "purpose": "training", "started": "2026-12-01T00:00:00"}
    )
  )
  with caplog.at_level("WARNING"):
    assert train.train_and_evaluate(tiny, tmp_path)["step"] == tiny.train.num_steps
  assert any("took over the stale lock" in r.getMessage() for r in caplog.records)
  assert not (tmp_path / workdir_lock.LOCK_FILE).exists()


def test_a_lock_held_on_another_host_is_refused_naming_it(tiny, tmp_path):
  (tmp_path / workdir_lock.LOCK_FILE).write_text(
    json.dumps({"host": "node-7", "pid": 4242, "purpose": "training", "started": "2026-12-01T09:00:00+00:00"})
  )
  with pytest.raises(
    workdir_lock.WorkdirLockedError,
    match=r"in use: training by pid 4242 on node-7, started 2026-12-01T09:00:00\+00:00; if that "
    r"process is gone, delete .*lock.json",
  ):
    train.train_and_evaluate(tiny, tmp_path)
  assert not (tmp_path / "checkpoints").exists()


def test_the_holder_may_take_its_lock_again(tmp_path):
  with workdir_lock.hold(tmp_path, "training"):
    with workdir_lock.hold(tmp_path, "evaluation"):
      assert json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())["purpose"] == "training"
    assert (tmp_path / workdir_lock.LOCK_FILE).exists()
  assert not (tmp_path / workdir_lock.LOCK_FILE).exists()
