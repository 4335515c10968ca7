"""One prepared check of a machine's accelerator path, behind `python -m icl_jax.accelerator_check`.

In one run it records (`run_check`), into one JSON file:

  provenance: versions, git commit, platform, device kind and count, date (`run_logs.provenance`);
  tests: the accelerator-relevant tests (analysis precision, pinned algorithm values, the model, the pinned
    first training step) run on this machine's default backend, with their pass/fail counts;
  train_step: the training step of the config (`benchmarks.bench_train_step`) in float32 and bfloat16 at each
    batch size of `sizes.batch_sizes`, with MFU where the device's peak is known;
  projection: the hours that config.train.num_steps (500k for the paper) take at the measured step time;
  dtype_curves: the config trained `sizes.curve_steps` steps in float32 and in bfloat16 from the same seed:
    both loss curves and the ratio of their final losses (mean of the last `sizes.curve_tail` records);
  evaluation: the full evaluation of the config (`benchmarks.bench_eval`), seconds with and after compilation.

`SIZES["full"]` is sized for about 8 minutes on one H100/H200-class GPU with the paper config, `SIZES["short"]`
for at most 3 (launch/gpu_check.py's first part: loss curves of a few hundred steps); `SIZES["tiny"]` runs the
same steps on a tiny config on a CPU in about a minute (CI runs it). The report is rewritten after each part, so
that a run stopped by a time limit keeps the parts it finished ("done" lists them).
"""

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import ml_collections

from icl_jax import train
from icl_jax.bench import benchmarks
from icl_jax.runtime import run_logs


@dataclasses.dataclass(frozen=True)
class Sizes:
  batch_sizes: tuple[int, ...]  # Global batch sizes of the step benchmark.
  curve_steps: int  # Training steps of each dtype's loss curve.
  curve_log_every: int  # Steps between the curves' records.
  curve_tail: int  # Records averaged for the final-loss ratio.
  tests: tuple[str, ...]  # pytest node ids, relative to the repository root.


# The accelerator-relevant tests: analysis precision, pinned algorithm values, the model, the first step.
ACCELERATOR_TESTS = (
  "tests/analysis/test_precision.py",
  "tests/analysis/test_algorithms.py",
  "tests/models/test_gpt2.py",
  "tests/test_train.py::test_first_training_step_is_pinned",
)
SIZES = {
  "full": Sizes(batch_sizes=(64, 1024), curve_steps=2000, curve_log_every=100, curve_tail=5, tests=ACCELERATOR_TESTS),
  "short": Sizes(batch_sizes=(64, 1024), curve_steps=300, curve_log_every=25, curve_tail=3, tests=ACCELERATOR_TESTS),
  "tiny": Sizes(
    batch_sizes=(16, 64), curve_steps=40, curve_log_every=5, curve_tail=2, tests=("tests/analysis/test_precision.py",)
  ),
}
DTYPES = ("float32", "bfloat16")


def run_tests(repo: pathlib.Path, tests: tuple[str, ...], default_backend: bool) -> dict:
  """pytest on `tests`; with `default_backend` on the machine's default JAX backend (GPU, TPU) instead of the
  test suite's CPU default. Returns the counts pytest reports and its exit status."""
  env = dict(os.environ)
  if default_backend:
    env["JAX_PLATFORMS"] = ""  # tests/conftest.py only sets it when unset: "" lets JAX pick the accelerator.
    # This process already holds JAX's preallocated share of the GPU's memory (75%): the tests allocate as
    # they go, from the rest.
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  start = time.perf_counter()
  result = subprocess.run(
    [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
    cwd=repo,
    env=env,
    capture_output=True,
    text=True,
    check=False,
  )
  summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
  counts = {word: int(number) for number, word in re.findall(r"(\d+) (passed|failed|error|errors|skipped)", summary)}
  return {
    "tests": list(tests),
    "exit_status": result.returncode,
    "summary": summary,
    "counts": counts,
    "wall_s": time.perf_counter() - start,
    "failures": result.stdout[-4000:] if result.returncode else "",
  }


def _with(config: ml_collections.ConfigDict, **fields) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted `fields` ("model.dtype") set."""
  out = config.copy_and_resolve_references()
  for path, value in fields.items():
    section, _, name = path.rpartition(".")
    node = out
    for part in section.split("."):
      node = node[part]
    node[name] = value
  return out


def step_benchmarks(config: ml_collections.ConfigDict, sizes: Sizes) -> list[dict]:
  return [
    benchmarks.bench_train_step(_with(config, **{"model.dtype": dtype, "train.batch_size": batch}))
    for dtype in DTYPES
    for batch in sizes.batch_sizes
  ]


def projection(config: ml_collections.ConfigDict, steps: list[dict]) -> dict:
  """Hours for config.train.num_steps at the config's own batch size, per dtype."""
  batch = config.train.batch_size
  hours = {s["dtype"]: s["ms_per_step"] * config.train.num_steps / 3.6e6 for s in steps if s["batch_size"] == batch}
  return {"num_steps": config.train.num_steps, "batch_size": batch, "hours": hours}


def dtype_curves(config: ml_collections.ConfigDict, sizes: Sizes) -> dict:
  """The config trained in each dtype from the same seed for `sizes.curve_steps` steps."""
  curves = {}
  with tempfile.TemporaryDirectory() as scratch:
    for dtype in DTYPES:
      run = _with(
        config,
        **{
          "model.dtype": dtype,
          "train.num_steps": sizes.curve_steps,
          "train.log_every": sizes.curve_log_every,
          "train.checkpoint_every": sizes.curve_steps,
          "train.keep_period": 0,
          "eval.after_training": False,
        },
      )
      start = time.perf_counter()
      result = train.train_and_evaluate(run, pathlib.Path(scratch) / dtype)
      records = [
        json.loads(line) for line in (pathlib.Path(scratch) / dtype / "metrics.jsonl").read_text().splitlines()
      ]
      curves[dtype] = {
        "steps": [r["step"] for r in records],
        "loss": [r["loss"] for r in records],
        "wall_s": time.perf_counter() - start,
        "last_ratio_to_zero": result["error_curve"]["last_ratio_to_zero"],
      }
  tail = {dtype: sum(c["loss"][-sizes.curve_tail :]) / sizes.curve_tail for dtype, c in curves.items()}
  return {**curves, "final_loss": tail, "final_loss_ratio_bf16_to_f32": tail["bfloat16"] / tail["float32"]}


def run_check(config: ml_collections.ConfigDict, repo: pathlib.Path, out_dir: pathlib.Path, size: str) -> pathlib.Path:
  """Runs every part (module docstring) at `size` (a key of SIZES) and writes OUT_DIR/accelerator_check.json
  after each; returns its path. The tests run on the default backend except at "tiny" (a CPU's own size)."""
  sizes = SIZES[size]
  start = time.perf_counter()
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / "accelerator_check.json"
  report = {"mode": size, "provenance": run_logs.provenance(), "sizes": dataclasses.asdict(sizes), "done": []}
  parts = (
    ("tests", lambda: run_tests(repo, sizes.tests, default_backend=size != "tiny")),
    ("train_step", lambda: step_benchmarks(config, sizes)),
    ("projection", lambda: projection(config, report["train_step"])),
    ("evaluation", lambda: benchmarks.bench_eval(config)),
    ("dtype_curves", lambda: dtype_curves(config, sizes)),
  )
  for name, part in parts:
    report[name] = part()
    report["done"].append(name)
    report["wall_s"] = time.perf_counter() - start
    run_logs.write_atomically(path, json.dumps(report, indent=2) + "\n")
  return path
