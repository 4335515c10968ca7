"""A full disk and a read-only filesystem, for real: the CLI runs in a private mount namespace (`unshare`) on a
small tmpfs, so the mount is seen by nothing outside the test and goes away with it. Skipped where the
kernel or the container does not allow a user to make one."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
UNSHARE = ["unshare", "--user", "--map-root-user", "--mount"]
TINY = ["--config=tests/tiny_config.py", "--config.train.checkpoint_every=4", "--config.eval.after_training=False"]
PAGE = 4096  # tmpfs counts whole pages.


def _env() -> dict:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # One device, as a user's run.
  env["JAX_PLATFORMS"] = "cpu"
  return env


@pytest.fixture(scope="module")
def namespace(tmp_path_factory):
  """Skips the module unless this user can mount a tmpfs in a private mount namespace."""
  where = tmp_path_factory.mktemp("probe")
  try:
    probe = subprocess.run(
      [*UNSHARE, "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {where} && touch {where}/x"],
      capture_output=True,
      text=True,
      timeout=60,
    )
  except FileNotFoundError:
    pytest.skip("no unshare(1) here")
  if probe.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs in a private mount namespace here: {probe.stderr.strip()}")


def _in_namespace(script: str, tmp_path: pathlib.Path) -> None:
  """Runs the bash `script` in a private mount namespace, with $DISK (an empty directory to mount on), $OUT
  (on the real filesystem), $MAIN (the CLI: python -m icl_jax.main) and $TINY (the tiny config's flags)."""
  disk, out = tmp_path / "disk", tmp_path / "out"
  disk.mkdir()
  out.mkdir()
  env = {
    **_env(),
    "DISK": str(disk),
    "OUT": str(out),
    "MAIN": f"{sys.executable} -m icl_jax.main",
    "TINY": " ".join(TINY),
  }
  done = subprocess.run(
    [*UNSHARE, "bash", "-c", "set -u\n" + script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
  )
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def _assert_one_error_line(stderr: str, *expected: str) -> None:
  """One `error:` line, the last one; Orbax's background threads may log their own tracebacks before it, but no
  frame of this package may show."""
  errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and all(e in errors[0] for e in expected), stderr[-3000:]
  assert stderr.strip().splitlines()[-1] == errors[0], stderr[-3000:]
  assert not [line for line in stderr.splitlines() if 'File "' in line and "/icl_jax/" in line], stderr[-3000:]


def _tmpfs_bytes(paths) -> int:
  return sum(math.ceil(p.stat().st_size / PAGE) * PAGE for p in paths if p.is_file())


def test_a_disk_that_fills_during_training_keeps_the_last_checkpoint(namespace, tmp_path):
  """The disk has room for the run and one checkpoint and a half: saving step 8 fails with ENOSPC, which ends
  in one `error:` line naming the disk, not in TensorBoard's failing flush."""
  probe = tmp_path / "probe"
  done = subprocess.run(
    [sys.executable, "-m", "icl_jax.main", *TINY, "--config.train.num_steps=4", f"--workdir={probe}"],
    cwd=REPO,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  checkpoint = _tmpfs_bytes((probe / "checkpoints" / "4").rglob("*"))
  rest = _tmpfs_bytes([*probe.glob("*.json*"), *(probe / "tensorboard").rglob("*")]) + PAGE  # + lock.json
  size_k = (rest + checkpoint + checkpoint // 2) // 1024
  _in_namespace(
    f"""
mount -t tmpfs -o size={size_k}k tmpfs "$DISK"
$MAIN $TINY --config.train.num_steps=12 --workdir="$DISK/run" 2> "$OUT/full.stderr"; echo $? > "$OUT/full.rc"
cp -a "$DISK/run" "$OUT/after_failure"
mount -o remount,size=64m "$DISK"
$MAIN $TINY --config.train.num_steps=12 --workdir="$DISK/run" 2> "$OUT/rerun.stderr"; echo $? > "$OUT/rerun.rc"
""",
    tmp_path,
  )
  out = tmp_path / "out"
  assert (out / "full.rc").read_text().strip() == "1", (out / "full.stderr").read_text()[-3000:]
  _assert_one_error_line((out / "full.stderr").read_text(), "saving a checkpoint", "No space left on device")
  after = out / "after_failure"
  assert sorted(p.name for p in (after / "checkpoints").iterdir() if p.name.isdigit()) == ["4"]
  assert not (after / "lock.json").exists()
  # Once there is room, the same command resumes from the kept checkpoint and finishes.
  assert (out / "rerun.rc").read_text().strip() == "0", (out / "rerun.stderr").read_text()[-3000:]
  rerun = (out / "rerun.stderr").read_text()
  assert "at step 4." in rerun and "Trained to step 12" in rerun


def test_a_read_only_filesystem_is_one_error_line_and_changes_nothing(namespace, tmp_path):
  _in_namespace(
    """
mount -t tmpfs -o size=64m tmpfs "$DISK"
$MAIN $TINY --config.train.num_steps=4 --workdir="$DISK/run" 2> "$OUT/first.stderr" || exit 3
mount -o remount,ro "$DISK"
$MAIN $TINY --config.train.num_steps=8 --allow_config_change --workdir="$DISK/run" 2> "$OUT/train.stderr"
echo $? > "$OUT/train.rc"
$MAIN $TINY --config.train.num_steps=4 --mode=eval --workdir="$DISK/run" 2> "$OUT/eval.stderr"
echo $? > "$OUT/eval.rc"
cp -a "$DISK/run" "$OUT/after"
""",
    tmp_path,
  )
  out, disk = tmp_path / "out", tmp_path / "disk"
  for mode in ("train", "eval"):
    assert (out / f"{mode}.rc").read_text().strip() == "1", (out / f"{mode}.stderr").read_text()[-3000:]
    _assert_one_error_line((out / f"{mode}.stderr").read_text(), f"--workdir={disk / 'run'}", "Read-only file system")
  after = out / "after"
  assert json.loads((after / "config.json").read_text())["train"]["num_steps"] == 4
  assert sorted(p.name for p in (after / "checkpoints").iterdir() if p.name.isdigit()) == ["4"]
