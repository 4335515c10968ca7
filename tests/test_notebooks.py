"""The notebooks in colabs/: each runs headless from top to bottom, and its .ipynb matches its .py.

The notebooks are kept as jupytext py:percent files (colabs/NAME.py, the source of truth, diff-friendly) and
as NAME.ipynb (what Colab opens from GitHub), generated with `jupytext --update --to ipynb colabs/NAME.py`.
Execution converts the .py in memory and runs it with nbclient on a python3 kernel of this interpreter
(ipykernel's kernelspec; jupyter_client starts it with sys.executable), in a fresh temporary directory, with the
notebook's own parameters: their defaults are the CI size. A cell that raises fails the test.
"""

import os
import pathlib
import sys
import time

import jupytext
import nbclient
import nbformat
import pytest
from nbclient.exceptions import CellExecutionError

REPO = pathlib.Path(__file__).resolve().parents[1]
COLABS = REPO / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.py"))
CELL_TIMEOUT_S = 300  # The notebooks take about a minute in all on a 2-core CPU; this only catches a hang.
KERNEL_STARTUP_TIMEOUT_S = 120
BADGE = "https://colab.research.google.com/github/GITHUB_ORG/icl_jax/blob/main/colabs/{name}.ipynb"
# Images each notebook shows at least: a figure that silently renders as text ("<Figure size ...>") fails.
MIN_IMAGES = {"quickstart": 10, "paper_figures": 5, "theory": 4}


def kernel_env() -> dict[str, str]:
  """This process's environment, with the repository on PYTHONPATH (so the notebooks' install cell is a no-op)
  and without conftest.py's 8 fake CPU devices and strict rank promotion: a notebook sees the machine as a user's
  runtime would."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  if flags:
    env["XLA_FLAGS"] = " ".join(flags)
  else:
    env.pop("XLA_FLAGS", None)
  env.pop("JAX_NUMPY_RANK_PROMOTION", None)  # conftest.py's strict broadcasting is for the package's code.
  env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  return env


def inject_parameters(notebook: nbformat.NotebookNode, parameters: dict) -> None:
  """Adds a cell assigning `parameters` right after the cell tagged "parameters", as papermill does."""
  index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
  source = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
  cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
  notebook.cells.insert(index + 1, cell)


def execute(path: pathlib.Path, cwd: pathlib.Path, parameters: dict | None = None) -> nbformat.NotebookNode:
  """Runs the py:percent notebook at `path` in `cwd` on a python3 kernel; raises CellExecutionError if a cell
  raises. Returns the executed notebook (also written to cwd/NAME.ipynb for inspection)."""
  notebook = jupytext.read(path)
  if parameters:
    inject_parameters(notebook, parameters)
  client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                                   startup_timeout=KERNEL_STARTUP_TIMEOUT_S,
                                   resources={"metadata": {"path": str(cwd)}})
  try:
    client.execute(env=kernel_env())
  finally:
    nbformat.write(notebook, cwd / f"{path.stem}.ipynb")
  return notebook


def _cells(notebook: nbformat.NotebookNode) -> list[tuple[str, str]]:
  return [(cell.cell_type, cell.source) for cell in notebook.cells]


def _is_parameters(cell) -> bool:
  return cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", [])


def test_there_are_notebooks():
  assert [p.stem for p in NOTEBOOKS] == ["paper_figures", "quickstart", "theory"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_ipynb_matches_py(path):
  """NAME.ipynb holds exactly jupytext's conversion of NAME.py (cells and their text; metadata aside), with
  no outputs."""
  ipynb = path.with_suffix(".ipynb")
  assert ipynb.exists(), f"{ipynb} is missing: run `jupytext --update --to ipynb {path.relative_to(REPO)}`"
  stored = nbformat.read(ipynb, as_version=4)
  nbformat.validate(stored)
  assert _cells(stored) == _cells(jupytext.read(path)), (
      f"{ipynb.name} differs from {path.name}: run `jupytext --update --to ipynb {path.relative_to(REPO)}`")
  for cell in stored.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, f"{ipynb.name} has outputs: regenerate it"
  assert [i for i, c in enumerate(stored.cells) if _is_parameters(c)] == \
         [i for i, c in enumerate(jupytext.read(path).cells) if _is_parameters(c)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_layout(path):
  """A Colab badge for this notebook in the first cell, the install cell next, one parameters cell after it."""
  cells = jupytext.read(path).cells
  assert cells[0].cell_type == "markdown" and BADGE.format(name=path.stem) in cells[0].source
  assert cells[1].cell_type == "code" and 'find_spec("icl_jax") is None' in cells[1].source
  assert [i for i, c in enumerate(cells) if _is_parameters(c)] == [2]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, record_property):
  start = time.perf_counter()
  notebook = execute(path, tmp_path)
  elapsed = time.perf_counter() - start
  record_property("wall_s", round(elapsed, 1))
  print(f"{path.name}: executed in {elapsed:.1f} s", file=sys.stderr)
  outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert sum("image/png" in o.get("data", {}) for o in outputs) >= MIN_IMAGES[path.stem]
  assert not (tmp_path / "icl_jax_repo").exists(), "the install cell cloned the repository instead of a no-op"


DELIBERATE_FAILURE = '''# %% tags=["parameters"]
fail = False

# %%
print("before the failing cell")

# %%
assert not fail, "deliberate failure"
'''


def test_runner_fails_on_a_failing_cell(tmp_path):
  """The runner is what the notebook tests rely on: it must raise when a cell raises, and pass otherwise."""
  path = tmp_path / "failing.py"
  path.write_text(DELIBERATE_FAILURE)
  passed = execute(path, tmp_path)
  assert "before the failing cell" in passed.cells[1].outputs[0]["text"]
  with pytest.raises(CellExecutionError, match="deliberate failure"):
    execute(path, tmp_path, parameters={"fail": True})
