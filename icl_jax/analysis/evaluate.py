"""`evaluate(config, workdir)`: the evaluation of a trained run, chosen by its model family.

GPT-2 and the LSTM are probed layer by layer (`probing`, Fu et al.'s protocol); linear self-attention is read
off its weights (`lsa_analysis`, Ahn et al.'s). A new family registers its evaluation here, so that models never
import the analysis.
"""

from typing import Callable

import ml_collections

from icl_jax import checkpointing
from icl_jax import config_checks
from icl_jax.runtime import run_logs
from icl_jax.runtime import storage
from icl_jax.runtime import workdir_lock
from icl_jax.analysis import lsa_analysis
from icl_jax.analysis import probing

# config.model.family -> (config, workdir, params or None) -> results, written under the workdir.
EVALUATIONS: dict[str, Callable[[ml_collections.ConfigDict, storage.Path, dict | None], dict]] = {
    "gpt2": probing.evaluate,
    "lstm": probing.evaluate,
    "lsa": lsa_analysis.evaluate,
}


# Model and task fields that say how the model was trained, not what it is: the curriculum, the data's
# resampling, and the training dtype (the evaluation runs in float32 whatever it was).
_TRAINING_ONLY_FIELDS = ("task.curriculum.", "task.resample_every", "model.dtype")


def check_saved_model(config: ml_collections.ConfigDict, workdir: storage.Path) -> None:
  """Raises ConfigError unless `config`'s model and task fields equal those of WORKDIR/config.json (a training
  run's, or a converted Garg et al. checkpoint's), naming each differing field; FileNotFoundError without it."""
  saved = checkpointing.load_saved_config(workdir).to_dict()
  differences = [line for line in run_logs.config_differences(saved, run_logs.config_dict(config))
                 if line.startswith(("config.model.", "config.task.")) and
                 not line.removeprefix("config.").startswith(_TRAINING_ONLY_FIELDS)]
  if differences:
    raise config_checks.ConfigError(
        f"{workdir / 'config.json'} describes another model or task than the one requested; evaluating would "
        "report the wrong model. Differing fields:\n  " + "\n  ".join(differences) +
        "\nDrop these overrides (the saved values are used as given by --config), or evaluate another workdir.")


def evaluate(config: ml_collections.ConfigDict, workdir: str | storage.Path, params: dict | None = None) -> dict:
  """Evaluates the latest checkpoint in `workdir` (or `params`) as its family's evaluation does; returns the
  results it writes under `workdir`. Without `params`, the saved run must be of `config`'s model and task
  (`check_saved_model`)."""
  workdir = storage.path(workdir)
  if params is not None:  # The caller (training, at its end) holds the workdir.
    return EVALUATIONS[config.model.family](config, workdir, params)
  check_saved_model(config, workdir)
  with workdir_lock.hold(workdir, "evaluation"):
    return EVALUATIONS[config.model.family](config, workdir, params)
