"""The notebooks in colabs/: each runs headless from top to bottom, its .ipynb is the stored rendering of its
.py with outputs, and the install cell works against a local clone.

The notebooks are kept as jupytext py:percent files (colabs/NAME.py, the source of truth, diff-friendly) and
as NAME.ipynb (what Colab opens from GitHub), executed at full size with its outputs by `python colabs/render.py`.
The tests execute the .py with colabs/render.py's runner (nbclient on a python3 kernel of this interpreter, in a
fresh temporary directory) at the CI sizes of CI_PARAMETERS. A cell that raises fails the test.
"""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import time
import tomllib

import jax
import jupytext
import nbformat
import pytest
from nbclient.exceptions import CellExecutionError

REPO = pathlib.Path(__file__).resolve().parents[2]
COLABS = REPO / "colabs"


def _load(name: str):
  spec = importlib.util.spec_from_file_location(f"colabs_{name}", COLABS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


render = _load("render")
install = _load("install")
NOTEBOOKS = [COLABS / f"{name}.py" for name in sorted(render.NOTEBOOKS)]
CELL_TIMEOUT_S = 300  # The CI-size notebooks take about a minute each on a 2-core CPU; this only catches a hang.
# The smaller sizes CI runs (each notebook's parameters cell names them in its comments).
CI_PARAMETERS = {
  "quickstart": {"num_steps": 800, "eval_prompts": 256},
  "paper_figures": {
    "eval_overrides": {
      "num_prompts": 128,
      "probe_prompts": 64,
      "sim_w_prompts": 4,
      "sim_w_queries": 32,
      "bootstrap_samples": 200,
    }
  },
  "theory": {"num_prompts": 32, "max_newton_steps": 10, "lsa_prompts": 2048, "train_steps": 1000, "train_batch": 256},
}
# Images each notebook shows at least: a figure that silently renders as text ("<Figure size ...>") fails.
MIN_IMAGES = {"quickstart": 10, "paper_figures": 5, "theory": 4}
# The one place the repository's URL is set (see colabs/README.md); every badge and REPO_URL derives from it.
REPOSITORY = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
BADGE = (
  f"https://colab.research.google.com/github/{REPOSITORY.removeprefix('https://github.com/')}"
  "/blob/main/colabs/{name}.ipynb"
)


def _cells(notebook: nbformat.NotebookNode) -> list[tuple[str, str]]:
  return [(cell.cell_type, cell.source) for cell in notebook.cells]


def _is_parameters(cell) -> bool:
  return cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", [])


def _images(notebook: nbformat.NotebookNode) -> int:
  return sum("image/png" in o.get("data", {}) for c in notebook.cells if c.cell_type == "code" for o in c.outputs)


def test_there_are_notebooks():
  assert sorted(p.stem for p in COLABS.glob("*.ipynb")) == [p.stem for p in NOTEBOOKS]
  assert set(CI_PARAMETERS) == set(MIN_IMAGES) == set(render.NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_ipynb_is_a_rendering_of_py(path):
  """NAME.ipynb holds exactly jupytext's conversion of NAME.py (cells and their text), executed top to bottom
  at the defaults (no injected parameters), with outputs, images and no error: it reads without running."""
  ipynb = path.with_suffix(".ipynb")
  rerender = f"run `python colabs/render.py {path.stem}`"
  assert ipynb.exists(), f"{ipynb} is missing: {rerender}"
  stored = nbformat.read(ipynb, as_version=4)
  nbformat.validate(stored)
  assert _cells(stored) == _cells(jupytext.read(path)), f"{ipynb.name} differs from {path.name}: {rerender}"
  counts = [cell.execution_count for cell in stored.cells if cell.cell_type == "code"]
  assert counts == list(range(1, len(counts) + 1)), f"{ipynb.name} was not executed top to bottom: {rerender}"
  outputs = [o for c in stored.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"], f"{ipynb.name} stores an error: {rerender}"
  assert _images(stored) >= MIN_IMAGES[path.stem]
  assert {"rendered", "jax", "wall_s"} <= set(stored.metadata["icl_jax"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_layout(path):
  """A Colab badge for this notebook in the first cell, the install cell next, one parameters cell after it; the
  parameters cell names every CI value in its comments."""
  cells = jupytext.read(path).cells
  assert cells[0].cell_type == "markdown" and BADGE.format(name=path.stem) in cells[0].source
  assert cells[1].source == jupytext.read(NOTEBOOKS[0]).cells[1].source, "the install cells differ"
  assert f'"ICL_JAX_REPO_URL", "{REPOSITORY}"' in cells[1].source
  assert [i for i, c in enumerate(cells) if _is_parameters(c)] == [2]
  for name in CI_PARAMETERS[path.stem]:
    assert re.search(rf"^{name} = ", cells[2].source, flags=re.MULTILINE), f"no parameter {name}"
  assert "CI: " in cells[2].source


def test_every_link_is_the_pyproject_repository():
  """Every github.com/…/icl_jax link of the tracked text files is pyproject.toml's [project.urls] Repository."""
  files = subprocess.run(
    ["git", "ls-files", "*.md", "*.py", "*.ipynb", "*.cff", "*.toml"],
    cwd=REPO,
    capture_output=True,
    text=True,
    check=True,
  ).stdout.split()
  pattern = r"(?:github\.com|google\.com/github)/([\w.-]+/icl_jax)\b"  # Clone URLs and Colab badges.
  links = {m for f in files for m in re.findall(pattern, (REPO / f).read_text())}
  assert links == {REPOSITORY.removeprefix("https://github.com/")}


@pytest.mark.parametrize("url", ["https://example.org/icl_jax.git", "https://github.com/someone/icljax"])
def test_render_sets_the_repository_url_everywhere(url, tmp_path):
  """`python colabs/render.py --repo-url=URL` rewrites pyproject's URL, every badge and every clone cell."""
  for name in render.URL_FILES:
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text((REPO / name).read_text())
  changed = render.set_repository_url(url, tmp_path)
  assert sorted(p.relative_to(tmp_path).as_posix() for p in changed) == sorted(render.URL_FILES)
  assert render.repository_url(tmp_path) == url
  for name in render.URL_FILES:
    text = (tmp_path / name).read_text()
    assert REPOSITORY not in text, name
  for notebook in ("quickstart", "paper_figures", "theory"):
    source = (tmp_path / "colabs" / f"{notebook}.py").read_text()
    assert f'"ICL_JAX_REPO_URL", "{url}")' in source  # The install cell clones it.
    badge = re.search(r"\]\((https://[^)]+/colabs/" + notebook + r"\.ipynb)\)", source).group(1)
    expected = "https://colab.research.google.com/github/someone/icljax" if "github" in url else url[: -len(".git")]
    assert badge == f"{expected}/blob/main/colabs/{notebook}.ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, record_property):
  start = time.perf_counter()
  notebook = render.execute(path, tmp_path, CI_PARAMETERS[path.stem], cell_timeout_s=CELL_TIMEOUT_S)
  elapsed = time.perf_counter() - start
  record_property("wall_s", round(elapsed, 1))
  print(f"{path.name}: executed in {elapsed:.1f} s", file=sys.stderr)
  outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert _images(notebook) >= MIN_IMAGES[path.stem]
  assert not (tmp_path / "icl_jax_repo").exists(), "the install cell cloned the repository instead of a no-op"


def _local_origin(tmp_path: pathlib.Path) -> pathlib.Path:
  """A git repository holding this working tree's files (tracked and new, not ignored): what the install cell
  clones in place of GitHub."""
  origin = tmp_path / "origin"
  files = subprocess.run(
    ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
  ).stdout.split()
  for name in files:
    if (REPO / name).is_file():
      (origin / name).parent.mkdir(parents=True, exist_ok=True)
      (origin / name).write_bytes((REPO / name).read_bytes())
  git = ["git", "-c", "user.name=test", "-c", "user.email=test@127.0.0.1", "-c", "init.defaultBranch=main"]
  for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "local origin"]):
    subprocess.run(git + command, cwd=origin, check=True)
  return origin


def _colab_runtime(tmp_path) -> tuple[pathlib.Path, pathlib.Path, dict]:
  """A fresh environment where icl_jax is not importable but jax (the runtime's own) and the other
  requirements are, as on a Colab CPU runtime: its python, an empty working directory and the environment."""
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  python = venv / "bin" / "python"
  site = subprocess.run(
    [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
    capture_output=True,
    text=True,
    check=True,
  ).stdout.strip()
  # The runtime's preinstalled packages: this interpreter's, as plain path entries. Unlike a site directory, a
  # path entry's own .pth files are not read, so an editable install of this repository stays invisible.
  runtime = [p for p in sys.path if p.endswith("site-packages")]
  pathlib.Path(site, "runtime_packages.pth").write_text("\n".join(runtime) + "\n")
  colab = tmp_path / "content"
  colab.mkdir()
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS", "JAX_NUMPY_RANK_PROMOTION")}
  return python, colab, env


def _run_install_cell(python, colab, env) -> list[str]:
  """Runs the notebooks' install cell, then imports icl_jax and jax: [icl_jax's file, jax's version]."""
  cell = jupytext.read(NOTEBOOKS[0]).cells[1].source
  probe = "import icl_jax, jax; print('IMPORTED', icl_jax.__file__, jax.__version__)"
  result = subprocess.run(
    [str(python), "-c", cell + "\n" + probe],
    cwd=colab,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert f"keeping the installed jax=={jax.__version__}" in result.stdout and "(cpu)" in result.stdout
  assert "icl_jax: installing from " in result.stdout  # It says which source it took, and how to choose.
  return result.stdout.split("IMPORTED ")[-1].split()


def test_install_cell_against_a_local_clone(tmp_path):
  """The notebooks' install cell, run as on a Colab CPU runtime: it clones the repository (a local one here,
  through ICL_JAX_REPO_URL), installs it with pip keeping that jax, and `icl_jax` then imports from the clone
  with the same jax."""
  python, colab, env = _colab_runtime(tmp_path)
  env["ICL_JAX_REPO_URL"] = str(_local_origin(tmp_path))
  imported = _run_install_cell(python, colab, env)
  assert imported == [str(colab / "icl_jax_repo" / "icl_jax" / "__init__.py"), jax.__version__]


def test_install_cell_from_an_uploaded_sdist(tmp_path):
  """An sdist (`python -m build --sdist`) uploaded next to the notebook is a whole source tree (configs/ and
  colabs/ included, MANIFEST.in): the install cell installs it without cloning anything."""
  from setuptools import build_meta

  dist = tmp_path / "dist"
  dist.mkdir()
  cwd = os.getcwd()
  try:
    os.chdir(REPO)
    name = build_meta.build_sdist(str(dist))
  finally:
    os.chdir(cwd)
  python, colab, env = _colab_runtime(tmp_path)
  (colab / name).write_bytes((dist / name).read_bytes())
  env["ICL_JAX_REPO_URL"] = str(tmp_path / "no_such_repository")  # A clone would fail.
  imported = _run_install_cell(python, colab, env)
  top = colab / name.removesuffix(".tar.gz")
  assert imported == [str(top / "icl_jax" / "__init__.py"), jax.__version__]
  assert (top / "configs" / "linreg.py").is_file() and (top / "colabs" / "install.py").is_file()


@pytest.mark.parametrize(
  "accelerator, cuda, versions, expected, replaces",
  [
    ("cpu", "", {"jax": "0.10.2", "jaxlib": "0.10.2"}, ["-c"], False),
    ("gpu", "12.4", {"jax": "0.10.2", "jaxlib": "0.10.2", "jax-cuda12-plugin": "0.10.2"}, ["-c"], False),
    ("gpu", "12.4", {"jax": "0.10.2", "jaxlib": "0.10.2"}, ["jax[cuda12]>=0.10.2"], True),
    ("gpu", "13.0", {}, ["jax[cuda13]>=0.10.2"], False),
    ("tpu", "", {"jax": "0.10.2", "jaxlib": "0.10.2", "libtpu": "0.0.20"}, ["-c"], False),
    ("tpu", "", {"jax": "0.10.2", "jaxlib": "0.10.2"}, ["jax[tpu]>=0.10.2"], True),
    ("cpu", "", {"jax": "0.4.30", "jaxlib": "0.4.30"}, ["jax>=0.10.2"], True),
  ],
)
def test_install_plan(accelerator, cuda, versions, expected, replaces):
  """Keep a recent jax that has the accelerator's plugin (pinned by a constraints file); otherwise install the
  build the accelerator needs, flagging that a kernel which imported the old jax must restart."""
  chosen = install.plan("/checkout", accelerator, cuda, versions, "0.10.2")
  flat = [argument for command in chosen.pip_commands for argument in command]
  assert all(e in flat for e in expected) and chosen.replaces_jax == replaces
  assert chosen.pip_commands[-1][:4] == ("install", "-q", "-e", "/checkout")
  assert install.version_tuple("0.4.30.dev20240101+cuda12") == (0, 4, 30)
  assert install.jax_minimum(REPO) == re.search(
    r"^jax>=([0-9.]+)", (REPO / "requirements.txt").read_text(), flags=re.MULTILINE
  ).group(1)


DELIBERATE_FAILURE = """# %% tags=["parameters"]
fail = False

# %%
print("before the failing cell")

# %%
assert not fail, "deliberate failure"
"""


def test_runner_fails_on_a_failing_cell(tmp_path):
  """The runner is what the notebook tests rely on: it must raise when a cell raises, and pass otherwise."""
  path = tmp_path / "failing.py"
  path.write_text(DELIBERATE_FAILURE)
  passed = render.execute(path, tmp_path)
  assert "before the failing cell" in passed.cells[1].outputs[0]["text"]
  with pytest.raises(CellExecutionError, match="deliberate failure"):
    render.execute(path, tmp_path, parameters={"fail": True})
