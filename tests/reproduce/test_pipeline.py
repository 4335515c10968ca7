"""`python -m icl_jax.reproduce`: the smoke scale end to end, resuming, the claims' grading rules, bad input."""

import json
import re
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from icl_jax.reproduce import claims
from icl_jax.reproduce import experiments
from icl_jax.reproduce import pipeline
from icl_jax.reproduce import report
from icl_jax.runtime import errors
from tests import helpers

SEEDS = (0, 1)


def _plan(root, scale="smoke", seeds=SEEDS):
  return pipeline.plan(scale, root, seeds, experiments.default_config_dir())


def test_smoke_scale_trains_evaluates_grades_and_resumes(tmp_path, monkeypatch):
  runs = _plan(tmp_path)
  assert sorted({r.experiment.name for r in runs}) == ["isotropic", "kappa100", "lsa", "lstm", "noisy"]
  grades = pipeline.reproduce(runs, tmp_path, "smoke", SEEDS, "python -m icl_jax.reproduce --scale=smoke")
  assert [(g.claim.experiment, g.claim.id) for g in grades] == [(c.experiment, c.id) for c in claims.CLAIMS]
  verdicts = {(g.claim.experiment, g.claim.id): g.verdict for g in grades}
  # Smoke grades nothing: every measurable claim is measured and NOT GRADED; the others say why they are not run.
  assert set(verdicts.values()) == {"NOT GRADED", "NOT RUN"}
  assert verdicts["isotropic", "newton_flattens"] == verdicts["isotropic", "newton_sequence"] == "NOT RUN"
  assert verdicts["constructions", "newton_construction"] == verdicts["isotropic", "newton_slope"] == "NOT GRADED"
  for g in grades:
    if g.verdict != "NOT RUN" and g.claim.experiment != "constructions":
      assert g.quantity.seeds == 2 and g.quantity.low <= g.quantity.mean <= g.quantity.high, g
  report = json.loads((tmp_path / "report.json").read_text())
  assert [c["verdict"] for c in report["claims"]] == [g.verdict for g in grades]
  markdown = (tmp_path / "REPORT.md").read_text()
  assert "checks the pipeline, not the science" in markdown
  assert markdown.count("| **NOT GRADED** (") + markdown.count("| **NOT RUN** |") == len(claims.CLAIMS)
  assert "## Where Newton and GD can be told apart" in markdown
  assert "python -m icl_jax.reproduce --scale=smoke" in markdown
  assert (tmp_path / "figures" / "best_match.png").stat().st_size > 0

  # A second call neither trains nor evaluates again, and grades the same.
  stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/*/results.json")}
  metrics = {p: p.read_text() for p in tmp_path.glob("*/metrics.jsonl")}
  assert len(stamps) == len(runs) and len(metrics) == len(runs)
  again = pipeline.reproduce(_plan(tmp_path), tmp_path, "smoke", SEEDS, "same")
  assert [g.verdict for g in again] == [g.verdict for g in grades]
  assert stamps == {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/*/results.json")}
  assert metrics == {p: p.read_text() for p in tmp_path.glob("*/metrics.jsonl")}
  # So does the command line, given no --experiments (every experiment), and REPORT.md names its command.
  out = _reproduce("--scale=smoke", f"--root={tmp_path}", "--seeds=0,1", cwd=helpers.REPO)
  assert out.returncode == 0, out.stderr[-3000:]
  assert stamps == {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/*/results.json")}
  assert (
    f"python -m icl_jax.reproduce --scale=smoke --root={tmp_path} --seeds=0,1" in (tmp_path / "REPORT.md").read_text()
  )

  # A root holding only the runs' summaries (a few kB each, what a committed report keeps) grades the same
  # without any checkpoint, training or evaluation.
  summaries = sorted(p.name for p in (tmp_path / "summaries").glob("*.json"))
  assert summaries == sorted(f"{r.workdir.name}.json" for r in runs)
  assert max((tmp_path / "summaries" / name).stat().st_size for name in summaries) < 60_000
  # Beside each probed run's summary, the model's outputs it was computed from.
  outputs = sorted(p.name for p in (tmp_path / "summaries").glob("*.npz"))
  assert outputs == sorted(f"{r.workdir.name}.npz" for r in runs if r.config.model.family != "lsa")
  elsewhere = tmp_path / "elsewhere"
  shutil.copytree(tmp_path / "summaries", elsewhere / "summaries")
  monkeypatch.setattr(pipeline.train, "train_runs", lambda *args: pytest.fail("trained a summarised run"))
  monkeypatch.setattr(pipeline.evaluate, "evaluate", lambda *args: pytest.fail("evaluated a summarised run"))
  regraded = pipeline.reproduce(_plan(elsewhere), elsewhere, "smoke", SEEDS, "same")
  assert [(g.verdict, g.quantity) for g in regraded] == [(g.verdict, g.quantity) for g in grades]
  # Reanalysed from the saved model outputs alone (no checkpoint), the summaries say what the evaluation said.
  before = {p.name: json.loads(p.read_text()) for p in (elsewhere / "summaries").glob("*.json")}
  reanalysed = pipeline.reproduce(_plan(elsewhere), elsewhere, "smoke", SEEDS, "same", reanalysed=True)
  after = {p.name: json.loads(p.read_text()) for p in (elsewhere / "summaries").glob("*.json")}
  assert helpers.close(after, before) and [g.quantity for g in reanalysed] == [g.quantity for g in grades]
  # A reproduction in parts: `only` trains and evaluates those experiments (here already summarised) and grades
  # the others from whatever summaries the root holds; an experiment with none is NOT RUN.
  part = tmp_path / "part"
  shutil.copytree(tmp_path / "summaries", part / "summaries", ignore=shutil.ignore_patterns("kappa100_*"))
  partial = pipeline.reproduce(_plan(part), part, "smoke", SEEDS, "same", only=("isotropic",))
  assert [(g.verdict, g.quantity) for g in partial if g.claim.experiment != "kappa100"] == [
    (g.verdict, g.quantity) for g in grades if g.claim.experiment != "kappa100"
  ]
  assert {(g.verdict, g.reason) for g in partial if g.claim.experiment == "kappa100"} == {
    ("NOT RUN", "no finished run of this experiment")
  }
  # A summary of another configuration is refused, naming the file and the field.
  path = elsewhere / "summaries" / "isotropic_seed1.json"
  summary = json.loads(path.read_text())
  summary["config"]["train"]["num_steps"] = 1
  summary["config"]["eval"]["num_prompts"] = 1  # Unlike a resumed training, a summary's evaluation must match.
  path.write_text(json.dumps(summary))
  with pytest.raises(
    errors.ConfigError,
    match=r"isotropic_seed1.json summarises a run of another "
    r"configuration(.|\n)*config.eval.num_prompts: summarised 1"
    r"(.|\n)*config.train.num_steps: summarised 1",
  ):
    pipeline.reproduce(_plan(elsewhere), elsewhere, "smoke", SEEDS, "same")


@pytest.mark.parametrize("committed", helpers.COMMITTED_REPORTS, ids=lambda p: p.name)
def test_each_committed_report_is_what_its_summaries_grade(tmp_path, monkeypatch, committed):
  """docs/{medium,large}_report/report.json is what `python -m icl_jax.reproduce` makes of the committed
  summaries: every trained claim's verdict and numbers (see `helpers.assert_grades_as_committed`)."""
  helpers.assert_grades_as_committed(helpers.regrade_committed_report(tmp_path, monkeypatch, committed), committed)


def test_partial_evaluates_each_run_at_its_latest_checkpoint_apart_and_grades_nothing(tmp_path):
  """`--partial` (a run stopped by a time budget): evaluated at its latest checkpoint into ROOT/partial/, its
  fraction of steps reported, no claim graded; ROOT/summaries/ untouched; a later full evaluation redoes the
  results and the error curve of the partial one, never reusing them."""
  only, seed = ("isotropic",), (0,)
  pipeline.reproduce(_plan(tmp_path, seeds=seed), tmp_path, "smoke", seed, "cmd", only=only)
  full = json.loads((tmp_path / "summaries" / "isotropic_seed0.json").read_text())
  assert full["trained_steps"] == full["curve"]["step"] == 40
  last = tmp_path / "isotropic_seed0" / "checkpoints" / "40"
  shutil.move(last, tmp_path / "step40")  # As if stopped at step 20 (checkpoint_every 20).
  for path in (tmp_path / "summaries").glob("isotropic_seed0.*"):
    path.unlink()
  grades = pipeline.reproduce(_plan(tmp_path, seeds=seed), tmp_path, "smoke", seed, "cmd --partial", only, partial=True)
  assert not list((tmp_path / "summaries").glob("isotropic_seed0.*"))
  summary = json.loads((tmp_path / "partial" / "summaries" / "isotropic_seed0.json").read_text())
  assert summary["trained_steps"] == summary["curve"]["step"] == 20
  assert (tmp_path / "partial" / "summaries" / "isotropic_seed0.npz").exists()
  isotropic = [g for g in grades if g.claim.experiment == "isotropic"]
  assert {g.verdict for g in isotropic} == {"NOT GRADED", "NOT RUN"}
  assert {g.reason for g in isotropic if g.verdict == "NOT GRADED"} == {
    "partially trained (50.0% of its steps): the claims are about trained models"
  }
  markdown = (tmp_path / "partial" / "REPORT.md").read_text()
  assert "scale `smoke-partial`" in markdown and "**Partially trained runs**: isotropic_seed0 50.0%" in markdown
  assert "| 20 of 40 (50.0%) |" in markdown
  shutil.move(tmp_path / "step40", last)
  pipeline.reproduce(_plan(tmp_path, seeds=seed), tmp_path, "smoke", seed, "cmd", only=only)
  again = json.loads((tmp_path / "summaries" / "isotropic_seed0.json").read_text())
  assert again["trained_steps"] == again["curve"]["step"] == 40
  assert helpers.close(again, full)


def test_a_sigterm_during_training_stops_before_any_evaluation(tmp_path, monkeypatch):
  """A stopped group (its checkpoints saved) ends the reproduction with None: nothing later trains, nothing is
  evaluated or graded, and the same call resumes (the resumption itself: test_train)."""
  groups = []

  def preempted_group(configs, workdirs):
    groups.append([w.name for w in workdirs])
    return [{"step": 20, "final": None, "preempted": True} for _ in configs]

  monkeypatch.setattr(pipeline.train, "train_runs", preempted_group)
  monkeypatch.setattr(pipeline.evaluate, "evaluate", lambda *args: pytest.fail("evaluated an unfinished run"))
  assert pipeline.reproduce(_plan(tmp_path), tmp_path, "smoke", SEEDS, "cmd") is None
  assert groups == [["isotropic_seed0", "isotropic_seed1"]]
  assert not (tmp_path / "REPORT.md").exists()


def test_large_scale_trains_each_run_alone_and_other_scales_each_experiments_seeds_together(tmp_path, monkeypatch):
  """Large-rung runs vmapped together on two XLA CPU devices hang (docs/large_search.md): `--seeds=0,1` trains
  them one after another there, and vmapped together at the other scales."""
  groups = []

  def trained_group(configs, workdirs):
    groups.append([w.name for w in workdirs])
    return [{"step": c.train.num_steps, "final": None, "preempted": False} for c in configs]

  monkeypatch.setattr(pipeline.train, "train_runs", trained_group)
  assert pipeline.train_all(_plan(tmp_path, "large"), "large")
  assert groups == [["isotropic_seed0"], ["isotropic_seed1"], ["kappa100_seed0"], ["kappa100_seed1"]]
  medium = [r for r in _plan(tmp_path, "medium") if r.experiment.name in ("isotropic", "kappa100")]
  assert [[r.workdir.name for r in g] for g in pipeline.training_groups(medium, "medium")] == [
    ["isotropic_seed0", "isotropic_seed1"],
    ["kappa100_seed0", "kappa100_seed1"],
  ]


def test_every_scale_plans_valid_configs(tmp_path):
  for scale in experiments.SCALES:
    runs = _plan(tmp_path, scale, (0,))
    assert [r.experiment for r in runs] == list(experiments.scale_experiments(scale))
  large = {r.experiment.name: r.config for r in _plan(tmp_path, "large", (0,))}
  assert sorted(large) == ["isotropic", "kappa100"] and large["kappa100"].task.kappa == 100
  assert (large["isotropic"].task.n_dims, large["isotropic"].task.n_points, large["isotropic"].model.width) == (
    20,
    41,
    64,
  )
  medium = {r.experiment.name: r.config for r in _plan(tmp_path, "medium", (0,))}
  assert medium["isotropic"].model.num_layers == 12 and medium["kappa100"].task.kappa == 100
  assert medium["noisy"].task.noise_std == 0.1 and medium["noisy"].eval.ridge == pytest.approx(0.01)
  paper = {r.experiment.name: r.config for r in _plan(tmp_path, "paper", (0,))}
  assert (paper["isotropic"].task.n_dims, paper["isotropic"].train.num_steps) == (20, 500_000)


def test_an_invalid_experiment_config_is_named_before_any_compute(tmp_path, monkeypatch):
  broken = experiments.Experiment(
    "broken", "a 4-layer model fit over layers 1-5", "linreg.py", (("eval.fit_layers", (1, 5)),)
  )
  monkeypatch.setattr(experiments, "EXPERIMENTS", experiments.EXPERIMENTS + (broken,))
  with pytest.raises(errors.ConfigError, match=r"broken_seed0: config.eval.fit_layers = \(1, 5\)"):
    _plan(tmp_path, "quick", (0,))


# ---------------------------------------------------------------------------------------------------------------
# The command line.


def _reproduce(*args, cwd):
  return subprocess.run(
    [sys.executable, "-m", "icl_jax.reproduce", *args],
    capture_output=True,
    text=True,
    cwd=cwd,
    env=helpers.subprocess_env(),
    timeout=600,
  )


def test_dry_run_prints_each_experiment_and_its_projected_cost(tmp_path):
  """Both spellings; each distinct shape is timed once (the probed GPT-2 experiments share one)."""
  out = _reproduce("--scale=smoke", f"--root={tmp_path}", "--seeds=0,1", "--dry-run", cwd=helpers.REPO)
  assert out.returncode == 0, out.stderr
  rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  assert [r["experiment"] for r in rows] == ["isotropic", "kappa100", "noisy", "lstm", "lsa", "lsa"]
  assert all(r["ms_per_step"] > 0 and r["hours"] > 0 and r["already_trained"] == [] for r in rows)
  assert rows[0]["ms_per_step"] == rows[1]["ms_per_step"] == rows[2]["ms_per_step"]
  assert re.fullmatch(r"total: \d+ h \d\d min of training .*", out.stdout.splitlines()[-1])
  assert not any(tmp_path.iterdir())  # Nothing trained, nothing written.
  again = _reproduce("--scale=smoke", f"--root={tmp_path}", "--seeds=0,1", "--dry_run", cwd=helpers.REPO)
  assert again.returncode == 0 and len([line for line in again.stdout.splitlines() if line.startswith("{")]) == 6


@pytest.mark.parametrize("seconds_per_step,timed", [(0.05, [(10, 1), (100, 1)]), (0.2, [(10, 1)])])
def test_dry_run_times_trainings_own_dispatch_where_it_is_cheap(monkeypatch, seconds_per_step, timed):
  """Ten-step dispatches first; one of training's 100 steps as well where it is projected at most
  FULL_DISPATCH_S (10 s), whose timing is then the projection's."""
  calls = []

  def timer(config):
    def seconds(steps, dispatches):
      calls.append((steps, dispatches))
      return seconds_per_step * (1 + 1 / steps)

    return seconds, 0.0

  monkeypatch.setattr(pipeline.benchmarks, "train_step_timer", timer)
  config = ml_collections.ConfigDict({"train": {"steps_per_dispatch": 100}})
  got = pipeline._timed_step(config)
  assert calls == timed
  assert got == {
    "ms_per_step": pytest.approx(1e3 * seconds_per_step * (1 + 1 / timed[-1][0])),
    "timed_steps_per_dispatch": timed[-1][0],
  }


@pytest.mark.parametrize(
  "args,message",
  [
    (("--seeds=0,x",), "--seeds=0,x: expected integers"),
    (("--config_dir=/nonexistent",), "--config_dir=/nonexistent: no linreg.py there"),
    (("--experiments=isotropic,gpt3",), "--experiments=isotropic,gpt3: unknown gpt3; the experiments are isotropic,"),
  ],
)
def test_bad_flags_are_one_error_line(tmp_path, args, message):
  out = _reproduce("--scale=smoke", f"--root={tmp_path / 'r'}", *args, cwd=helpers.REPO)
  assert out.returncode != 0 and message in out.stderr, out.stderr
  assert not (tmp_path / "r").exists()


def test_one_seeds_figure_bars_span_the_steps_within_its_interval():
  """With one seed the figure's bars are the steps whose SimE is within the bootstrap interval of the best
  (not that interval of SimE values, which once drew negative error bars)."""
  summary = json.loads((helpers.COMMITTED_REPORT / "summaries" / "noisy_seed0.json").read_text())
  summary["config"] = ml_collections.ConfigDict(summary["config"])
  within = summary["eval"]["best_match_interval"]["newton"]["within_interval"]
  best, low, high = report._series([summary], "newton", np.asarray)
  np.testing.assert_array_equal(low, [min(w) for w in within])
  np.testing.assert_array_equal(high, [max(w) for w in within])
  assert np.all(low <= best) and np.all(best <= high)
  assert report.figure({"noisy": [summary]}) is not None
