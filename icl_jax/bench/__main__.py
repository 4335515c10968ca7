"""Command line: `python -m icl_jax.bench --config=configs/linreg.py [--config.FIELD=VALUE ...]`, or
`python -m icl_jax.bench --benchmark=roofline [--torch_python=PYTHON]` (its own configs, no --config).

Prints one JSON line per benchmark of `icl_jax.bench.benchmarks` (README, "Speed"). JAX's own options are
flags too: on a multi-core CPU, `--jax_num_cpu_devices=2` times the data-parallel step on two CPU devices, as
`python -m icl_jax.main` trains with the same flag.
"""

import json
import pathlib
import shutil
import sys

import jax
from absl import app
from absl import flags
from ml_collections import config_flags

from icl_jax import cli
from icl_jax.bench import benchmarks
from icl_jax.runtime import config_files

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  cli.CONFIG_HELP,
  lock_config=True,
)
_BENCHMARK = flags.DEFINE_multi_enum(
  "benchmark",
  ["train_step", "eval"],
  [*benchmarks.BENCHMARKS, "roofline"],
  "Benchmarks to run (roofline: alone, without --config).",
)
_PEAK_FLOPS = flags.DEFINE_float("peak_flops", 0.0, "The device's peak FLOP/s for MFU; 0: known GPUs only.")
_TORCH_PYTHON = flags.DEFINE_string(
  "torch_python",
  "",
  "A Python with torch and transformers (a separate environment): also time the PyTorch "
  "reference at the same shapes and print the ratio.",
)
# benchmarks/ and configs/ sit next to the package in the repository (an editable install or a checkout).
_REPO = pathlib.Path(__file__).resolve().parents[2]
_TORCH_REFERENCE = flags.DEFINE_string(
  "torch_reference", str(_REPO / "benchmarks" / "torch_gpt2_linreg.py"), "The PyTorch reference training step."
)
_TIMED_STEPS = flags.DEFINE_integer("timed_steps", 0, "Steps timed (0: 3 dispatches).")
# The roofline benchmark's configs: Garg et al.'s paper model, timed over 20 steps in chunks of 10 (1.3 s a
# step on 2 CPU cores), and the quick model at batch 64, the two rows of README's speed table.
ROOFLINE_CONFIG = _REPO / "configs" / "linreg.py"
ROOFLINE_PAPER = {"train.steps_per_dispatch": 10}
ROOFLINE_SMALL = {"train.batch_size": 64}


def roofline_configs() -> tuple:
  """The paper and small configs of the roofline benchmark."""
  module = config_files.load_file(ROOFLINE_CONFIG)
  paper, small = module.get_config("paper"), module.get_config("quick")
  for config, overrides in ((paper, ROOFLINE_PAPER), (small, ROOFLINE_SMALL)):
    config.update_from_flattened_dict(overrides)
  return paper, small


def main(argv):
  roofline = _BENCHMARK.value == ["roofline"]
  if roofline:
    if _CONFIG.value is not None:
      raise app.UsageError("--benchmark=roofline times its own configs: drop --config")
  elif "roofline" in _BENCHMARK.value:
    raise app.UsageError("--benchmark=roofline runs alone: give it as the only --benchmark")
  elif _CONFIG.value is None:
    raise app.UsageError("--config is required (except for --benchmark=roofline)")
  if _TORCH_PYTHON.value and shutil.which(_TORCH_PYTHON.value) is None:
    sys.exit(f"error: --torch_python={_TORCH_PYTHON.value}: no such interpreter")
  if _TORCH_PYTHON.value and not pathlib.Path(_TORCH_REFERENCE.value).is_file():
    sys.exit(
      f"error: --torch_reference={_TORCH_REFERENCE.value}: no such file (it is benchmarks/torch_gpt2_linreg.py "
      "of the repository)"
    )
  if roofline:
    paper, small = (cli.checked_config(c, argv) for c in roofline_configs())
    print(json.dumps(benchmarks.bench_roofline(paper, small, _TORCH_PYTHON.value, _TORCH_REFERENCE.value)), flush=True)
    return
  config = cli.checked_config(_CONFIG.value, argv)
  for name in _BENCHMARK.value:
    if name == "train_step":
      line = benchmarks.bench_train_step(config, _PEAK_FLOPS.value, _TIMED_STEPS.value)
      print(json.dumps(line), flush=True)
      if _TORCH_PYTHON.value:
        reference = benchmarks.bench_torch(config, _TORCH_PYTHON.value, _TORCH_REFERENCE.value)
        print(json.dumps(reference), flush=True)
        print(
          json.dumps(
            {
              "name": "speedup_vs_torch",
              "ratio": reference["ms_per_step"] / line["ms_per_step"],
              "jax_ms_per_step": line["ms_per_step"],
              "torch_ms_per_step": reference["ms_per_step"],
            }
          ),
          flush=True,
        )
    else:
      print(json.dumps(benchmarks.BENCHMARKS[name](config)), flush=True)


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main, flags_parser=cli.parse_flags)
