"""Command line: `python -m icl_jax.accelerator_check --config=configs/linreg.py --out=DIR [--size=full]`.

Checks this machine's accelerator path in one run and writes DIR/accelerator_check.json
(`icl_jax.accelerator_check.checks`): versions and devices, the accelerator-relevant tests on the default backend,
the training step in float32 and bfloat16 at two batch sizes with MFU, the projected time of the config's run,
the full evaluation, and float32 against bfloat16 loss curves. About 8 minutes on one H100/H200-class GPU with
the paper config (`--size=full`), at most 3 with `--size=short`; `--size=tiny --config=tests/tiny_config.py` runs
every part on a CPU in about a minute.
"""

import pathlib
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from icl_jax import cli
from icl_jax.accelerator_check import checks

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Experiment config file[:variant]: configs/linreg.py (the paper's run) for the full check, "
  "tests/tiny_config.py with --size=tiny. Override any field with --config.FIELD=VALUE.",
  lock_config=True,
)
_OUT = flags.DEFINE_string("out", None, "Directory for accelerator_check.json (created if missing).")
_SIZE = flags.DEFINE_enum(
  "size",
  "full",
  list(checks.SIZES),
  "How much to run (checks.SIZES): full (about 8 minutes on one GPU), short (at most 3: loss curves of 300 "
  "steps), tiny (small sizes and the tests on CPU: every step in about a minute on a CPU, as CI runs it).",
)
flags.mark_flags_as_required(["config", "out"])

# The tests run from the checkout the package sits in (an editable install or the repository itself).
REPO = pathlib.Path(__file__).resolve().parents[2]


def main(argv):
  config = cli.checked_config(_CONFIG.value, argv)
  if not (REPO / "tests" / "conftest.py").is_file():
    sys.exit(f"error: no tests/ next to the package in {REPO}: run from a checkout (pip install -e .)")
  path = checks.run_check(config, REPO, pathlib.Path(_OUT.value), _SIZE.value)
  print(f"Wrote {path}", flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
