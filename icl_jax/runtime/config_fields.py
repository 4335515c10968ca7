"""Checks of single config fields, shared by the training, dataset and evaluation checks: each appends one line
naming the field, its value and the allowed values to a list, so that one message reports every problem."""

import math
import numbers

import ml_collections

from icl_jax.runtime import errors


def is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
  """A finite number (not a bool): inf and nan pass no check."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def get(config, path: str):
  """The value at the dotted `path`, or None where a section or the field is missing."""
  node = config
  for part in path.split("."):
    node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
  return node


def present(config, path: str) -> bool:
  """Whether the field exists: optional fields are absent when they take their default."""
  section, _, name = path.rpartition(".")
  node = get(config, section)
  return isinstance(node, ml_collections.ConfigDict) and name in node


def check_int(found: list[str], config, path: str, minimum: int) -> None:
  value = get(config, path)
  if not is_int(value) or value < minimum:
    found.append(f"config.{path} = {value!r}: must be an integer >= {minimum}")


def check_real(found: list[str], config, path: str, minimum: float, strict: bool = False) -> None:
  value = get(config, path)
  if not (is_real(value) and (value > minimum if strict else value >= minimum)):
    found.append(f"config.{path} = {value!r}: must be a number {'>' if strict else '>='} {minimum}")


def check_choice(found: list[str], config, path: str, allowed) -> None:
  value = get(config, path)
  if value not in allowed:
    found.append(f"config.{path} = {value!r}: allowed values are {', '.join(map(repr, allowed))}")


def non_finite_errors(node, prefix: str = "config") -> dict[str, str]:
  """{field: error} for every float field (or float in a tuple field) anywhere in the config that is inf or
  nan: no field means anything with those, and they would otherwise compile and fail (or, as adam_eps = inf,
  train with zero updates)."""
  found = {}
  for name, value in node.items() if isinstance(node, ml_collections.ConfigDict) else ():
    path = f"{prefix}.{name}"
    if isinstance(value, ml_collections.ConfigDict):
      found.update(non_finite_errors(value, path))
    elif isinstance(value, (tuple, list)) and any(isinstance(v, float) and not math.isfinite(v) for v in value):
      found[path] = f"{path} = {value!r}: every number must be finite"
    elif isinstance(value, float) and not math.isfinite(value):
      found[path] = f"{path} = {value!r}: must be a finite number"
  return found


def with_non_finite(config, found: list[str]) -> list[str]:
  """`found` with a line for every non-finite field, which replaces what other checks say of that field."""
  non_finite = non_finite_errors(config)
  return list(non_finite.values()) + [e for e in found if e.partition(" = ")[0] not in non_finite]


def raise_if_any(found: list[str]) -> None:
  """ConfigError listing `found`, if there is anything in it."""
  if found:
    raise errors.ConfigError("invalid configuration:\n  " + "\n  ".join(found))
