"""The frozen evaluation set: reproducible builds, index order, statistics, hash checks, and evaluating on it."""

import json
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from icl_jax import data
from icl_jax import datasets
from icl_jax import models
from icl_jax.analysis import evaluate
from icl_jax.analysis import probing
from icl_jax.datasets.linreg_eval import linreg_eval_dataset_builder as linreg_eval
from icl_jax.runtime import errors
from tests import tiny_config

SIZE = 1280


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """The whole published set, built once, and the seconds it took."""
  data_dir = tmp_path_factory.mktemp("linreg_eval")
  start = time.perf_counter()
  hashes = datasets.build(data_dir)
  return data_dir, hashes, time.perf_counter() - start


def _setting(name):
  return next(config for config in linreg_eval.Builder.BUILDER_CONFIGS if config.name == name)


def test_two_builds_decode_to_the_same_prompts_with_the_published_hashes(built, tmp_path):
  data_dir, hashes, seconds = built
  assert seconds < 60, f"building the set took {seconds:.1f} s"  # About 5 s on a 2-core CPU.
  assert hashes == linreg_eval.PUBLISHED_SHA256[datasets.VERSION]
  assert datasets.build(tmp_path) == hashes
  for setting in datasets.SETTINGS:
    for first, second in zip(datasets.load_prompts(data_dir, setting), datasets.load_prompts(tmp_path, setting)):
      np.testing.assert_array_equal(first, second)


def test_load_prompts_puts_prompt_i_at_row_i(built):
  data_dir, _, _ = built
  xs_BxNxD, ys_BxN, ws_BxD = datasets.load_prompts(data_dir, "kappa100")
  assert (xs_BxNxD.shape, ys_BxN.shape, ws_BxD.shape) == ((SIZE, 41, 20), (SIZE, 41), (SIZE, 20))
  assert xs_BxNxD.dtype == ys_BxN.dtype == ws_BxD.dtype == np.float32
  source = tfds.data_source("linreg_eval/kappa100", data_dir=data_dir, split="test")
  records = [source[j] for j in range(20)]
  assert [r["index"] for r in records] != list(range(20))  # The files are not in index order.
  for record in records:
    np.testing.assert_array_equal(xs_BxNxD[record["index"]], record["xs"])
    np.testing.assert_array_equal(ys_BxN[record["index"]], record["ys"])
    np.testing.assert_array_equal(ws_BxD[record["index"]], record["w"])
  # The generator's prompts, in its order.
  for loaded, generated in zip((xs_BxNxD, ys_BxN, ws_BxD), linreg_eval.generate(_setting("kappa100"))):
    np.testing.assert_array_equal(loaded, generated)


def test_metadata_names_each_settings_distribution(built):
  data_dir, hashes, _ = built
  expected = {"isotropic": (1.0, 0.0), "kappa100": (100.0, 0.0), "noisy": (1.0, 0.1)}
  for setting, (kappa, noise_std) in expected.items():
    info = datasets.describe(data_dir, setting)
    assert (info["kappa"], info["noise_std"], info["n_dims"], info["n_points"]) == (kappa, noise_std, 20, 41)
    assert info["num_prompts"] == SIZE and info["content_sha256"] == hashes[setting]


def test_ys_are_w_dot_x_rounded_once_and_the_noise_has_std_0_1(built):
  data_dir, _, _ = built
  for setting in ("isotropic", "kappa100", "noisy"):
    xs_BxNxD, ys_BxN, ws_BxD = datasets.load_prompts(data_dir, setting)
    exact_BxN = np.einsum("bnd,bd->bn", xs_BxNxD.astype(np.float64), ws_BxD.astype(np.float64))
    residual_BxN = ys_BxN - exact_BxN
    if setting == "noisy":
      assert residual_BxN.std() == pytest.approx(0.1, rel=0.02) and abs(residual_BxN.mean()) < 0.002
    else:
      # One rounding of the exact product to float32: within an ulp.
      assert np.all(np.abs(residual_BxN) <= np.spacing(np.abs(ys_BxN)))
    assert ws_BxD.mean() == pytest.approx(0.0, abs=0.02) and ws_BxD.std() == pytest.approx(1.0, rel=0.02)
    # Trace normalisation: E|x|^2 = d for every kappa.
    assert np.mean(np.sum(np.square(xs_BxNxD), -1)) == pytest.approx(20.0, rel=0.02)


def test_kappa100_has_the_distribution_of_the_jax_sampler(built):
  data_dir, _, _ = built
  task = tiny_config.get_config().task
  task.update(n_dims=20, n_points=41, kappa=100.0)
  np.testing.assert_allclose(linreg_eval.two_level_spectrum(20, 100.0), data.covariance_spectrum(task), rtol=1e-6)
  gaussian_BxDxD = np.random.default_rng(0).standard_normal((8, 20, 20))
  q_BxDxD, r_BxDxD = np.linalg.qr(gaussian_BxDxD)
  q_BxDxD = q_BxDxD * np.sign(np.diagonal(r_BxDxD, axis1=1, axis2=2))[:, None, :]  # As data.random_rotation.
  np.testing.assert_allclose(linreg_eval.haar_rotations(gaussian_BxDxD), q_BxDxD, atol=1e-12)

  def mean_sample_spectrum(xs_BxNxD):
    xs_BxNxD = np.asarray(xs_BxNxD, np.float64)
    return np.linalg.eigvalsh(np.einsum("bni,bnj->bij", xs_BxNxD, xs_BxNxD) / xs_BxNxD.shape[1]).mean(0)

  xs_BxNxD, _, _ = datasets.load_prompts(data_dir, "kappa100")
  reference = jax.jit(lambda key: data.sample_batch(key, 0, SIZE, task, task.n_dims))(jax.random.key(0))
  np.testing.assert_allclose(mean_sample_spectrum(xs_BxNxD), mean_sample_spectrum(reference.xs_BxNxD), rtol=0.1)


def test_changed_files_and_unpublished_contents_raise(built, tmp_path, monkeypatch):
  data_dir, _, _ = built
  shutil.copytree(data_dir, tmp_path, dirs_exist_ok=True)
  metadata = datasets.directory(tmp_path, "noisy") / "metadata.json"
  recorded = json.loads(metadata.read_text())
  metadata.write_text(json.dumps({**recorded, "content_sha256": "0" * 64}))
  with pytest.raises(ValueError, match=f"{metadata}.*files changed after the build"):
    datasets.load_prompts(tmp_path, "noisy")

  monkeypatch.setitem(linreg_eval.PUBLISHED_SHA256["1.0.0"], "isotropic", "1" * 64)
  with pytest.raises(ValueError, match="linreg_eval_dataset_builder.py.*not the published set"):
    datasets.load_prompts(data_dir, "isotropic")


RECORDS = "linreg_eval-test.array_record-00000-of-00001"


def _truncate(file):
  file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _flip_a_byte(file):
  data = bytearray(file.read_bytes())
  data[len(data) // 2] ^= 0xFF
  file.write_bytes(bytes(data))


@pytest.mark.parametrize(
  "name, damage, says",
  [
    (RECORDS, _truncate, "Corrupted Riegeli/records file"),
    (RECORDS, _flip_a_byte, "Corrupted Riegeli/records file"),
    (RECORDS, lambda file: file.unlink(), "No such file"),
    ("features.json", lambda file: file.write_text("{junk"), "JSONDecodeError"),
    ("metadata.json", lambda file: file.unlink(), "FileNotFoundError"),
    ("dataset_info.json", _truncate, "JSONDecodeError"),
  ],
)
def test_a_damaged_set_is_refused_naming_its_file(built, tmp_path, name, damage, says):
  data_dir, _, _ = built
  shutil.copytree(data_dir, tmp_path, dirs_exist_ok=True)
  path = datasets.directory(tmp_path, "noisy")
  damage(path / name)
  rebuild = (
    f"delete {path} and rebuild it with `python -m icl_jax.datasets.build --data_dir={tmp_path} --settings=noisy`"
  )
  with pytest.raises(datasets.DatasetError) as error:
    datasets.load_prompts(tmp_path, "noisy")
  assert name in str(error.value) and says in str(error.value) and rebuild in str(error.value)
  # Before any compute, as one config error.
  with pytest.raises(errors.ConfigError, match=f"config.eval.dataset_dir = '{tmp_path}': .*{name}"):
    evaluate.validate(_config(tmp_path), num_devices=1)


def test_the_cli_refuses_a_damaged_set_in_one_line_before_training(built, tmp_path):
  data_dir, _, _ = built
  shutil.copytree(data_dir, tmp_path / "sets", dirs_exist_ok=True)
  _truncate(datasets.directory(tmp_path / "sets", "noisy") / RECORDS)
  workdir = tmp_path / "run"
  overrides = [
    f"--config.eval.dataset_dir={tmp_path / 'sets'}",
    "--config.eval.dataset_setting=noisy",
    "--config.task.n_dims=20",
    "--config.task.n_points=41",
    "--config.task.curriculum.enabled=False",
    "--config.model.n_positions=82",
    "--config.eval.num_prompts=32",
  ]
  result = subprocess.run(
    [sys.executable, "-m", "icl_jax.main", "--config=tests/tiny_config.py", f"--workdir={workdir}", *overrides],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 1, result.stderr[-3000:]
  assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr, result.stderr
  message = result.stderr[result.stderr.index("error:") :]
  assert "config.eval.dataset_dir" in message and f"its records ({RECORDS}) do not read back" in message
  assert not (workdir / "checkpoints").exists()


def test_a_missing_set_says_how_to_build_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="python -m icl_jax.datasets.build"):
    datasets.load_prompts(tmp_path, "isotropic")
  with pytest.raises(ValueError, match="allowed values are 'isotropic', 'kappa100', 'noisy'"):
    datasets.load_prompts(tmp_path, "kappa10")


def _config(data_dir):
  """tests/tiny_config.py at the set's size (d = 20, n = 41), with a one-layer width-16 model."""
  config = tiny_config.get_config()
  config.task.update(n_dims=20, n_points=41)
  config.task.curriculum.enabled = False
  config.model.update(num_layers=1, num_heads=2, width=16, n_positions=82)
  # The model's own read-out: no probes to fit, the test is about the prompts.
  config.eval.update(
    num_prompts=32,
    sim_w_queries=20,
    fit_layers=(1, 1),
    readout="model",
    dataset_dir=str(data_dir),
    dataset_setting="noisy",
  )
  return config


def test_config_checks_name_the_field_and_the_directory(built, tmp_path):
  data_dir, _, _ = built
  config = _config(data_dir)
  evaluate.validate(config, num_devices=1)
  config.task.n_points = 11
  config.eval.num_prompts = SIZE + 1
  with pytest.raises(errors.ConfigError) as error:
    evaluate.validate(config, num_devices=1)
  message = str(error.value)
  where = str(datasets.directory(data_dir, "noisy"))
  assert f"config.task.n_points = 11 differs from the n_points = 41 of the set 'noisy' in {where}" in message
  assert f"config.eval.num_prompts = {SIZE + 1} exceeds the {SIZE} prompts" in message
  config.eval.dataset_setting = "kappa10"
  with pytest.raises(errors.ConfigError, match="config.eval.dataset_setting = 'kappa10': allowed values"):
    evaluate.validate(config, num_devices=1)
  with pytest.raises(errors.ConfigError, match=f"config.eval.dataset_dir = '{tmp_path}': .*no linreg_eval"):
    probing.Evaluator(_config(tmp_path))


def test_evaluation_runs_on_the_first_prompts_of_the_set(built):
  data_dir, _, _ = built
  config = _config(data_dir)
  xs_BxNxD, ys_BxN, _ = datasets.load_prompts(data_dir, "noisy")
  xs_BxNxD, ys_BxN = xs_BxNxD[:32], ys_BxN[:32]
  model = models.build_model(config.model)
  params = model.init(jax.random.key(0), xs_BxNxD[:1], ys_BxN[:1])["params"]
  results = probing.Evaluator(config)(params)
  assert np.all(np.isfinite(results["error_per_dim"]["layers"]["mean"]))
  # The least-squares curve depends on the prompts alone: the set's first 32 ones.
  squared_BxN = np.square(probing.algorithm_predictions(config, xs_BxNxD, ys_BxN)["least_squares"][0] - ys_BxN)
  np.testing.assert_allclose(
    results["error_per_dim"]["least_squares"]["mean"][0], squared_BxN.mean(0) / 20, rtol=1e-4, atol=1e-6
  )


def test_the_build_command_prints_the_hashes(built, tmp_path):
  _, hashes, _ = built
  out = subprocess.run(
    [sys.executable, "-m", "icl_jax.datasets.build", f"--data_dir={tmp_path}", "--settings=isotropic"],
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  assert f"{datasets.directory(tmp_path, 'isotropic')}  content_sha256 {hashes['isotropic']}" in out
