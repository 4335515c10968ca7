"""Eight fake CPU devices for every test: multi-device code runs here exactly as on an 8-chip host. Implicit
rank promotion raises, so that every broadcast in the package is written out.

XLA reads the flag when the backend starts, so it is set before anything imports jax.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["JAX_NUMPY_RANK_PROMOTION"] = "raise"  # Also for the subprocesses that tests start.

import jax  # noqa: E402  (after the environment is set)
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def tiny():
  """A fresh copy of tests/tiny_config.py's configuration."""
  from tests import tiny_config

  return tiny_config.get_config()
