"""The private JAX functions that `icl_jax.runtime.distributed` binds the CPU collectives with still exist, with the
keywords it passes: a JAX release that changes them fails here instead of silently binding gloo to every
interface of a multi-process test."""

import inspect

import jax

from icl_jax.runtime import distributed


def test_private_gloo_api_is_as_checked():
  make_gloo, make_client, register_backend_factory, global_state = distributed.gloo_internals()
  # A pybind function's signature is its docstring's first line.
  assert "distributed_client" in make_gloo.__doc__ and "hostname" in make_gloo.__doc__, (
    f"jax {jax.__version__} changed make_gloo_tcp_collectives (checked with {distributed.PRIVATE_GLOO_API_CHECKED})"
  )
  assert "collectives" in inspect.signature(make_client).parameters
  assert {"priority", "fail_quietly"} <= set(inspect.signature(register_backend_factory).parameters)
  assert hasattr(global_state, "client")
