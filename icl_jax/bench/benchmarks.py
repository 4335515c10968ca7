"""Benchmarks behind `python -m icl_jax.bench`; each returns one dict, printed as a JSON line:

eval: the full default evaluation (`analysis.probing.Evaluator`) of a freshly initialised model of the
  config's size, once with compilation, then again after it.
multi_train: training 4 runs of the config's shape as one vmapped program (`train.train_runs`) against
  training them one after another, in model-steps per second, on one device.
train_step: the training step at the curriculum's final size on all devices: time per step, prompts/s,
  model FLOPs, achieved FLOP/s and MFU, compile time and peak memory; `bench_torch` times a PyTorch reference
  at the same shapes in another interpreter.
matmul: FLOP/s of one jitted matmul, float32 and bfloat16 (float32 accumulation), at 2048^3 and at the shape
  of the config's MLP: what the device's matmuls can reach, a peak to measure the training step against.
roofline (`bench_roofline`): the training steps of the paper and small configs as fractions of the float32
  matmul peak measured in the same process, and the small config in bfloat16 against PyTorch's float32 step.
"""

import json
import resource
import subprocess
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from icl_jax import data
from icl_jax import models
from icl_jax import optim
from icl_jax import train
from icl_jax import train_step
from icl_jax.analysis import probing


def bench_eval(config) -> dict:
  """Seconds for one evaluation after compilation, and the stages it spends them in."""
  model = models.build_model(config.model)
  xs = jnp.zeros((1, config.task.n_points, config.task.n_dims))
  params = model.init(jax.random.key(config.seed), xs, xs[..., 0])["params"]
  evaluator = probing.Evaluator(config)
  start = time.perf_counter()
  evaluator(params)
  first = time.perf_counter() - start
  timing = evaluator(params)["timing"]
  e = config.eval
  return {
    "name": "eval",
    "seconds": timing["total_s"],
    "first_call_with_compilation_s": first,
    "stages_s": {k: v for k, v in timing.items() if k != "total_s"},
    "num_prompts": e.num_prompts,
    "num_layers": config.model.num_layers,
    "newton_steps": e.newton_steps,
    "gd_grids": [len(e.gd_steps), len(e.gd_log_steps)],
    "sim_w_prompts": e.sim_w_prompts,
    "sim_w_queries": e.sim_w_queries,
    "readout": e.readout,
    "device": jax.devices()[0].device_kind,
    "jax": jax.__version__,
  }


def _steps_per_second(run_chunk, state, steps: int, repeats: int = 3) -> float:
  state, metrics = run_chunk(state, steps)  # Compiles.
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(repeats):
    state, metrics = run_chunk(state, steps)
  jax.block_until_ready(metrics)
  return repeats * steps / (time.perf_counter() - start)


def bench_multi_train(config, num_models: int = 4) -> dict:
  """Training `num_models` runs of the config's shape as one vmapped program against one after another.

  The runs differ in kappa (the config's kappa must then be > 1 so that the separate run samples rotated
  prompts too, as every vmapped model does).
  """
  config = config.copy_and_resolve_references()
  config.task.kappa = max(config.task.kappa, 10.0)
  mesh = train.make_mesh(jax.devices()[:1])
  model = models.build_model(config.model)
  optimizer = optim.make_optimizer(config.train)
  schedule = optim.learning_rate_schedule(config.train)
  steps = config.train.steps_per_dispatch
  single = _steps_per_second(
    train_step.make_train_chunk(config, model, optimizer, schedule, mesh),
    train_step.init_state(config, model, optimizer, mesh),
    steps,
  )
  state = train_step.init_state(config, model, optimizer, mesh)
  stacked = jax.device_put(jax.tree.map(lambda a: jnp.stack([a] * num_models), state), train_step.replicated(mesh))
  hypers = data.Hyper(jnp.linspace(config.task.kappa, 10 * config.task.kappa, num_models), jnp.zeros((num_models,)))
  group = _steps_per_second(
    train_step.make_train_chunk(config, model, optimizer, schedule, mesh, hypers), stacked, steps
  )
  return {
    "name": "multi_train",
    "num_models": num_models,
    "separate_model_steps_per_s": single,
    "vmapped_model_steps_per_s": group * num_models,
    "speedup": group * num_models / single,
    "num_layers": config.model.num_layers,
    "width": config.model.width,
    "batch_size": config.train.batch_size,
    "device": jax.devices()[0].device_kind,
  }


# Dense peak FLOP/s of known accelerators for float32 matmuls (TF32 tensor cores, JAX's default precision on
# them) and bfloat16, from the vendors' data sheets.
PEAK_FLOPS = {
  "NVIDIA H100 80GB HBM3": {"float32": 494e12, "bfloat16": 989e12},
  "NVIDIA H200": {"float32": 494e12, "bfloat16": 989e12},
}


def final_curriculum_step(task) -> int:
  """The first step at which the curriculum reaches the full prompt size."""
  if not task.curriculum.enabled:
    return 0
  c = task.curriculum
  wait = lambda start, end, increment, interval: 0 if end <= start else -(-(end - start) // increment) * interval
  return max(
    wait(c.dims_start, task.n_dims, c.dims_increment, c.dims_interval),
    wait(c.points_start, task.n_points, c.points_increment, c.points_interval),
  )


def gpt2_flops_per_step(config) -> float:
  """Model FLOPs of one GPT-2 training step at full size, as computed: 3x the forward's (backward = 2x forward).

  The training forward (models/gpt2.py) runs T = 2N - 1 tokens (not y_N) through every block but the last,
  whose attention queries, output projection and MLP see only the N x positions. Matmuls are 2 FLOPs per
  multiply-add: per block (4 + 2 mlp_ratio) W^2 per token, and QK^T and PV 4 T W per query token.
  """
  m, n, b = config.model, config.task.n_points, config.train.batch_size
  t, w = 2 * n - 1, m.width
  block = lambda queries: 2 * (t * 3 * w * w + queries * (1 + 2 * m.mlp_ratio) * w * w) + 4 * queries * t * w
  forward = (m.num_layers - 1) * block(t) + block(n) + 2 * t * config.task.n_dims * w + 2 * n * w
  return 3.0 * b * forward


def _peak_memory_bytes() -> int:
  stats = jax.devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"])
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # The host's, on CPU.


def train_step_timer(config) -> tuple[Callable[[int, int], float], float]:
  """Compiles the training chunk (`train_step.make_train_chunk`) at the curriculum's final size on all devices
  and runs one step; returns `seconds_per_step(steps, dispatches)`, which times `dispatches` calls of `steps`
  steps each (at most `config.train.steps_per_dispatch`, the length the program is compiled for: a shorter
  call runs the same program), and the seconds of that first call, compilation included."""
  mesh = train.make_mesh(jax.devices())
  model = models.build_model(config.model)
  optimizer = optim.make_optimizer(config.train)
  run_chunk = train_step.make_train_chunk(config, model, optimizer, optim.learning_rate_schedule(config.train), mesh)
  state = train_step.init_state(config, model, optimizer, mesh)
  state = state.replace(
    step=jax.device_put(jnp.asarray(final_curriculum_step(config.task), jnp.int32), train_step.replicated(mesh))
  )
  start = time.perf_counter()
  state, metrics = run_chunk(state, 1)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start
  latest = {"state": state}  # The chunk donates its input state: each call continues from the last one's.

  def seconds_per_step(steps: int, dispatches: int) -> float:
    if not 1 <= steps <= config.train.steps_per_dispatch:
      raise ValueError(f"steps={steps}: a call runs 1 to train.steps_per_dispatch steps")
    state = latest["state"]
    start = time.perf_counter()
    for _ in range(dispatches):
      state, metrics = run_chunk(state, steps)
    jax.block_until_ready(metrics)
    latest["state"] = state
    return (time.perf_counter() - start) / (dispatches * steps)

  return seconds_per_step, first


def bench_train_step(config, peak_flops: float = 0.0, timed_steps: int = 0) -> dict:
  """The jitted training step (`train_step_timer`) at the curriculum's final size, in dispatches of the
  config's steps_per_dispatch steps: 3 of them, or as many as cover `timed_steps`."""
  devices = jax.devices()
  chunk = config.train.steps_per_dispatch
  seconds_per_step, first = train_step_timer(config)
  dispatches = max(1, -(-timed_steps // chunk)) if timed_steps else 3
  seconds = seconds_per_step(chunk, dispatches)
  flops = gpt2_flops_per_step(config) if config.model.family == "gpt2" else None
  device_kind = devices[0].device_kind
  dtype = config.model.get("dtype", "float32")
  peak = peak_flops or PEAK_FLOPS.get(device_kind, {}).get(dtype, 0.0) * len(devices)
  return {
    "name": "train_step",
    "ms_per_step": 1e3 * seconds,
    "steps_per_s": 1 / seconds,
    "prompts_per_s": config.train.batch_size / seconds,
    "model_flops_per_step": flops,
    "achieved_flops_per_s": flops / seconds if flops else None,
    "mfu": flops / seconds / peak if flops and peak else None,
    "peak_flops_per_s": peak or None,
    "compile_s": max(first - seconds, 0.0),
    "peak_memory_bytes": _peak_memory_bytes(),
    "steps_per_dispatch": chunk,
    "timed_steps": dispatches * chunk,
    "family": config.model.family,
    "num_layers": config.model.num_layers,
    "width": config.model.get("width"),
    "num_heads": config.model.get("num_heads"),
    "n_dims": config.task.n_dims,
    "n_points": config.task.n_points,
    "batch_size": config.train.batch_size,
    "dtype": dtype,
    "devices": len(devices),
    "device": device_kind,
    "jax": jax.__version__,
  }


def bench_torch(config, python: str, reference: str, steps: int = 10) -> dict:
  """The PyTorch reference training step at the config's shapes, run in `python` (torch + transformers)."""
  m = config.model
  command = [
    python,
    reference,
    "--layers",
    str(m.num_layers),
    "--embd",
    str(m.width),
    "--heads",
    str(m.num_heads),
    "--dims",
    str(config.task.n_dims),
    "--points",
    str(config.task.n_points),
    "--batch",
    str(config.train.batch_size),
    "--steps",
    str(steps),
  ]
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode:
    raise RuntimeError(f"{reference} failed under {python}:\n{result.stderr[-2000:]}")
  return {"name": "torch_train_step", **json.loads(result.stdout.strip().splitlines()[-1])}


def _matmul_flops_per_s(m: int, k: int, n: int, dtype, flops: float, out_dtype=jnp.float32) -> float:
  """One [m, k] x [k, n] product from `dtype` inputs to `out_dtype` per iteration of a jitted loop, about
  `flops` in all (at least 3 products); each iteration's left operand depends on the previous result, so that
  XLA cannot hoist the product out of the loop."""
  repeats = max(3, int(flops // (2 * m * k * n)))
  a, b = jnp.ones((m, k), dtype), jnp.ones((k, n), dtype)

  def body(_, carry):
    product = jnp.dot(a * carry.astype(dtype), b, preferred_element_type=out_dtype)
    return product[0, 0].astype(jnp.float32) * 1e-9 + 1.0

  loop = jax.jit(lambda: jax.lax.fori_loop(0, repeats, body, jnp.float32(1.0)))
  jax.block_until_ready(loop())
  start = time.perf_counter()
  jax.block_until_ready(loop())
  return 2.0 * m * k * n * repeats / (time.perf_counter() - start)


def bench_matmul(config) -> dict:
  """FLOP/s of isolated matmuls on the first device, large and at the config's MLP shape: float32, bfloat16
  inputs with a float32 result (as the model's, `models.gpt2.mixed_matmul`) and with a bfloat16 result."""
  m, tokens = config.model, config.train.batch_size * (2 * config.task.n_points - 1)
  shapes = {"2048x2048x2048": (2048, 2048, 2048), "mlp": (tokens, m.width, m.mlp_ratio * m.width)}
  kinds = {
    "float32": (jnp.float32, jnp.float32),
    "bfloat16": (jnp.bfloat16, jnp.float32),
    "bfloat16_to_bfloat16": (jnp.bfloat16, jnp.bfloat16),
  }
  line = {"name": "matmul", "mlp_shape": list(shapes["mlp"]), "device": jax.devices()[0].device_kind}
  for label, shape in shapes.items():
    for kind, (dtype, out_dtype) in kinds.items():
      line[f"{label}_{kind}_flops_per_s"] = _matmul_flops_per_s(*shape, dtype, flops=2e10, out_dtype=out_dtype)
  return line


# The CPU speed targets (README, "Speed"): model FLOP/s of the float32 training step as a fraction of the
# float32 matmul peak for the paper and small configs, and the small config's bfloat16 step against PyTorch's
# float32 one (ratio of times per step).
ROOFLINE_TARGETS = {
  "paper_fraction_of_peak": 0.70,
  "small_fraction_of_peak": 0.50,
  "small_bfloat16_speedup_vs_torch": 4.0,
}
PEAK_SHAPE = (2048, 2048, 2048)


def _float32_matmul_peak(measurements: int = 3) -> float:
  """The best of `measurements` timings of the float32 2048^3 product, ~40 GFLOP each."""
  return max(_matmul_flops_per_s(*PEAK_SHAPE, jnp.float32, flops=4e10) for _ in range(measurements))


def bench_roofline(
  paper, small, torch_python: str = "", torch_reference: str = "", paper_timed_steps: int = 20
) -> dict:
  """The float32 training steps of `paper` and `small` (GPT-2 configs) as fractions of the float32 matmul peak
  (`ROOFLINE_TARGETS`), and `small` in bfloat16 against the PyTorch float32 reference when `torch_python` is
  given. The peak is measured before and after the steps and the higher figure kept, so that a clock that
  drifts during the run cannot flatter the fractions."""
  peak = _float32_matmul_peak()
  bfloat16 = small.copy_and_resolve_references()
  bfloat16.model.dtype = "bfloat16"
  steps = {
    "paper": bench_train_step(paper, timed_steps=paper_timed_steps),
    "small": bench_train_step(small),
    "small_bfloat16": bench_train_step(bfloat16),
  }
  peak = max(peak, _float32_matmul_peak())
  line = {
    "name": "roofline",
    "float32_matmul_peak_flops_per_s": peak,
    "peak_shape": list(PEAK_SHAPE),
    "device": jax.devices()[0].device_kind,
    "devices": len(jax.devices()),
    "jax": jax.__version__,
  }
  for label, step in steps.items():
    line[f"{label}_ms_per_step"] = step["ms_per_step"]
    line[f"{label}_flops_per_s"] = step["achieved_flops_per_s"]
  line["paper_fraction_of_peak"] = steps["paper"]["achieved_flops_per_s"] / peak
  line["small_fraction_of_peak"] = steps["small"]["achieved_flops_per_s"] / peak
  line["small_bfloat16_speedup_vs_torch"] = None
  if torch_python:
    reference = bench_torch(small, torch_python, torch_reference)
    line["torch_small_ms_per_step"] = reference["ms_per_step"]
    line["small_bfloat16_speedup_vs_torch"] = reference["ms_per_step"] / steps["small_bfloat16"]["ms_per_step"]
  line["targets"] = ROOFLINE_TARGETS
  line["met"] = {k: line[k] >= target for k, target in ROOFLINE_TARGETS.items() if line[k] is not None}
  return line


BENCHMARKS = {
  "train_step": bench_train_step,
  "eval": bench_eval,
  "multi_train": bench_multi_train,
  "matmul": bench_matmul,
}
