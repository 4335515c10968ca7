"""The package's architecture, as README's module map states it: import directions, no cycles, flags only in
the entry modules, and every `python -m icl_jax...` command of the docs naming a module and flags that exist."""

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
# Programs: each parses its own flags at import time, and no library module imports them.
ENTRY_MODULES = {"icl_jax.main", "icl_jax.sweep", "icl_jax.bench", "icl_jax.garg_checkpoint",
                 "icl_jax.datasets.build", "icl_jax.accelerator_check", "icl_jax.reproduce"}
DOCS = [REPO / "README.md", REPO / "launch" / "README.md", REPO / "colabs" / "README.md",
        *sorted((REPO / "launch").glob("*.sh")), *sorted((REPO / "configs").glob("*.py")),
        *sorted((REPO / "colabs").glob("*.py"))]


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


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
        cycles.append(stack[stack.index(target):] + [target])
      elif target not in state:
        visit(target, stack + [target])
    state[name] = "done"

  for name in sorted(GRAPH):
    if name not in state:
      visit(name, [name])
  assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_lazy_imports_of_the_package():
  lazy = [f"{name} imports {target} inside a function" for name, path in MODULES.items()
          for target, nested in _imports(path) if nested]
  assert not lazy, "\n".join(lazy)


def test_models_import_nothing_of_the_package_outside_models():
  outside = {name: sorted(t for t in targets if not t.startswith("icl_jax.models"))
             for name, targets in GRAPH.items() if name.startswith("icl_jax.models")}
  assert not any(outside.values()), outside


def test_no_library_module_imports_an_entry_module():
  offenders = {name: sorted(GRAPH[name] & ENTRY_MODULES) for name in GRAPH if GRAPH[name] & ENTRY_MODULES}
  assert not offenders, offenders


def test_training_does_not_import_sweeps_or_tools():
  training = [n for n in GRAPH if n.count(".") == 1 and n not in ENTRY_MODULES]
  offenders = {n: sorted(t for t in GRAPH[n] if t.startswith(("icl_jax.sweep", "icl_jax.tools"))) for n in training}
  assert not any(offenders.values()), offenders


def test_every_family_has_an_evaluation():
  assert set(evaluate.EVALUATIONS) == set(models.REGISTRY)


def test_algorithms_api_is_small():
  tree = ast.parse((PACKAGE / "analysis" / "algorithms.py").read_text())
  public = [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")]
  assert len(public) <= 10, public


def test_library_modules_define_no_flags_at_import():
  library = sorted(set(MODULES) - ENTRY_MODULES)
  script = ("import importlib\nfrom absl import flags\n"
            f"for name in {library!r}:\n  importlib.import_module(name)\n"
            "print(sorted(m for m in flags.FLAGS.flags_by_module_dict() if m.startswith('icl_jax')))")
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
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
  assert ENTRY_MODULES <= set(COMMANDS)


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_documented_commands_exist_with_their_flags(module):
  assert module in ENTRY_MODULES, f"the docs run `python -m {module}`, which is not a program"
  result = subprocess.run([sys.executable, "-m", module, "--helpfull"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  # absl prints the help and exits with 1; anything else (an import error) is a traceback.
  assert result.returncode in (0, 1) and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert "flags:" in result.stdout
  defined = set(re.findall(r"--(?:\[no\])?([a-z_]+)[:=]", result.stdout + result.stderr))
  missing = sorted(COMMANDS[module] - defined - {"help", "helpfull"})
  assert not missing, f"python -m {module}: the docs pass {missing}, which it does not define"
