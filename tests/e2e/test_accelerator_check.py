"""`python -m icl_jax.accelerator_check --tiny`: the accelerator check's every part, at CPU size, as CI runs it."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_tiny_check_writes_every_figure(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # One CPU device, as a one-GPU machine has.
  result = subprocess.run(
    [sys.executable, "-m", "icl_jax.accelerator_check", "--config=tests/tiny_config.py", "--tiny", f"--out={tmp_path}"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  path = tmp_path / "accelerator_check.json"
  assert f"Wrote {path}" in result.stdout
  report = json.loads(path.read_text())
  provenance = report["provenance"]
  assert provenance["versions"]["jax"] and provenance["platform"] == "cpu" and provenance["device_count"] == 1
  assert report["tests"]["exit_status"] == 0 and report["tests"]["counts"]["passed"] > 0
  steps = report["train_step"]
  assert sorted((s["dtype"], s["batch_size"]) for s in steps) == [
    ("bfloat16", 16),
    ("bfloat16", 64),
    ("float32", 16),
    ("float32", 64),
  ]
  assert all(s["ms_per_step"] > 0 and "mfu" in s and s["model_flops_per_step"] > 0 for s in steps)
  assert set(report["projection"]["hours"]) == {"float32", "bfloat16"}
  curves = report["dtype_curves"]
  for dtype in ("float32", "bfloat16"):
    assert curves[dtype]["steps"] == list(range(5, 41, 5)) and len(curves[dtype]["loss"]) == 8
  assert 0.5 < curves["final_loss_ratio_bf16_to_f32"] < 2  # The same seed and data: bfloat16 rounding only.
  assert report["evaluation"]["seconds"] > 0 and report["evaluation"]["first_call_with_compilation_s"] > 0


def test_bad_arguments_are_one_line(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "icl_jax.accelerator_check",
      "--config=tests/tiny_config.py",
      f"--out={tmp_path}",
      "--config.model.dtype=float16",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode == 1 and "config.model.dtype = 'float16'" in result.stderr
  assert "Traceback" not in result.stderr and not (tmp_path / "accelerator_check.json").exists()
