"""Ahn et al.'s analysis of a trained linear self-attention (analysis/lsa_analysis.py)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icl_jax import data
from icl_jax import train
from icl_jax.analysis import evaluate
from icl_jax.analysis import lsa_analysis
from tests import helpers


def test_identity_fit():
  alpha, dist = lsa_analysis.identity_fit(-0.7 * np.eye(5))
  assert alpha == pytest.approx(-0.7) and dist == pytest.approx(0.0, abs=1e-12)
  alpha, dist = lsa_analysis.identity_fit(np.diag([1.0, -1.0]))  # Traceless: no multiple of I helps.
  assert alpha == pytest.approx(0.0) and dist == pytest.approx(1.0)


def test_read_off_recovers_planted_multiples_of_sigma_inverse():
  task = helpers.ahn_task()
  sigma = np.asarray(data.covariance_matrix(task), np.float64)
  planted_a = (-0.69, -0.43, -1.71)
  params = {f"layer_{i}": {"A": jnp.asarray(a * np.linalg.inv(sigma), jnp.float32)} for i, a in enumerate(planted_a)}
  report = lsa_analysis.layer_report(params, sigma)
  np.testing.assert_allclose([r["a"] for r in report], planted_a, rtol=1e-4)
  np.testing.assert_allclose([r["dist"] for r in report], 0.0, atol=1e-4)
  assert all(r["dist_unscaled"] > 0.3 for r in report)  # Sigma^-1 is far from a multiple of I.
  # A non-symmetric A and a full-form B are read off as stored (Ahn et al.'s code's orientation).
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
  full = {"layer_0": {"A": jnp.asarray(a, jnp.float32), "B": jnp.asarray(b, jnp.float32)}}
  np.testing.assert_allclose(lsa_analysis.read_off(full)[0], a, rtol=1e-6)
  report = lsa_analysis.layer_report(full, np.eye(5))
  assert report[0]["b"] == pytest.approx(np.trace(b) / 5, rel=1e-5)


def test_quick_train_and_analysis_end_to_end(tmp_path):
  config = helpers.tiny_lsa_config(learning_rate=0.05)
  config.train.update(num_steps=30, batch_size=64, steps_per_dispatch=30, checkpoint_every=30)
  config.eval.num_prompts = 128
  train.train_and_evaluate(config, tmp_path, devices=jax.devices()[:1])
  results = evaluate.evaluate(config, tmp_path)  # What --mode=eval runs: the family's own analysis.
  assert not (tmp_path / "eval").exists()
  out = tmp_path / "lsa_analysis"
  for name in ("results.json", "lsa_analysis.png", "lsa_analysis.pdf", "lsa_matrices.png", "lsa_matrices.pdf"):
    assert (out / name).stat().st_size > 0
  saved = json.loads((out / "results.json").read_text())
  assert saved["step"] == 30 and len(saved["a"]) == len(saved["dist"]) == 3
  assert saved["paper"]["a"] == [-0.69, -0.43, -1.71]
  loss = saved["test_loss"]
  for name in ("lsa", "preconditioned_gd", "gd", "preconditioned_gd_learned_steps", "least_squares", "zero"):
    assert len(loss[name]["mean"]) == config.task.n_points
  assert loss["preconditioned_gd"]["learning_rate"] in lsa_analysis.STEP_GRID
  assert loss["least_squares"]["mean"][-1] < 1e-6  # Noiseless, n = 7 > d = 5: exact.
  assert results["final_test_loss"]["lsa"] < loss["zero"]["mean"][-1]  # It learned something in 30 steps.
  assert len(lsa_analysis.summary_lines(results)) == 4
