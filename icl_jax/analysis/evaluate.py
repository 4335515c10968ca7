"""`evaluate(config, workdir)`: the evaluation of a trained run, chosen by its model family.

GPT-2 and the LSTM are probed layer by layer (`probing`, Fu et al.'s protocol); linear self-attention is read
off its weights (`lsa_analysis`, Ahn et al.'s). A new family registers its evaluation here, so that models never
import the analysis.
"""

import pathlib
from typing import Callable

import ml_collections

from icl_jax.analysis import lsa_analysis
from icl_jax.analysis import probing

# config.model.family -> (config, workdir, params or None) -> results, written under the workdir.
EVALUATIONS: dict[str, Callable[[ml_collections.ConfigDict, pathlib.Path, dict | None], dict]] = {
    "gpt2": probing.evaluate,
    "lstm": probing.evaluate,
    "lsa": lsa_analysis.evaluate,
}


def evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, params: dict | None = None) -> dict:
  """Evaluates the latest checkpoint in `workdir` (or `params`) as its family's evaluation does; returns the
  results it writes under `workdir`."""
  return EVALUATIONS[config.model.family](config, pathlib.Path(workdir), params)
