"""`evaluate(config, workdir)`: the evaluation of a trained run, chosen by its model family.

The one analysis module that touches a workdir: it restores the parameters (no optimiser), holds the workdir's
lock and writes what the pure analyses return. GPT-2 and the LSTM are probed layer by layer (`probing`, Fu et
al.'s protocol); linear self-attention is read off its weights (`lsa_analysis`, Ahn et al.'s). A new family
registers its evaluation here, so that models never import the analysis.
"""

import json
from typing import Callable
from typing import NamedTuple

import jax
import matplotlib
import ml_collections
from absl import logging
from matplotlib.figure import Figure

from icl_jax import checkpointing
from icl_jax import config_checks
from icl_jax.analysis import checks
from icl_jax.analysis import figures
from icl_jax.analysis import lsa_analysis
from icl_jax.analysis import probing
from icl_jax.runtime import config_fields
from icl_jax.runtime import config_files
from icl_jax.runtime import errors
from icl_jax.runtime import run_logs
from icl_jax.runtime import storage
from icl_jax.runtime import workdir_lock

DPI = 150


def config_errors(config: ml_collections.ConfigDict, num_devices: int) -> list[str]:
  """One line for each invalid field of `config`, training and evaluation alike, for a run on `num_devices`
  devices."""
  found = config_checks.errors(config, num_devices) + checks.eval_errors(config)
  return config_fields.with_non_finite(config, found)


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises ConfigError listing every line of `config_errors`, before anything is compiled."""
  config_fields.raise_if_any(config_errors(config, num_devices))


# Beside results.json: the model's outputs the probed evaluation was computed from (`probing.ModelOutputs`).
PREDICTIONS = "predictions.npz"


def _probe(config: ml_collections.ConfigDict, params: dict, step: int | None) -> tuple[dict, dict[str, bytes]]:
  evaluator, clock = probing.Evaluator(config), probing.Clock()
  outputs = evaluator.predict(params, clock)
  results = evaluator.analyse(outputs, clock)
  results["settings"]["checkpoint_step"] = step
  return results, {PREDICTIONS: probing.outputs_to_npz(outputs)}


def _analyse_lsa(config: ml_collections.ConfigDict, params: dict, step: int | None) -> tuple[dict, dict[str, bytes]]:
  results = lsa_analysis.analyse(config, jax.device_get(params), config.eval.num_prompts, lsa_analysis.TUNE_PROMPTS)
  results["step"] = step
  return results, {}


def _log_lsa(results: dict) -> None:
  for line in lsa_analysis.summary_lines(results):
    logging.info("%s", line)


class Evaluation(NamedTuple):
  """A family's evaluation: a pure analysis of parameters, and where and how its results are written."""

  # (config, params, step) -> (results, {file name: bytes} written beside results.json).
  analyse: Callable[[ml_collections.ConfigDict, dict, int | None], tuple[dict, dict[str, bytes]]]
  out_dir: str  # Under the workdir: results.json and the figures.
  figures: Callable[[dict], dict[str, Callable[[], Figure]]]  # results -> {file stem: draw()}.
  style: dict  # matplotlib rc settings of the figures.
  scalars: Callable[[dict], dict[str, float]] | None  # results -> TensorBoard tags, or None.
  log: Callable[[dict], None]  # Logs the headline numbers.


_PROBING = Evaluation(_probe, "eval", figures.makers, figures.STYLE, probing.summary_scalars, probing.log_summary)
EVALUATIONS: dict[str, Evaluation] = {
  "gpt2": _PROBING,
  "lstm": _PROBING,
  "lsa": Evaluation(_analyse_lsa, "lsa_analysis", lsa_analysis.figures, lsa_analysis.STYLE, None, _log_lsa),
}

# Model and task fields that say how the model was trained, not what it is: the curriculum, the data's
# resampling, and the training dtype (the evaluation runs in float32 whatever it was).
_TRAINING_ONLY_FIELDS = ("task.curriculum.", "task.resample_every", "model.dtype")


def check_saved_model(config: ml_collections.ConfigDict, workdir: storage.Path) -> None:
  """Raises ConfigError unless `config`'s model and task fields equal those of WORKDIR/config.json (a training
  run's, or a converted Garg et al. checkpoint's), naming each differing field; MissingFileError without it."""
  saved = checkpointing.load_saved_config(workdir).to_dict()
  differences = [
    line
    for line in config_files.config_differences(saved, config_files.config_dict(config))
    if line.startswith(("config.model.", "config.task."))
    and not line.removeprefix("config.").startswith(_TRAINING_ONLY_FIELDS)
  ]
  if differences:
    raise errors.ConfigError(
      f"{workdir / 'config.json'} describes another model or task than the one requested; evaluating would "
      "report the wrong model. Differing fields:\n  "
      + "\n  ".join(differences)
      + "\nDrop these overrides (the saved values are used as given by --config), or evaluate another workdir."
    )


def evaluate(config: ml_collections.ConfigDict, workdir: str | storage.Path, params: dict | None = None) -> dict:
  """Evaluates the latest checkpoint in `workdir` (or `params`) as its family's evaluation does; returns the
  results it writes under `workdir`. Without `params`, the saved run must be of `config`'s model and task
  (`check_saved_model`)."""
  workdir = storage.path(workdir)
  if params is not None:  # The caller (training, at its end) validated the config and holds the workdir.
    return _evaluate(config, workdir, params, None)
  validate(config, num_devices=1)
  check_saved_model(config, workdir)
  with workdir_lock.hold(workdir, "evaluation"):
    params, step = checkpointing.load_params(config, workdir)
    return _evaluate(config, workdir, params, step)


def _evaluate(config: ml_collections.ConfigDict, workdir: storage.Path, params: dict, step: int | None) -> dict:
  evaluation = EVALUATIONS[config.model.family]
  results, files = evaluation.analyse(config, params, step)
  results["provenance"] = {**run_logs.provenance(), "config": config_files.config_dict(config)}
  evaluation.log(results)
  if run_logs.is_writer():
    out = workdir / evaluation.out_dir
    out.mkdir(parents=True, exist_ok=True)
    for name, data_bytes in files.items():
      run_logs.write_atomically(out / name, data_bytes)
    run_logs.write_atomically(out / "results.json", json.dumps(results, indent=1) + "\n")
    pngs = [p for p in write_figures(evaluation.figures(results), evaluation.style, out) if p.suffix == ".png"]
    if evaluation.scalars is not None:
      run_logs.write_evaluation_summary(workdir, step or 0, evaluation.scalars(results), pngs, _hparams(config))
    logging.info(
      "Wrote %s and %d figures (PNG and PDF) in %s; TensorBoard: tensorboard --logdir %s",
      out / "results.json",
      len(pngs),
      out,
      workdir / "tensorboard",
    )
  return results


def write_figures(makers: dict[str, Callable[[], Figure]], style: dict, out_dir) -> list[storage.Path]:
  """Draws each figure of `makers` ({file stem: draw()}) under `style` and saves it as PNG and PDF into
  `out_dir`; returns the paths written."""
  out_dir = storage.path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = []
  with matplotlib.rc_context(style):
    for stem, make in makers.items():
      figure = make()
      for suffix in (".png", ".pdf"):
        paths.append(out_dir / f"{stem}{suffix}")
        storage.save_figure(figure, paths[-1], dpi=DPI)
  return paths


def _hparams(config: ml_collections.ConfigDict) -> dict:
  """The run's model, task and training settings as TensorBoard hyper-parameters (scalars and strings)."""
  flat = config_files.flatten({k: config_files.config_dict(config[k]) for k in ("model", "task", "train")})
  return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}
