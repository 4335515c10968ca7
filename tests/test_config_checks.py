"""Every invalid configuration stops before compilation with a message naming the field and what is allowed."""

import subprocess
import sys

import ml_collections
import pytest

from configs import linreg
from configs import lsa as lsa_config
from icl_jax.analysis import evaluate
from icl_jax.models import lsa
from icl_jax.runtime import errors
from tests.helpers import assert_field_error


@pytest.mark.parametrize(
  "field, value, expected",
  [
    ("task.kappa", 0.5, "config.task.kappa = 0.5: must be a number >= 1.0"),
    ("task.noise_std", -0.1, "config.task.noise_std = -0.1: must be a number >= 0.0"),
    ("task.n_points", 150, "config.model.n_positions = 202: allowed n_points <= 101"),
    ("task.spectrum", "flat", "config.task.spectrum = 'flat': allowed values are 'two_level', 'log_spaced'"),
    ("task.rotation", "never", "config.task.rotation = 'never': allowed values are 'per_prompt', 'per_batch'"),
    ("model.num_heads", 7, "config.model.num_heads = 7 does not divide config.model.width = 256"),
    ("model.family", "rnn", "config.model.family = 'rnn': allowed values are 'gpt2'"),
    ("model.num_layers", 0, "config.model.num_layers = 0: must be an integer >= 1"),
    ("train.num_steps", 0, "config.train.num_steps = 0: must be an integer >= 1"),
    ("train.num_steps", -5, "config.train.num_steps = -5: must be an integer >= 1"),
    ("train.batch_size", 60, "config.train.batch_size = 60 is not divisible by the 8 devices"),
    ("train.learning_rate", 0.0, "config.train.learning_rate = 0.0: must be a number > 0.0"),
    ("train.schedule", "step", "config.train.schedule = 'step': allowed values are 'constant', 'cosine', 'linear'"),
    ("train.adam_b2", 1.0, "config.train.adam_b2 = 1.0: must be a number in [0, 1)"),
    ("train.log_every", 0, "config.train.log_every = 0: must be an integer >= 1"),
    ("train.checkpoint_every", 0, "config.train.checkpoint_every = 0: must be an integer >= 1"),
    ("task.curriculum.dims_start", 21, "config.task.curriculum.dims_start = 21 exceeds config.task.n_dims = 20"),
    ("task.curriculum.points_interval", 0, "config.task.curriculum.points_interval = 0: must be an integer >= 1"),
    ("eval.num_prompts", 0, "config.eval.num_prompts = 0: must be an integer >= 1"),
    ("eval.readout", "mlp", "config.eval.readout = 'mlp': allowed values are 'least_squares', 'trained', 'model'"),
    (
      "eval.newton_alpha",
      "l2",
      "config.eval.newton_alpha = 'l2': allowed values are 'frobenius', 'frobenius_2', 'spectral'",
    ),
    ("eval.gd_gradient_scale", "avg", "config.eval.gd_gradient_scale = 'avg': allowed values are 'sum', 'mean'"),
    ("eval.gd_steps", (), "config.eval.gd_steps = (): must be a non-empty tuple of integers >= 1"),
    ("eval.gd_log_steps", (0, 2), "config.eval.gd_log_steps = (0, 2): must be a non-empty tuple of integers >= 1"),
    ("eval.sim_w_queries", 10, "config.eval.sim_w_queries = 10: must be an integer >= config.task.n_dims = 20"),
    ("eval.fit_layers", (5, 3), "config.eval.fit_layers = (5, 3): must be (first, last) with 1 <= first <= last"),
    ("eval.confidence", 1.0, "config.eval.confidence = 1.0: must be a number in (0, 1)"),
  ],
)
def test_invalid_field_is_named(field, value, expected):
  assert_field_error(linreg.get_config(), field, value, expected)


@pytest.mark.parametrize(
  "field",
  [
    "task.kappa",
    "task.noise_std",
    "train.learning_rate",
    "train.weight_decay",
    "train.adam_eps",
    "model.init_std",
    "model.layer_norm_epsilon",
    "eval.ridge",
    "eval.gd_learning_rate",
    "eval.probe_ridge",
  ],
)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_numbers_are_refused_in_every_float_field(field, value):
  """inf and nan are refused in every float field: otherwise the run compiles and then fails blaming the
  learning rate, or with adam_eps = inf trains with zero updates and exits 0."""
  config = linreg.get_config("quick")
  section, _, name = field.rpartition(".")
  config[section][name] = value
  with pytest.raises(errors.ConfigError) as info:
    evaluate.validate(config, num_devices=1)
  lines = [line for line in str(info.value).splitlines() if f"config.{field} = " in line]
  assert lines == [f"  config.{field} = {value!r}: must be a finite number"]


def test_paper_and_quick_configs_are_valid():
  for variant in ("paper", "quick"):
    assert evaluate.config_errors(linreg.get_config(variant), num_devices=8) == []


def test_all_errors_are_reported_together():
  config = linreg.get_config()
  config.task.kappa = 0.0
  config.train.num_steps = 0
  with pytest.raises(errors.ConfigError) as info:
    evaluate.validate(config, num_devices=1)
  assert "config.task.kappa" in str(info.value) and "config.train.num_steps" in str(info.value)


def test_command_line_reports_bad_field_and_exits_before_compiling(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "icl_jax.main",
      "--config=configs/linreg.py:quick",
      f"--workdir={tmp_path}",
      "--config.task.kappa=0.5",
    ],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 1
  assert "config.task.kappa = 0.5: must be a number >= 1.0" in result.stderr
  assert not (tmp_path / "checkpoints").exists()


# Ahn et al.'s setting (configs/lsa.py).
@pytest.mark.parametrize(
  "field, value, expected",
  [
    (
      "task.w_distribution",
      "sigma",
      "config.task.w_distribution = 'sigma': allowed values are 'identity', 'inverse_covariance'",
    ),
    ("task.resample_every", 0, "config.task.resample_every = 0: must be an integer >= 1"),
    (
      "task.eigenvalues",
      (1.0, 1.0),
      "config.task.eigenvalues = (1.0, 1.0): with config.task.spectrum = 'explicit' "
      "must be a tuple of config.task.n_dims = 5 numbers > 0",
    ),
    ("task.eigenvalues", (1.0, 1.0, 0.0, 1.0, 1.0), "config.task.eigenvalues = (1.0, 1.0, 0.0, 1.0, 1.0)"),
    ("task.rotation_seed", -1, "config.task.rotation_seed = -1: must be an integer >= 0"),
    (
      "task.rotation",
      "always",
      "config.task.rotation = 'always': allowed values are 'per_prompt', 'per_batch', 'per_run'",
    ),
    ("task.spectrum", "flat", "allowed values are 'two_level', 'log_spaced', 'explicit'"),
    ("train.loss_positions", "first", "config.train.loss_positions = 'first': allowed values are 'all', 'last'"),
    ("train.clip_per_matrix", -0.1, "config.train.clip_per_matrix = -0.1: must be a number >= 0.0"),
    ("train.decay_every", 0, "config.train.decay_every = 0: must be an integer >= 1"),
    (
      "train.decay_factor",
      1.5,
      "config.train.decay_factor = 1.5: with config.train.schedule = 'step_decay' must be a number in (0, 1]",
    ),
    ("train.schedule", "steps", "'constant', 'cosine', 'linear', 'step_decay'"),
    ("model.lsa_init_std", -1.0, "config.model.lsa_init_std = -1.0: must be a number >= 0"),
  ],
)
def test_invalid_lsa_field_is_named(field, value, expected):
  assert_field_error(lsa_config.get_config(), field, value, expected)


def test_lsa_model_fields_are_checked():
  model = ml_collections.ConfigDict({"family": "lsa", "num_layers": 0, "lsa_sparse": "yes", "lsa_init_std": 1e-4})
  errors = lsa.validate(model, None)
  assert "config.model.num_layers = 0: must be an integer >= 1" in errors[0]
  assert "config.model.lsa_sparse = 'yes': allowed values are True" in errors[1]


def test_configs_are_valid():
  for variant in lsa_config.VARIANTS:
    assert evaluate.config_errors(lsa_config.get_config(variant), num_devices=8) == []
  assert evaluate.config_errors(linreg.get_config(), num_devices=8) == []
  # The new fields are optional: a config without them means their defaults.
  config = linreg.get_config()
  for field in ("w_distribution", "resample_every"):
    del config.task[field]
  for field in ("loss_positions", "clip_per_matrix"):
    del config.train[field]
  assert evaluate.config_errors(config, num_devices=8) == []
