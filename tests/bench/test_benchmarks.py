"""The benchmark's model-FLOP count is the work the compiled training step does; the matmul and roofline
benchmarks measure what they name."""

import sys

import jax
import jax.numpy as jnp
import pytest

from configs import linreg
from icl_jax import models
from icl_jax.bench import benchmarks
from tests import helpers


@pytest.mark.parametrize("variant", ["quick", "paper"])
def test_flop_count_matches_the_compiled_training_step(variant):
  config = linreg.get_config(variant)
  config.train.batch_size = 4
  task = config.task
  model = models.build_model(config.model)
  xs = jnp.zeros((config.train.batch_size, task.n_points, task.n_dims))
  ys = jnp.zeros(xs.shape[:2])
  params = jax.eval_shape(model.init, jax.random.key(0), xs[:1], ys[:1])["params"]
  loss = lambda p: jnp.mean(jnp.square(model.apply({"params": p}, xs, ys) - ys))
  cost = jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  # XLA also counts the element-wise work (softmax, LayerNorm, GELU, ...) that model FLOPs leave out.
  assert 0.0 < cost["flops"] - benchmarks.gpt2_flops_per_step(config) < 0.06 * cost["flops"]


def test_matmul_benchmark_times_every_product(tiny):
  line = benchmarks.bench_matmul(tiny)
  rates = [v for k, v in line.items() if k.endswith("_flops_per_s")]
  assert len(rates) == 6 and line["mlp_shape"] == [16 * 11, 16, 64]
  # Two CPU cores do well under 5 TFLOP/s: a higher figure would mean XLA hoisted the product out of the loop.
  assert all(0 < r < 5e12 for r in rates)


def test_roofline_grades_the_three_speed_targets(tiny):
  line = benchmarks.bench_roofline(
    tiny, tiny, sys.executable, str(helpers.REPO / "benchmarks" / "torch_gpt2_linreg.py"), paper_timed_steps=2
  )
  assert (
    set(line["met"])
    == set(benchmarks.ROOFLINE_TARGETS)
    == {"paper_fraction_of_peak", "small_fraction_of_peak", "small_bfloat16_speedup_vs_torch"}
  )
  # A step faster than the peak matmul would mean a wrong FLOP count or a peak XLA hoisted out of its loop.
  assert 0 < line["paper_fraction_of_peak"] < 1 and 0 < line["small_fraction_of_peak"] < 1
  assert line["small_bfloat16_speedup_vs_torch"] == pytest.approx(
    line["torch_small_ms_per_step"] / line["small_bfloat16_ms_per_step"]
  )
  assert line["met"]["small_fraction_of_peak"] == (line["small_fraction_of_peak"] >= 0.5)
  assert line["devices"] == jax.device_count()  # The steps ran data-parallel over every device.
