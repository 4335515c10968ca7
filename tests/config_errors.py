"""Shared check for the config-validation tests."""

import pytest

from icl_jax import config_checks


def assert_field_error(config, field: str, value, expected: str) -> None:
  """Setting `field` (dotted, below config) to `value` fails validation with a message containing `expected`."""
  section, _, name = field.rpartition(".")
  node = config
  for part in section.split("."):
    node = node[part]
  node[name] = value
  with pytest.raises(config_checks.ConfigError) as info:
    config_checks.validate(config, num_devices=8)
  assert expected in str(info.value)
