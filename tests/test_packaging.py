"""What a new user meets first: the package installs from pyproject.toml, runs from any directory, refers to
nothing outside the repository, and answers a mistyped override with one line."""

import ast
import importlib.metadata
import json
import os
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _env() -> dict:
  # The repository on the path stands in for an installed package; one CPU device is enough.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = str(REPO)
  return env


def test_no_tracked_file_outside_tests_points_outside_the_repository():
  files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
  offenders = [
    f
    for f in files
    if not f.startswith("tests/")
    and (REPO / f).is_file()
    and any(needle in (REPO / f).read_text(errors="ignore") for needle in ("../shared", "papers.md", "ecosystem.md"))
  ]
  assert not offenders, offenders


def test_runs_from_another_directory_with_a_config_given_by_path(tmp_path):
  config = REPO / "configs" / "linreg_ill_conditioned.py"  # Builds on configs/linreg.py, loaded by path.
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "icl_jax.main",
      f"--config={config}:quick",
      f"--workdir={tmp_path / 'run'}",
      "--config.train.num_steps=2",
      "--config.train.log_every=1",
      "--config.train.checkpoint_every=2",
      "--config.eval.after_training=False",
    ],
    cwd=tmp_path,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / "run" / "error_curve.json").exists() and (tmp_path / "run" / "provenance.json").exists()


def test_a_mistyped_override_is_one_line_naming_the_field_and_the_closest(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "icl_jax.main",
      f"--config={REPO / 'configs' / 'linreg.py'}:quick",
      "--config.train.lr=3",
      f"--workdir={tmp_path}",
    ],
    cwd=tmp_path,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
  assert lines[0].startswith("error: --config.train.lr:") and "--config.train.learning_rate" in lines[0]


def test_help_lists_the_modes_config_variants_and_distributed_flags():
  result = subprocess.run(
    [sys.executable, "-m", "icl_jax.main", "--help"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120
  )
  for needed in (
    "<train|eval>",
    "configs/linreg.py:quick",
    "configs/lsa.py[:quick]",
    "--distributed",
    "--coordinator_address",
  ):
    assert needed in result.stdout, needed


def test_pyproject_reads_the_requirement_files():
  project = tomllib.loads((REPO / "pyproject.toml").read_text())
  dynamic = project["tool"]["setuptools"]["dynamic"]
  assert dynamic["dependencies"]["file"] == ["requirements.txt"]
  extras = {name: spec["file"] for name, spec in dynamic["optional-dependencies"].items()}
  assert extras == {
    "dev": ["requirements-test.txt"],
    "tensorboard": ["requirements-tensorboard.txt"],
    **{name: [f"requirements-{name}.txt"] for name in ("cuda12", "cuda13", "tpu", "gcs")},
  }
  # The tests of gs:// workdirs install what the gcs extra does.
  requirement_lines = [(REPO / f"requirements-{n}.txt").read_text().splitlines() for n in ("gcs", "test")]
  gcs, test = ({line for line in lines if line and not line.startswith("#")} for lines in requirement_lines)
  assert gcs <= test
  # The accelerator extras install jax at requirements.txt's lower bound, never an older one.
  bound = re.search(r"^jax>=([0-9.]+)", (REPO / "requirements.txt").read_text(), flags=re.MULTILINE).group(1)
  for name in ("cuda12", "cuda13", "tpu"):
    lines = [line for line in (REPO / f"requirements-{name}.txt").read_text().splitlines() if not line.startswith("#")]
    assert lines == [f"jax[{name}]>={bound}"]
  assert (REPO / "requirements-dev.txt").read_text().split("\n")[1:3] == [
    "-r requirements.txt",
    "-r requirements-test.txt",
  ]
  assert (REPO / "LICENSE").read_text().lstrip().startswith("Apache License")
  citation = (REPO / "CITATION.cff").read_text()
  assert all(arxiv in citation for arxiv in ("2310.17086", "2306.00297", "2208.01066"))


def test_bench_finds_its_pytorch_reference_and_refuses_a_missing_interpreter():
  assert (REPO / "benchmarks" / "torch_gpt2_linreg.py").is_file()
  result = subprocess.run(
    [sys.executable, "-m", "icl_jax.bench", "--config=configs/linreg.py:quick", "--torch_python=/nonexistent/python"],
    cwd=REPO,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 1 and "error: --torch_python=/nonexistent/python: no such interpreter" in result.stderr
  assert '"name"' not in result.stdout  # Refused before any benchmark ran.


def test_bench_runs_the_pytorch_reference_without_a_path_argument():
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "icl_jax.bench",
      "--config=tests/tiny_config.py",
      "--benchmark=train_step",
      f"--torch_python={sys.executable}",
      "--jax_num_cpu_devices=2",
    ],
    cwd=REPO,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert '"name": "torch_train_step"' in result.stdout and '"name": "speedup_vs_torch"' in result.stdout
  step = json.loads(result.stdout.splitlines()[0])
  assert step["name"] == "train_step" and step["devices"] == 2  # JAX's own flags reach the benchmark.


def _module_level_imports(path: pathlib.Path) -> set[str]:
  """Top-level names a module imports when it is imported (not those deferred into functions)."""
  names = set()

  def visit(nodes):
    for node in nodes:
      if isinstance(node, ast.Import):
        names.update(a.name.split(".")[0] for a in node.names)
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names.add(node.module.split(".")[0])
      elif isinstance(node, (ast.If, ast.Try, ast.With)):
        visit(ast.iter_child_nodes(node))

  visit(ast.parse(path.read_text()).body)
  return names


def _wheelhouse():
  sys.path.insert(0, str(REPO / "launch"))
  try:
    import wheelhouse
  finally:
    sys.path.pop(0)
  return wheelhouse


def test_wheelhouse_reads_a_target_list_and_names_every_platform_tag_it_runs(tmp_path):
  wheelhouse = _wheelhouse()
  listing = tmp_path / "have.txt"
  listing.write_text("# the target\njax==0.11.2\nTensorboard_Data.Server\n\n")
  assert wheelhouse.read_have(listing) == {"jax": "0.11.2", "tensorboard-data-server": None}
  listing.write_text("jax==0.11.2\njax >= 0.4\n")
  with pytest.raises(SystemExit, match=r"have.txt:2: 'jax >= 0.4' is not NAME or NAME==VERSION"):
    wheelhouse.read_have(listing)
  tags = wheelhouse.platform_tags("x86_64", "2.28")
  assert tags[0] == "manylinux_2_28_x86_64" and tags[11] == "manylinux_2_17_x86_64"
  assert tags[-3:] == ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
  with pytest.raises(SystemExit, match="--glibc=2.5"):
    wheelhouse.platform_tags("x86_64", "2.5")


def test_the_gpu_image_and_its_wheelhouse_cover_every_module_icl_jax_imports():
  # launch/images/gpu_cuda.txt: what the GPU machines have; gpu_cuda.wheels.txt: what launch/wheelhouse.py
  # fetches for them (its --list-only output). Together they must hold every distribution icl_jax imports.
  wheelhouse = _wheelhouse()
  images = REPO / "launch" / "images"
  have = set(wheelhouse.read_have(images / "gpu_cuda.txt")) | set(wheelhouse.read_have(images / "gpu_cuda.wheels.txt"))
  imported = set().union(*(_module_level_imports(p) for p in (REPO / "icl_jax").rglob("*.py")))
  imported -= set(sys.stdlib_module_names) | {"icl_jax"}
  providers = importlib.metadata.packages_distributions()
  uncovered = {
    m: providers.get(m) for m in imported if not {wheelhouse.canonical(d) for d in providers.get(m, [])} & have
  }
  assert imported >= {"jax", "flax", "ml_collections", "tensorflow_datasets"} and not uncovered, uncovered
