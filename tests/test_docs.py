"""README and docs/ stay true: the front page's size and sections, its results table against the committed report,
and the config fields that the documented `python -m icl_jax…` commands override."""

import json
import pathlib
import re
import shlex

from icl_jax.runtime import config_files
from tests import helpers

DOCS = [helpers.REPO / "README.md", *sorted((helpers.REPO / "docs").glob("*.md"))]
COMMAND = re.compile(r"python -m (icl_jax(?:\.[a-z_]+)*)((?: +(?:--[^\s`]+|\\\n|[A-Z_]+))*)")


def test_readme_is_a_front_page():
  text = (helpers.REPO / "README.md").read_text()
  assert len(text.splitlines()) <= 200
  sections = re.findall(r"^## (.+)$", text, flags=re.M)
  for needed in ("Quickstart", "Install", "Results", "Package map", "Citing"):
    assert needed in sections, sections
  assert len(re.findall(r"2026-", text)) <= 3


def test_readme_results_table_is_the_committed_reports():
  """Every verdict in README's results tables is the committed report's of its column (medium, or large where
  the column says so), and every claim those reports grade (anything but NOT RUN) is in the tables."""
  text = (helpers.REPO / "README.md").read_text()
  verdicts = {}
  for scale in ("medium", "large"):
    report = json.loads((helpers.REPO / "docs" / f"{scale}_report" / "report.json").read_text())
    verdicts |= {(scale, c["experiment"], c["id"]): c["verdict"] for c in report["claims"]}
  lines = text.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("| claim (Fu et al."))
  columns = {"isotropic": "isotropic", "κ = 100": "kappa100", "noisy": "noisy", "LSTM": "lstm", "LSA": "lsa"}
  large = {f"large, {name}": ("large", experiment) for name, experiment in columns.items()}
  columns = {**{name: ("medium", experiment) for name, experiment in columns.items()}, **large}
  experiments = [columns[c.strip()] for c in lines[start].strip("|").split("|")[1:]]
  rows = [line for line in lines[start + 2 :][: lines[start:].index("") - 2]]
  shown = {}
  for line in rows:
    ids = re.findall(r"`([a-z_0-9]+)`", line.split("|")[1])
    for experiment, cell in zip(experiments, line.strip().strip("|").split("|")[1:]):
      if cell.strip():
        shown[(*experiment, ids[0])] = cell.strip()
  # The medium rung's experiments outside those columns, a row each, in a second table where there are any.
  other = next((i for i, line in enumerate(lines) if line.startswith("| experiment | claim |")), None)
  for line in lines[other + 2 :][: lines[other:].index("") - 2] if other is not None else ():
    experiment, claim, verdict = (cell.strip() for cell in line.strip().strip("|").split("|"))
    shown["medium", experiment.strip("`"), re.findall(r"`([a-z_0-9]+)`", claim)[0]] = verdict
  graded = {k: v for k, v in verdicts.items() if v != "NOT RUN" and k[1] != "constructions"}
  assert shown == graded


def _commands() -> list[tuple[pathlib.Path, str, list[str]]]:
  found = []
  for path in DOCS:
    for match in COMMAND.finditer(path.read_text()):
      found.append((path, match.group(1), shlex.split(match.group(2).replace("\\\n", " "))))
  return found


def test_every_documented_config_override_names_a_field():
  """Each `--config.FIELD=VALUE` of a documented command names a field of the config it is given with (the
  flags themselves: tests/test_layout.py)."""
  commands = _commands()
  assert len(commands) > 20
  problems = []
  for path, module, args in commands:
    config = None
    for arg in args:
      name, _, value = arg.removeprefix("--").partition("=")
      if name == "config" and "/" in value and value.partition(":")[0].endswith(".py"):
        file, _, variant = value.partition(":")
        config = config_files.load_file(helpers.REPO / file).get_config(*([variant] if variant else []))
      elif name.startswith("config.") and config is not None and not _has_field(config, name[len("config.") :]):
        problems.append(f"{path.name}: {module} {arg}: no such config field")
  assert not problems, "\n".join(problems)


def _has_field(config, dotted: str) -> bool:
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return True
