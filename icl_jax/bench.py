"""Benchmarks: `python -m icl_jax.bench --config=configs/linreg.py [--config.FIELD=VALUE ...]`.

Prints one JSON line per benchmark. `eval` times the full default evaluation (icl_jax/evaluate.py) of a
freshly initialised model of the config's size: once with compilation, then again after it.
"""

import json
import time

import jax
import jax.numpy as jnp
from absl import app
from absl import flags
from ml_collections import config_flags

from icl_jax import config_checks
from icl_jax import evaluate
from icl_jax import models

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


BENCHMARKS = {"eval": bench_eval}


def main(argv):
  del argv
  config = _FLAGS["config"].value
  config_checks.validate(config, num_devices=1)
  for name in _FLAGS["benchmark"].value:
    print(json.dumps(BENCHMARKS[name](config)), flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
