"""Benchmarks: `python -m icl_jax.bench --config=configs/linreg.py [--config.FIELD=VALUE ...]`.

Prints one JSON line per benchmark:
  eval: the full default evaluation (icl_jax/evaluate.py) of a freshly initialised model of the config's size,
    once with compilation, then again after it.
  multi_train: training 4 runs of the config's shape as one vmapped program (icl_jax/multi_train.py) against
    training them one after another, in model-steps per second, on one device.
"""

import json
import time

import jax
import jax.numpy as jnp
from absl import app
from absl import flags
from ml_collections import config_flags

from icl_jax import config_checks
from icl_jax import data
from icl_jax import evaluate
from icl_jax import models
from icl_jax import optim
from icl_jax import train
from icl_jax import train_step

_FLAGS = {}


def _define_flags() -> None:
  """Flags exist only when this module is the program, so that importing it defines none."""
  _FLAGS["config"] = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  _FLAGS["benchmark"] = flags.DEFINE_multi_enum("benchmark", ["eval"], list(BENCHMARKS), "Benchmarks to run.")
  flags.mark_flags_as_required(["config"])


def bench_eval(config) -> dict:
  """Seconds for one evaluation after compilation, and the stages it spends them in."""
  model = models.build_model(config.model)
  xs = jnp.zeros((1, config.task.n_points, config.task.n_dims))
  params = model.init(jax.random.key(config.seed), xs, xs[..., 0])["params"]
  evaluator = evaluate.Evaluator(config)
  start = time.perf_counter()
  evaluator(params)
  first = time.perf_counter() - start
  timing = evaluator(params)["timing"]
  e = config.eval
  return {"name": "eval", "seconds": timing["total_s"], "first_call_with_compilation_s": first,
          "stages_s": {k: v for k, v in timing.items() if k != "total_s"}, "num_prompts": e.num_prompts,
          "num_layers": config.model.num_layers, "newton_steps": e.newton_steps, "gd_grids": [len(e.gd_steps),
          len(e.gd_log_steps)], "sim_w_prompts": e.sim_w_prompts, "sim_w_queries": e.sim_w_queries,
          "readout": e.readout, "device": jax.devices()[0].device_kind, "jax": jax.__version__}


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
  single = _steps_per_second(train_step.make_train_chunk(config, model, optimizer, schedule, mesh),
                             train_step.init_state(config, model, optimizer, mesh), steps)
  state = train_step.init_state(config, model, optimizer, mesh)
  stacked = jax.device_put(jax.tree.map(lambda a: jnp.stack([a] * num_models), state), train_step.replicated(mesh))
  hypers = data.Hyper(jnp.linspace(config.task.kappa, 10 * config.task.kappa, num_models), jnp.zeros((num_models,)))
  group = _steps_per_second(train_step.make_train_chunk(config, model, optimizer, schedule, mesh, hypers), stacked,
                            steps)
  return {"name": "multi_train", "num_models": num_models, "separate_model_steps_per_s": single,
          "vmapped_model_steps_per_s": group * num_models, "speedup": group * num_models / single,
          "num_layers": config.model.num_layers, "width": config.model.width, "batch_size": config.train.batch_size,
          "device": jax.devices()[0].device_kind}


BENCHMARKS = {"eval": bench_eval, "multi_train": bench_multi_train}


def main(argv):
  del argv
  config = _FLAGS["config"].value
  config_checks.validate(config, num_devices=1)
  for name in _FLAGS["benchmark"].value:
    print(json.dumps(BENCHMARKS[name](config)), flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
