"""A sweep end to end at tiny size: grouped training, evaluation, report with intervals, and resumption."""

import json

import pytest

from icl_jax.runtime import errors
from icl_jax.sweep import grid
from icl_jax.sweep import report
from tests import tiny_config


def _sweep_config():
  config = tiny_config.get_config()
  config.sweep = dict(num_layers=(1, 2), kappa=(1.0, 100.0), seeds=(0, 1), evaluate=True)
  return config


def test_sweep_trains_evaluates_reports_and_resumes(tmp_path):
  config = _sweep_config()
  runs = grid.validate(config)
  assert len(runs) == 8 and {r.eval.fit_layers for r in runs} == {(1, 1), (1, 2)}
  grid.run_sweep(config, tmp_path)
  names = [grid.run_name(r) for r in runs]
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
  entries = report.write(runs, tmp_path, names)
  assert [(e["num_layers"], e["kappa"]) for e in entries] == [(1, 1.0), (1, 100.0), (2, 1.0), (2, 100.0)]
  for e in entries:
    assert e["final_error_per_dim"]["seeds"] == 2
    assert e["final_error_per_dim"]["low"] <= e["final_error_per_dim"]["mean"] <= e["final_error_per_dim"]["high"]
    assert len(e["newton_steps_per_layer"]["mean"]) == e["num_layers"]
  out = tmp_path / "sweep"
  assert json.loads((out / "results.json").read_text()) == entries
  assert "| 2 | 100 | 2 |" in (out / "report.md").read_text()
  for stem in ("final_error_vs_depth", "newton_steps_vs_layer", "newton_slope_depth_kappa"):
    assert (out / f"{stem}.png").stat().st_size > 0 and (out / f"{stem}.pdf").stat().st_size > 0
  # A second call finds everything done and neither trains nor evaluates again.
  stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/eval/results.json")}
  metrics = {p: p.read_text() for p in tmp_path.glob("*/metrics.jsonl")}
  grid.run_sweep(config, tmp_path)
  assert stamps == {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/eval/results.json")}
  assert metrics == {p: p.read_text() for p in tmp_path.glob("*/metrics.jsonl")}


def test_bad_sweep_values_are_named():
  config = _sweep_config()
  config.sweep.kappa = ()
  with pytest.raises(errors.ConfigError, match=r"config.sweep.kappa = \(\)"):
    grid.validate(config)
  config = _sweep_config()
  config.sweep.kappa = (0.5,)
  with pytest.raises(errors.ConfigError, match=r"run L1_kappa0.5_seed0: (.|\n)*config.task.kappa = 0.5"):
    grid.validate(config)


def test_a_sigterm_stops_the_sweep_before_the_next_group(tmp_path, monkeypatch):
  """A SIGTERM during a group's training (its checkpoints saved) ends the sweep: no later group trains and
  nothing is evaluated."""
  config = _sweep_config()
  config.sweep.num_layers = (1, 2)  # Two groups (one per depth).
  groups = []

  def preempted_group(runs, workdirs):
    groups.append([w.name for w in workdirs])
    return [{"step": 3, "final": None, "preempted": True} for _ in runs]

  monkeypatch.setattr(grid.train, "train_runs", preempted_group)
  monkeypatch.setattr(grid.evaluate, "evaluate", lambda *args: pytest.fail("evaluated an unfinished run"))
  assert grid.run_sweep(config, tmp_path) is False
  assert len(groups) == 1
