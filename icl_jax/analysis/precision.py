"""HIGHEST matmul precision for the analysis, so that its numbers are the same on CPU, GPU and TPU.

JAX's default float32 matmul uses TF32 on NVIDIA GPUs and bf16 passes on TPUs; the analysis compares estimates
down to 1e-3, so every product it traces runs at HIGHEST (true float32) instead. The precision is recorded in
the traced program, so it holds inside any caller's jit too (tests/analysis/test_precision.py checks the lowered
programs).
"""

import functools

import jax


def highest_precision(fn):
  """`fn` with every matrix product it traces at HIGHEST precision."""

  @functools.wraps(fn)
  def precise(*args, **kwargs):
    with jax.default_matmul_precision("highest"):
      return fn(*args, **kwargs)

  return precise
