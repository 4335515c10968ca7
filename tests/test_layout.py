"""The package's architecture, as README's package map states it: the layers and their import directions, no
cycles, flags only in the programs, no program beside a twin library, and every `python -m icl_jax...` command of
the docs naming a program and flags that exist."""

import ast
import os
import pathlib
import re
import subprocess
import sys

import pytest

from icl_jax import models
from icl_jax.analysis import evaluate

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "icl_jax"
# Programs, by the name `python -m` takes: main.py and datasets/build.py, and every package with a __main__.py
# (the program beside the library it drives). Each parses its own flags at import time; no library imports one.
PROGRAM_FILES = {
  "icl_jax.main": PACKAGE / "main.py",
  "icl_jax.datasets.build": PACKAGE / "datasets" / "build.py",
  **{f"icl_jax.{p.parent.name}": p for p in sorted(PACKAGE.glob("*/__main__.py"))},
}
# The layers, bottom up: runtime/ imports nothing above it; models/ is a leaf; the analysis reaches training only
# through evaluate.py's restore.
TRAINING = {"icl_jax.checkpointing", "icl_jax.train", "icl_jax.train_step", "icl_jax.optim", "icl_jax.config_checks"}
WORKDIR = {"icl_jax.runtime.workdir_lock", "icl_jax.runtime.run_logs", "icl_jax.runtime.storage"}
DOCS = [
  REPO / "README.md",
  *sorted((REPO / "docs").glob("*.md")),
  REPO / "launch" / "README.md",
  REPO / "colabs" / "README.md",
  *sorted((REPO / "launch").glob("*.sh")),
  *sorted((REPO / "configs").glob("*.py")),
  *sorted((REPO / "colabs").glob("*.py")),
]


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
ENTRY_MODULES = {_module_name(path) for path in PROGRAM_FILES.values()}


def _resolve(name: str) -> str | None:
  """The package module that `name` (a module, or an attribute of a package) refers to."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def _imports(path: pathlib.Path) -> list[tuple[str, bool]]:
  """(imported icl_jax module, whether the import is inside a function) for every import of `path`."""
  found = []

  def visit(node, nested):
    for child in ast.iter_child_nodes(node):
      inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if isinstance(child, ast.Import):
        names = [alias.name for alias in child.names]
      elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
        names = [f"{child.module}.{alias.name}" for alias in child.names]
      else:
        names = []
      for name in names:
        if name.startswith("icl_jax.") and (target := _resolve(name)) is not None:
          found.append((target, inner))
      visit(child, inner)

  visit(ast.parse(path.read_text()), False)
  return found


GRAPH = {name: {target for target, _ in _imports(path) if target != name} for name, path in MODULES.items()}


def test_no_import_cycles():
  cycles, state = [], {}

  def visit(name, stack):
    state[name] = "open"
    for target in sorted(GRAPH[name]):
      if state.get(target) == "open":
        cycles.append(stack[stack.index(target) :] + [target])
      elif target not in state:
        visit(target, stack + [target])
    state[name] = "done"

  for name in sorted(GRAPH):
    if name not in state:
      visit(name, [name])
  assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_lazy_imports_of_the_package():
  lazy = [
    f"{name} imports {target} inside a function"
    for name, path in MODULES.items()
    for target, nested in _imports(path)
    if nested
  ]
  assert not lazy, "\n".join(lazy)


def test_models_import_nothing_of_the_package_outside_models():
  outside = {
    name: sorted(t for t in targets if not t.startswith("icl_jax.models"))
    for name, targets in GRAPH.items()
    if name.startswith("icl_jax.models")
  }
  assert not any(outside.values()), outside


def test_no_library_module_imports_an_entry_module():
  offenders = {name: sorted(GRAPH[name] & ENTRY_MODULES) for name in GRAPH if GRAPH[name] & ENTRY_MODULES}
  assert not offenders, offenders


def test_runtime_imports_nothing_above_it():
  above = {
    n: sorted(t for t in GRAPH[n] if not t.startswith("icl_jax.runtime"))
    for n in GRAPH
    if n.startswith("icl_jax.runtime")
  }
  assert not any(above.values()), above


def test_analysis_reaches_training_and_workdirs_only_through_evaluate():
  offenders = {
    n: sorted(GRAPH[n] & (TRAINING | WORKDIR))
    for n in GRAPH
    if n.startswith("icl_jax.analysis") and n != "icl_jax.analysis.evaluate"
  }
  assert not any(offenders.values()), offenders
  assert "icl_jax.optim" not in GRAPH["icl_jax.checkpointing"] | GRAPH["icl_jax.analysis.evaluate"]
  assert "icl_jax.train_step" not in GRAPH["icl_jax.checkpointing"] | GRAPH["icl_jax.analysis.evaluate"]


def test_config_checks_import_no_analysis():
  assert not {t for t in GRAPH["icl_jax.config_checks"] if t.startswith("icl_jax.analysis")}


def test_training_does_not_import_the_programs_packages():
  programs = tuple(f"{name}." for name in PROGRAM_FILES if name.count(".") == 1)
  training = [n for n in GRAPH if n.count(".") == 1 and n not in ENTRY_MODULES]
  offenders = {n: sorted(t for t in GRAPH[n] if t.startswith(programs)) for n in training}
  assert not any(offenders.values()), offenders


def test_programs_have_no_twins():
  """A program is main.py, datasets/build.py or its package's __main__.py: no module at the top of the package
  runs flags beside a library of the same topic in a subpackage."""
  runners = {name for name, path in MODULES.items() if "app.run(" in path.read_text()}
  assert runners == ENTRY_MODULES


def test_programs_catch_one_error_type():
  for name in ENTRY_MODULES - {"icl_jax.datasets.build"}:
    handlers = [
      node
      for node in ast.walk(ast.parse(MODULES[name].read_text()))
      if isinstance(node, ast.ExceptHandler) and isinstance(node.type, ast.Tuple) and len(node.type.elts) > 3
    ]
    assert not handlers, f"{name} catches a tuple of {len(handlers[0].type.elts)} errors; catch errors.UserError"


def test_every_family_has_an_evaluation():
  assert set(evaluate.EVALUATIONS) == set(models.REGISTRY)


def test_algorithms_api_is_small():
  tree = ast.parse((PACKAGE / "analysis" / "algorithms.py").read_text())
  public = [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")]
  assert len(public) <= 10, public


def test_library_modules_define_no_flags_at_import():
  library = sorted(set(MODULES) - ENTRY_MODULES)
  script = (
    "import importlib\nfrom absl import flags\n"
    f"for name in {library!r}:\n  importlib.import_module(name)\n"
    "print(sorted(m for m in flags.FLAGS.flags_by_module_dict() if m.startswith('icl_jax')))"
  )
  result = subprocess.run(
    [sys.executable, "-c", script],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1] == "[]"


def _documented_commands() -> dict[str, set[str]]:
  """module -> the flags (without --config.FIELD overrides) that the docs pass to `python -m module`."""
  commands = {}
  for path in DOCS:
    text = path.read_text().replace("\\\n", " ")
    for match in re.finditer(r"python3?\"? -m (icl_jax[\w.]*)([^\n`|;&)]*)", text):
      flags = set(re.findall(r"(?<![\w-])--([a-z_]+)(?=[=\s]|$)", match.group(2)))
      commands.setdefault(match.group(1), set()).update(flags)
  return commands


COMMANDS = _documented_commands()


def test_the_docs_name_the_programs():
  assert set(PROGRAM_FILES) <= set(COMMANDS)


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_documented_commands_exist_with_their_flags(module):
  assert module in PROGRAM_FILES, f"the docs run `python -m {module}`, which is not a program"
  result = subprocess.run(
    [sys.executable, "-m", module, "--helpfull"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  # absl prints the help and exits with 1; anything else (an import error) is a traceback.
  assert result.returncode in (0, 1) and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert "flags:" in result.stdout
  defined = set(re.findall(r"--(?:\[no\])?([a-z_]+)[:=]", result.stdout + result.stderr))
  missing = sorted(COMMANDS[module] - defined - {"help", "helpfull"})
  assert not missing, f"python -m {module}: the docs pass {missing}, which it does not define"


def test_tests_mirror_the_package():
  """tests/X/ holds the tests of icl_jax/X/, and tests/e2e/ the end-to-end runs of the programs as subprocesses."""
  folders = {p.name for p in (REPO / "tests").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
  packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
  assert folders - {"e2e"} <= packages, sorted(folders - {"e2e"} - packages)
