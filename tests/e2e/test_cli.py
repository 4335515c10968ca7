"""The command line as a user runs it: kill -9 and SIGTERM in the middle of a run, then the same command again."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from icl_jax.runtime import errors

REPO = pathlib.Path(__file__).resolve().parents[2]
# Long enough to be interrupted between checkpoints, short enough for CI.
FLAGS = [
  "--config=tests/tiny_config.py",
  "--config.train.num_steps=1500",
  "--config.train.checkpoint_every=100",
  "--config.train.log_every=50",
  "--config.train.steps_per_dispatch=10",
]


def _command(workdir):
  return [sys.executable, "-m", "icl_jax.main", *FLAGS, f"--workdir={workdir}"]


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # One CPU device: the multi-device paths are covered in-process.
  return env


def _start(workdir):
  return subprocess.Popen(
    _command(workdir), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
  )


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
  assert process.returncode == errors.EXIT_PREEMPTED == 75, stderr[-3000:]  # Not 0: a scheduler can tell.
  assert "SIGTERM received" in stderr and "exit status 75 (rerun to resume)" in stderr
  stopped_at = _committed_steps(tmp_path)[-1]
  assert stopped_at < 1500 and stopped_at % 10 == 0
  _run_to_end(tmp_path)
  assert [r["loss"] for r in _records(tmp_path)] == [r["loss"] for r in uninterrupted]


FAILING_SAVE = '''
import runpy
import sys

from orbax.checkpoint._src.path import atomicity

create = atomicity._create_tmp_directory


async def refuse_step_8(make_dir, tmp_dir, **kwargs):
  """What an unwritable or immutable checkpoint directory does to Orbax: creating step 8's directory fails."""
  if "8" in (tmp_dir.name.split(".")[0], tmp_dir.parent.name.split(".")[0]):
    raise PermissionError(13, "Permission denied", str(tmp_dir))
  return await create(make_dir, tmp_dir, **kwargs)


atomicity._create_tmp_directory = refuse_step_8
sys.argv = ["icl_jax.main"] + sys.argv[1:]
runpy.run_module("icl_jax.main", run_name="__main__")
'''


def test_a_failed_checkpoint_save_exits_at_once_and_keeps_the_last_checkpoint(tmp_path):
  """The save of step 8 fails in Orbax's background thread, whose blocked threads must not keep the process
  alive: it exits 1 within seconds with one error line; checkpoint 4 restores, and once the fault is gone the
  same command finishes the run."""
  script = tmp_path / "failing_save.py"
  script.write_text(FAILING_SAVE)
  workdir = tmp_path / "run"
  flags = ["--config=tests/tiny_config.py", "--config.train.num_steps=12", f"--workdir={workdir}"]
  start = time.monotonic()
  env = {**_env(), "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
  result = subprocess.run(
    [sys.executable, str(script), *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 1 and time.monotonic() - start < 60, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "saving a checkpoint" in errors[0] and "Permission denied" in errors[0]
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["4"]
  assert not (workdir / "lock.json").exists()
  finished = subprocess.run(
    [sys.executable, "-m", "icl_jax.main", *flags], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300
  )
  assert finished.returncode == 0, finished.stderr[-3000:]
  assert "Resumed from" in finished.stderr and "at step 4" in finished.stderr


BLOCKED_SAVE = '''
import asyncio
import faulthandler
import runpy
import signal
import sys

from orbax.checkpoint._src.path import atomicity

create = atomicity._create_tmp_directory


async def block_step_8(make_dir, tmp_dir, **kwargs):
  """Storage that stops answering: creating step 8's directory never returns."""
  if "8" in (tmp_dir.name.split(".")[0], tmp_dir.parent.name.split(".")[0]):
    print("BLOCKED step 8", file=sys.stderr, flush=True)
    await asyncio.sleep(3600)
  return await create(make_dir, tmp_dir, **kwargs)


atomicity._create_tmp_directory = block_step_8
# _finish asks a run that hangs where its threads are (into a file: a run that is ending may have closed stderr).
STACKS = open(__file__ + ".stacks", "w")
faulthandler.register(signal.SIGUSR1, file=STACKS, all_threads=True)
sys.argv = ["icl_jax.main"] + sys.argv[1:]
runpy.run_module("icl_jax.main", run_name="__main__")
'''


def _blocked_save(tmp_path, *flags) -> tuple[subprocess.Popen, list]:
  """Starts the tiny run of 12 steps whose save of step 8 never finishes; returns it once the save is blocked,
  and the list its stderr lines are collected in."""
  script = tmp_path / "blocked_save.py"
  script.write_text(BLOCKED_SAVE)
  env = {**_env(), "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
  process = subprocess.Popen(
    [sys.executable, str(script), "--config=tests/tiny_config.py", "--config.train.num_steps=12", *flags],
    cwd=REPO,
    env=env,
    stderr=subprocess.PIPE,
    text=True,
  )
  lines = []
  for line in process.stderr:
    lines.append(line)
    if line.startswith("BLOCKED"):
      break
  else:
    pytest.fail("the run ended before its save of step 8:\n" + "".join(lines[-40:]))
  return process, lines


def _finish(process, lines, timeout: float) -> str:
  """Waits for `process` at most `timeout` s (then has it print every thread's stack, and kills it); returns its
  whole stderr."""
  try:
    _, rest = process.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.send_signal(signal.SIGUSR1)
    time.sleep(2)
    process.kill()
    rest = process.communicate()[1]
    stacks = pathlib.Path(process.args[1] + ".stacks").read_text()
    pytest.fail(f"still running {timeout:g} s later:\n" + "".join(lines[-20:]) + rest[-3000:] + "\n" + stacks)
  return "".join(lines) + rest


def test_a_save_past_its_deadline_ends_the_run_and_keeps_the_last_checkpoint(tmp_path):
  """train.checkpoint_timeout_s = 3: the run ends with one error line a few seconds after its save stopped
  answering, checkpoint 4 is kept, and the same command without the fault resumes from it and finishes."""
  workdir = tmp_path / "run"
  flags = [f"--workdir={workdir}", "--config.train.checkpoint_timeout_s=3"]
  process, lines = _blocked_save(tmp_path, *flags)
  stderr = _finish(process, lines, timeout=60)
  errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert process.returncode == 1 and len(errors) == 1, stderr[-3000:]
  assert "did not finish within 3 s" in errors[0] and "train.checkpoint_timeout_s" in errors[0]
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["4"]
  finished = _main("--config=tests/tiny_config.py", "--config.train.num_steps=12", *flags)
  assert finished.returncode == 0 and "at step 4." in finished.stderr, finished.stderr[-3000:]


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 75), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_end_a_run_whose_save_is_stuck(tmp_path, signum, status):
  """With the default deadline (minutes), a signal ends the run within 30 s all the same: the stuck save is
  abandoned, checkpoint 4 is kept, and the exit status says which signal it was."""
  workdir = tmp_path / "run"
  process, lines = _blocked_save(tmp_path, f"--workdir={workdir}")
  time.sleep(1)  # The main thread is waiting for the save by now.
  sent = time.monotonic()
  process.send_signal(signum)
  stderr = _finish(process, lines, timeout=60)
  assert process.returncode == status and time.monotonic() - sent <= 30, stderr[-3000:]
  errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "abandoned it" in errors[0], stderr[-3000:]
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["4"]


def _main(*args):
  return subprocess.run(
    [sys.executable, "-m", "icl_jax.main", *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300
  )


def _one_error_line(result, expected: str, orbax_noise: bool = False) -> None:
  """Exit status 1 and one `error:` line, the last one, and no traceback. With `orbax_noise`, Orbax's own
  asyncio thread may print a traceback of asyncio frames only ("Event loop is closed") while a failed restore
  unwinds (orbax-checkpoint 0.12.8); none may pass through this package."""
  lines = result.stderr.splitlines()
  errors = [line for line in lines if line.startswith("error: ")]
  assert result.returncode == 1 and len(errors) == 1 and expected in errors[0], result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1] == errors[0], result.stderr[-3000:]
  assert result.stderr.count(expected) == 1, result.stderr[-3000:]  # Said once, not also as a log record.
  if orbax_noise:
    assert not [line for line in lines if 'File "' in line and "/icl_jax/" in line], result.stderr[-3000:]
  else:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def test_expected_failures_are_one_error_line(tmp_path):
  """Each of these ends in one error line and no traceback."""
  (tmp_path / "a_file").write_text("")
  tiny = "--config=tests/tiny_config.py"
  _one_error_line(
    _main("--config=/nonexistent/linreg.py", f"--workdir={tmp_path / 'w'}"),
    "--config: [Errno 2] No such file or directory: '/nonexistent/linreg.py'",
  )
  _one_error_line(_main(tiny, f"--workdir={tmp_path / 'a_file'}"), "is a file, not a directory")
  _one_error_line(_main(tiny, f"--workdir={tmp_path / 'a_file' / 'run'}"), "cannot create it (Not a directory)")


def test_a_checkpoint_that_does_not_restore_is_one_error_line(tmp_path):
  """Restoring into a model of another shape, and junk in the only checkpoint (nothing to fall back to): one
  `error:` line, last, with no TensorStore traceback, no error from closing the checkpoint manager in its place
  and nothing from Orbax's asyncio threads after it. The other shape is caught from the checkpoint's metadata,
  naming the first array that differs, before Orbax tries to restore it."""
  tiny, run = "--config=tests/tiny_config.py", tmp_path / "run"
  assert _main(tiny, "--config.train.num_steps=4", f"--workdir={run}").returncode == 0
  wider = _main(
    tiny, "--config.train.num_steps=8", "--config.model.width=32", "--allow_config_change", f"--workdir={run}"
  )
  _one_error_line(wider, f"cannot restore the checkpoint {run / 'checkpoints' / '4'}", orbax_noise=True)
  assert "is saved as float32[48], this configuration's state has float32[96]" in wider.stderr, wider.stderr[-3000:]
  for path in (run / "checkpoints" / "4").rglob("*"):
    if path.is_file():
      path.write_bytes(b"junk")
  _one_error_line(
    _main(tiny, "--config.train.num_steps=8", "--allow_config_change", f"--workdir={run}"),
    "cannot restore the checkpoint",
    orbax_noise=True,
  )
  assert (run / "checkpoints" / "4").is_dir()  # Not moved aside: there is nothing older to resume from.
