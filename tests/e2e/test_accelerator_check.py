"""`python -m icl_jax.accelerator_check`: bad arguments. Every part at CPU size runs in tests/e2e/test_gpu_check.py."""

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


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
