"""Config files loaded by path, the way `--config=FILE` loads them, so that one config file can build on another
from any working directory (configs/ is not a package on the import path of an installed icl_jax); and configs as
plain JSON data, flattened and compared field by field."""

import importlib.util
import json
import pathlib
import types

import ml_collections

from icl_jax.runtime import errors


def load(name: str, next_to: str) -> types.ModuleType:
  """The config file `name` (e.g. "linreg.py") in the directory of the file `next_to` (a config's __file__)."""
  return load_file(pathlib.Path(next_to).resolve().parent / name)


def load_file(path: str | pathlib.Path) -> types.ModuleType:
  """The config file at `path`, as a fresh module."""
  path = pathlib.Path(path).resolve()
  spec = importlib.util.spec_from_file_location(f"icl_jax_config_{path.stem}", path)
  if spec is None or not path.is_file():
    raise errors.MissingFileError(f"{path}: no such config file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def flatten(tree: dict, prefix: str = "") -> dict:
  """{"a": {"b": 1}} -> {"a.b": 1}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def config_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort(sort_keys=True))


# Fields that say how a run is carried out, not what it computes: never a difference between two configs, so
# that a workdir or summary written before such a field existed still matches.
OPERATIONAL_FIELDS = ("train.checkpoint_timeout_s",)


def config_differences(
  saved: dict, current: dict, ignore: tuple[str, ...] = ("eval.",), saved_as: str = "saved"
) -> list[str]:
  """Human-readable lines `config.FIELD: saved X, now Y` for every field that differs, except those under the
  prefixes `ignore`: by default `eval.*`, as evaluation settings do not change what training computes, so they
  may change between attempts (a summary of results compares them too); OPERATIONAL_FIELDS never differ."""
  ignore = tuple(ignore) + OPERATIONAL_FIELDS
  saved, current = ({k: v for k, v in flatten(c).items() if not k.startswith(ignore)} for c in (saved, current))
  missing = object()
  return [
    f"config.{key}: {saved_as} {saved.get(key, missing)!r}, now {current.get(key, missing)!r}".replace(
      repr(missing), "(absent)"
    )
    for key in sorted(saved.keys() | current.keys())
    if saved.get(key, missing) != current.get(key, missing)
  ]
