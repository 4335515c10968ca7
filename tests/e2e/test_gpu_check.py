"""`bash launch/gpu_check.sh --tiny`: the GPU machine's one prepared run, rehearsed at CPU size from a wheelhouse
(launch/wheelhouse.py, from the package index as the test environment's own install) into an empty target, so
that no part of the GPU run executes there for the first time."""

import importlib.metadata
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import tarfile

REPO = pathlib.Path(__file__).resolve().parents[2]
# What the rehearsal's target lacks: this environment less one small pure-Python dependency.
MISSING = "ml-collections"


def _gpu_check(*args: str) -> subprocess.CompletedProcess:
  """`bash launch/gpu_check.sh --tiny ARGS` under this interpreter, on one CPU device (as one GPU)."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "OUT")}
  return subprocess.run(
    ["bash", "launch/gpu_check.sh", "--tiny", *args],
    cwd=REPO,
    env=dict(env, PYTHON=sys.executable),
    capture_output=True,
    text=True,
    timeout=900,
    check=False,
  )


def test_the_tiny_rehearsal_installs_the_wheelhouse_stops_training_by_sigterm_and_packs_the_results(tmp_path):
  canonical = lambda name: re.sub(r"[-_.]+", "-", name).lower()
  have = sorted(
    f"{d.metadata['Name']}=={d.version}"
    for d in importlib.metadata.distributions()
    if canonical(d.metadata["Name"]) != MISSING
  )
  (tmp_path / "have.txt").write_text("\n".join(have) + "\n")
  wheels, target, out = tmp_path / "wheels", tmp_path / "target", tmp_path / "out"
  build = subprocess.run(
    [
      sys.executable,
      "launch/wheelhouse.py",
      f"--have={tmp_path / 'have.txt'}",
      f"--out={wheels}",
      f"--python-version={sys.version_info.major}.{sys.version_info.minor}",
      f"--glibc={platform.libc_ver()[1]}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert build.returncode == 0, build.stderr[-3000:]
  manifest = json.loads((wheels / "wheelhouse.json").read_text())
  assert [w["file"].split("-")[0] for w in manifest["wheels"]] == ["ml_collections"]  # Exactly what it lacks.

  result = _gpu_check(f"--wheelhouse={wheels}", f"--target={target}", f"--out={out}")
  assert result.returncode == 0, result.stdout[-3000:] + (out / "gpu_check.log").read_text()[-5000:]
  report = json.loads((out / "gpu_check.json").read_text())
  steps = report["steps"]
  assert steps["install"]["wheels"] == [w["file"] for w in manifest["wheels"]]
  assert steps["train"]["stopped_at_budget"] and steps["train"]["exit_status"] == 75  # SIGTERM: checkpoint, 75.
  assert all(steps[s]["exit_status"] == 0 for s in ("install", "imports", "check", "evaluate"))
  trained = report["trained_steps"]["isotropic_seed0"]
  assert 0 < trained["trained"] < trained["of"] == 6000
  imported = subprocess.run(
    [sys.executable, "-c", "import ml_collections; print(ml_collections.__file__)"],
    env=dict(os.environ, PYTHONPATH=str(target)),
    capture_output=True,
    text=True,
    check=True,
  )
  assert imported.stdout.startswith(str(target))  # The wheelhouse's copy, installed into the target.

  assert sorted(p.name for p in out.iterdir()) == sorted(
    ["accelerator_check.json", "gpu_check.json", "gpu_check.log", "report.tar.gz", "isotropic_seed0.npz"]
  )
  assert report["within_limits"] and report["files"]["isotropic_seed0.npz"] > 0
  with tarfile.open(out / "report.tar.gz") as tar:
    names = set(tar.getnames())
    assert {"partial/REPORT.md", "partial/report.json", "partial/summaries/isotropic_seed0.json"} <= names
    assert {"runs/isotropic_seed0/metrics.jsonl", "runs/isotropic_seed0/provenance.json"} <= names
    partial_report = tar.extractfile("partial/REPORT.md").read().decode()
    summary = json.loads(tar.extractfile("partial/summaries/isotropic_seed0.json").read())
  assert "scale `quick-partial`" in partial_report and "**Partially trained runs**: isotropic_seed0" in partial_report
  assert summary["trained_steps"] == trained["trained"] and summary["curve"]["step"] == trained["trained"]

  check = json.loads((out / "accelerator_check.json").read_text())
  assert check["done"] == ["tests", "train_step", "projection", "evaluation", "dtype_curves"]
  provenance = check["provenance"]
  assert provenance["versions"]["jax"] and provenance["platform"] == "cpu" and provenance["device_count"] == 1
  assert check["tests"]["exit_status"] == 0 and check["tests"]["counts"]["passed"] > 0
  assert sorted((s["dtype"], s["batch_size"]) for s in check["train_step"]) == [
    ("bfloat16", 16),
    ("bfloat16", 64),
    ("float32", 16),
    ("float32", 64),
  ]
  assert all(s["ms_per_step"] > 0 and "mfu" in s and s["model_flops_per_step"] > 0 for s in check["train_step"])
  assert set(check["projection"]["hours"]) == {"float32", "bfloat16"}
  curves = check["dtype_curves"]
  for dtype in ("float32", "bfloat16"):
    assert curves[dtype]["steps"] == list(range(5, 41, 5)) and len(curves[dtype]["loss"]) == 8
  assert 0.5 < curves["final_loss_ratio_bf16_to_f32"] < 2  # The same seed and data: bfloat16 rounding only.
  assert check["evaluation"]["seconds"] > 0 and check["evaluation"]["first_call_with_compilation_s"] > 0


def test_a_wheelhouse_that_does_not_install_ends_the_run_before_any_compute_and_says_so(tmp_path):
  (tmp_path / "wheels").mkdir()
  (tmp_path / "wheels" / "broken-1.0-py3-none-any.whl").write_text("not a zip archive")
  result = _gpu_check(f"--wheelhouse={tmp_path / 'wheels'}", f"--out={tmp_path / 'out'}")
  assert result.returncode == 1 and "FAILED" in result.stdout
  report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
  assert report["steps"]["install"]["exit_status"] != 0 and "check" not in report["steps"] and not report["ok"]
