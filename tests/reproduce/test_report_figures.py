"""The report's figures of the papers (Fu et al. Figs. 2, 5, 6, 8/10, 14; Ahn et al. Figs. 2, 4, 5, App. D) drawn
from run summaries: each maker draws from the committed medium summaries (and runs built from them for the
experiments not trained there) and says nothing when no summary has what it draws."""

import copy
import json

import ml_collections
from matplotlib.figure import Figure

from icl_jax.reproduce import experiments
from icl_jax.reproduce import report_figures
from tests import helpers


def _summary(name: str) -> dict:
  found = json.loads((helpers.COMMITTED_REPORT / "summaries" / f"{name}.json").read_text())
  return {**found, "config": ml_collections.ConfigDict(found["config"])}


def _by_experiment() -> dict:
  isotropic = [_summary(f"isotropic_seed{s}") for s in (0, 1)]
  lsa = [_summary(f"lsa_seed{s}") for s in (0, 1)]
  found = {"isotropic": isotropic, "lsa": lsa, "lstm": [_summary("lstm_seed0")]}
  for width in experiments.PAPER_HIDDEN_SIZES:
    runs = copy.deepcopy(isotropic)
    for run in runs:
      run["config"].model.width = experiments.hidden_size(width, 8)
    found[f"width{width}"] = runs
  for layers in (1, 2, 4):
    found[f"lsa_L{layers}"] = copy.deepcopy(lsa)
  gdpp = copy.deepcopy(lsa)
  for run in gdpp:
    run["eval"]["b"] = [0.9, 0.6, 1.0]
  found["gdpp"] = gdpp
  return found


def test_every_maker_draws_from_summaries_with_a_caption_giving_the_scale():
  by_experiment = _by_experiment()
  for name, maker in report_figures.MAKERS.items():
    made = maker(by_experiment)
    assert made is not None, name
    fig, caption = made
    assert isinstance(fig, Figure) and "d = " in caption, name


def test_makers_draw_nothing_without_what_they_draw():
  for maker in report_figures.MAKERS.values():
    assert maker({}) is None
  # Summaries written before a measurement existed (one without the forgetting test): that experiment is left out.
  lstm = [_summary("lstm_seed0"), _summary("lstm_seed1")]
  assert [name for name, _ in report_figures._with({"lstm": lstm}, ["lstm"], "forgetting")] == ["lstm"]
  lstm[1]["eval"].pop("forgetting")
  assert report_figures._with({"lstm": lstm}, ["lstm"], "forgetting") == []
