"""Builds the frozen evaluation set (a second or so per setting) and prints its content hashes.

python -m icl_jax.datasets.build --data_dir=DIR [--settings=isotropic,kappa100,noisy]
"""

import time

import tensorflow_datasets as tfds
from absl import app
from absl import flags

from icl_jax import datasets

_DATA_DIR = flags.DEFINE_string(
  "data_dir", None, "Directory the set is written to (DIR/linreg_eval/...).", required=True
)
_SETTINGS = flags.DEFINE_list("settings", list(datasets.SETTINGS), "Settings to build.")


def main(argv):
  del argv
  tfds.disable_progress_bar()
  start = time.perf_counter()
  hashes = datasets.build(_DATA_DIR.value, _SETTINGS.value)
  for setting, digest in hashes.items():
    print(f"{datasets.directory(_DATA_DIR.value, setting)}  content_sha256 {digest}")
  print(f"Built and verified in {time.perf_counter() - start:.1f} s.")


if __name__ == "__main__":
  app.run(main)
