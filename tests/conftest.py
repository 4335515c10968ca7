"""Eight fake CPU devices for every test: multi-device code runs here exactly as on an 8-chip host. Implicit
rank promotion raises, so that every broadcast in the package is written out. One persistent compilation cache
serves the whole session (its workers and the processes tests start): many tests compile the same programs.

XLA reads the flag when the backend starts, so it is set before anything imports jax.
"""

import os
import shutil
import signal
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["JAX_NUMPY_RANK_PROMOTION"] = "raise"  # Also for the subprocesses that tests start.
# The session's first process (pytest's controller) makes the cache directory and removes it at the end; the
# workers and subprocesses inherit it. Every program is cached, however small or quick to compile.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="icl_jax_test_xla_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (after the environment is set)
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
# As from a terminal, also when the tests run in a shell's background job, which starts with SIGINT ignored:
# Ctrl-C raises KeyboardInterrupt here, and the processes tests start begin with SIGINT at its default (exec
# resets a handled signal, never an ignored one), so that a test's SIGINT reaches them.
signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_unconfigure(config):
  if _OWN_CACHE is not None:  # Only the process that made it: the others found it in their environment.
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture
def tiny():
  """A fresh copy of tests/tiny_config.py's configuration."""
  from tests import tiny_config

  return tiny_config.get_config()
