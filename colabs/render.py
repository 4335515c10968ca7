"""Executes the notebooks of colabs/ and stores them with their outputs, so that they read without running.

    python colabs/render.py                      # all of them, at their default (full) sizes
    python colabs/render.py quickstart theory    # some of them
    python colabs/render.py --repo-url=URL       # only sets the repository URL (no execution)

Each colabs/NAME.py (jupytext py:percent, the source) is converted in memory, executed top to bottom with
nbclient on a python3 kernel of this interpreter in a fresh temporary directory, and written to
colabs/NAME.ipynb with its outputs, the cell ids of the previous NAME.ipynb (so a diff shows what changed) and
`metadata.icl_jax`: when, on what and in how long it ran. tests/e2e/test_notebooks.py runs the same code with the
smaller CI parameters and checks that the stored notebooks are these renderings of their sources.

Needs the dev extra (`pip install -e ".[dev]"`: jupytext, nbclient, nbformat, ipykernel).
"""

import datetime
import importlib.metadata
import os
import pathlib
import platform
import re
import sys
import tempfile
import time

import jupytext
import nbclient
import nbformat

COLABS = pathlib.Path(__file__).resolve().parent
REPO = COLABS.parent
NOTEBOOKS = ("quickstart", "paper_figures", "theory")
CELL_TIMEOUT_S = 1800  # A full-size cell takes minutes on a 2-core CPU; this only catches a hang.
KERNEL_STARTUP_TIMEOUT_S = 120
# Colab opens these notebooks asking for this runtime (notebook metadata "accelerator"); every one also runs on
# a CPU runtime.
ACCELERATOR = {"quickstart": "GPU", "paper_figures": "GPU", "theory": None}


def kernel_env() -> dict[str, str]:
  """This process's environment, with the repository on PYTHONPATH (so the notebooks' install cell is a no-op)
  and without the test suite's 8 fake CPU devices and strict rank promotion: a notebook sees the machine as a
  user's runtime would."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  if flags:
    env["XLA_FLAGS"] = " ".join(flags)
  else:
    env.pop("XLA_FLAGS", None)
  env.pop("JAX_NUMPY_RANK_PROMOTION", None)  # tests/conftest.py's strict broadcasting is for the package's code.
  env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  return env


def inject_parameters(notebook: nbformat.NotebookNode, parameters: dict) -> None:
  """Adds a cell assigning `parameters` right after the cell tagged "parameters", as papermill does."""
  index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
  source = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
  cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
  notebook.cells.insert(index + 1, cell)


def execute(path: pathlib.Path, cwd: pathlib.Path, parameters: dict | None = None,
            cell_timeout_s: int = CELL_TIMEOUT_S) -> nbformat.NotebookNode:
  """Runs the py:percent notebook at `path` in `cwd` on a python3 kernel; raises CellExecutionError if a cell
  raises. Returns the executed notebook (also written to cwd/NAME.ipynb for inspection)."""
  notebook = jupytext.read(path)
  if parameters:
    inject_parameters(notebook, parameters)
  client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=cell_timeout_s,
                                   startup_timeout=KERNEL_STARTUP_TIMEOUT_S,
                                   resources={"metadata": {"path": str(cwd)}})
  try:
    client.execute(env=kernel_env())
  finally:
    nbformat.write(notebook, cwd / f"{path.stem}.ipynb")
  return notebook


def render(name: str) -> pathlib.Path:
  """Executes colabs/NAME.py at its defaults and writes colabs/NAME.ipynb with the outputs."""
  source = COLABS / f"{name}.py"
  target = source.with_suffix(".ipynb")
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as cwd:
    notebook = execute(source, pathlib.Path(cwd))
  wall_s = time.perf_counter() - start
  if target.exists():
    previous = nbformat.read(target, as_version=4)
    if len(previous.cells) == len(notebook.cells):
      for cell, old in zip(notebook.cells, previous.cells):
        cell["id"] = old["id"]
  notebook.metadata.pop("jupytext", None)
  notebook.metadata["jupytext"] = {"formats": "ipynb,py:percent"}
  if ACCELERATOR[name]:
    notebook.metadata["accelerator"] = ACCELERATOR[name]
  notebook.metadata["icl_jax"] = {
      "rendered": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "by": "python colabs/render.py",
      "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}",
      "python": platform.python_version(),
      "jax": importlib.metadata.version("jax"),
      "wall_s": round(wall_s, 1),
  }
  nbformat.validate(notebook)
  nbformat.write(notebook, target)
  return target


# Where the repository URL appears: pyproject.toml's [project.urls] Repository (the one source), and the badges
# and install cells derived from it.
URL_FILES = ("pyproject.toml", "colabs/README.md", *(f"colabs/{n}.py" for n in NOTEBOOKS),
             *(f"colabs/{n}.ipynb" for n in NOTEBOOKS))


def repository_url(root: pathlib.Path = REPO) -> str:
  text = (root / "pyproject.toml").read_text()
  return re.search(r'^Repository = "([^"]+)"', text, flags=re.M).group(1)


def _colab_path(url: str) -> str | None:
  """OWNER/NAME of a github.com URL (what Colab's /github/ links take), None for another host."""
  found = re.fullmatch(r"https://github\.com/([\w.-]+/[\w.-]+?)(?:\.git)?/?", url)
  return found.group(1) if found else None


def set_repository_url(new: str, root: pathlib.Path = REPO) -> list[pathlib.Path]:
  """Rewrites the repository URL everywhere it appears (URL_FILES): the clone URL of every install cell and
  pyproject's Repository. On github.com the Colab badges follow it; on another host, which Colab cannot open
  notebooks from, each badge links the notebook's file in the repository instead. Returns the files changed."""
  old = repository_url(root)
  old_path, new_path = _colab_path(old), _colab_path(new)
  changed = []
  for name in URL_FILES:
    path = root / name
    text = path.read_text()
    updated = text
    if old_path:
      colab = "https://colab.research.google.com/github/{}/blob/main/"
      target = colab.format(new_path) if new_path else f"{new.removesuffix('.git')}/blob/main/"
      updated = updated.replace(colab.format(old_path), target)
    updated = updated.replace(old, new)
    if updated != text:
      path.write_text(updated)
      changed.append(path)
  return changed


def main(argv: list[str]) -> int:
  urls = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--repo-url=")]
  if urls:
    for path in set_repository_url(urls[-1]):
      print(f"{path.relative_to(REPO)}: repository URL set to {urls[-1]}")
    return 0
  names = argv[1:] or list(NOTEBOOKS)
  unknown = sorted(set(names) - set(NOTEBOOKS))
  if unknown:
    print(f"error: no notebook {', '.join(unknown)} in colabs/ (have {', '.join(NOTEBOOKS)})", file=sys.stderr)
    return 1
  for name in names:
    target = render(name)
    print(f"{target.relative_to(REPO)}: executed in {nbformat.read(target, 4).metadata['icl_jax']['wall_s']} s")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
