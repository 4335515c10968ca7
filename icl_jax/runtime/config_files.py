"""Config files loaded by path, the way `--config=FILE` loads them, so that one config file can build on another
from any working directory (configs/ is not a package on the import path of an installed icl_jax)."""

import importlib.util
import pathlib
import types


def load(name: str, next_to: str) -> types.ModuleType:
  """The config file `name` (e.g. "linreg.py") in the directory of the file `next_to` (a config's __file__)."""
  return load_file(pathlib.Path(next_to).resolve().parent / name)


def load_file(path: str | pathlib.Path) -> types.ModuleType:
  """The config file at `path`, as a fresh module."""
  path = pathlib.Path(path).resolve()
  spec = importlib.util.spec_from_file_location(f"icl_jax_config_{path.stem}", path)
  if spec is None or not path.is_file():
    raise FileNotFoundError(f"{path}: no such config file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
