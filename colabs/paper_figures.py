# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Fu et al.'s figures, with the paper's numbers beside ours
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/GITHUB_ORG/icl_jax/blob/main/colabs/paper_figures.ipynb)
#
# (`GITHUB_ORG` in the links of these notebooks stands for the repository's owner until it is public; see
# `colabs/README.md`. Colab runtimes: CPU, GPU or TPU all work; a GPU or TPU trains faster.)
#
# Fu et al. (2024), *Transformers learn to achieve second-order convergence rates for in-context linear
# regression*, probe every layer of Garg et al.'s 12-layer GPT-2 (d = 20, 41 points) and find that the layers
# follow **Iterative Newton** with about 3 more steps per layer, while matching **gradient descent** needs
# exponentially many steps in depth. This notebook evaluates a model with `icl_jax.analysis.probing` and puts each of
# their numbers next to ours: the best-matching steps per layer (Fig. 7b, Fig. 10), the linear fit, Table 1,
# and the figures (Fig. 2, 7b, 8, 10).
#
# **Which model.** Set `workdir` in the parameters cell to one of
#
# * a finished run of the paper's configuration: `python -m icl_jax.main --config=configs/linreg.py
#   --workdir=runs/paper` (500k steps: about a day on one GPU);
# * Garg et al.'s released checkpoint, the model Fu et al. probed, converted once with `python -m
#   icl_jax.garg_checkpoint --checkpoint=models/linear_regression/pretrained/state.pt --config=configs/linreg.py
#   --workdir=runs/garg`
#   (needs `pip install torch`; the notebook itself does not).
#
# With `workdir = ""` (the default) the notebook trains a **tiny stand-in** of the paper's shape
# (12 layers, d = 20, 41 points, but width 32 and a few dozen steps) so that it runs standalone. **That model has
# learned next to nothing: its numbers are not expected to match the paper's**, only to show the format.

# %%
# Setup: makes `icl_jax` importable, keeping the runtime's own accelerator build of JAX. Nothing happens where
# the package already is importable (CI, a local install). Otherwise it takes the first source found: the
# checkout this notebook sits in; ICL_JAX_SOURCE (a checkout folder, e.g. on a mounted Drive, an sdist made by
# `python -m build --sdist`, or a git URL); an sdist uploaded next to the notebook (icl_jax-*.tar.gz);
# /content/drive/MyDrive/icl_jax; else it clones REPO_URL. It prints which one it used, then runs
# colabs/install.py: it detects CPU, GPU or TPU and the installed jax, pins that jax while pip installs the
# package, and installs jax[cuda12/13] or jax[tpu] only when it is missing or too old. If that replaced a jax
# this kernel had already imported, the runtime restarts: run the notebook again.
import glob
import importlib.util
import os
import pathlib
import subprocess
import sys
import tarfile

REPO_URL = os.environ.get("ICL_JAX_REPO_URL", "https://github.com/GITHUB_ORG/icl_jax")  # See colabs/README.md.
if importlib.util.find_spec("icl_jax") is None:
  checkout = pathlib.Path("icl_jax_repo").absolute()  # Not "icl_jax": that would shadow the package.
  chosen = os.environ.get("ICL_JAX_SOURCE") or next(iter(sorted(glob.glob("icl[_-]jax-*.tar.gz"))), "")
  if (pathlib.Path.cwd().parent / "icl_jax").is_dir():
    checkout, chosen = pathlib.Path.cwd().parent, "the checkout this notebook is in"
  elif chosen.endswith(".tar.gz"):
    with tarfile.open(chosen) as sdist:
      sdist.extractall(checkout.parent, filter="data")
      checkout = checkout.parent / sdist.getnames()[0].split("/")[0]
  elif chosen and pathlib.Path(chosen).is_dir():
    checkout = pathlib.Path(chosen).absolute()
  elif pathlib.Path("/content/drive/MyDrive/icl_jax/icl_jax").is_dir() and not chosen:
    checkout = chosen = pathlib.Path("/content/drive/MyDrive/icl_jax")
  elif not (checkout / "icl_jax").is_dir():
    chosen = chosen or REPO_URL
    subprocess.run(["git", "clone", "--depth=1", str(chosen), str(checkout)], check=True)
  print(f"icl_jax: installing from {chosen or checkout}; to choose, set ICL_JAX_SOURCE to a checkout folder, an "
        "sdist (.tar.gz) or a git URL", flush=True)
  installed = subprocess.run([sys.executable, str(checkout / "colabs" / "install.py"), str(checkout)])
  if installed.returncode == 3 and "jax" in sys.modules:  # 3: install.py replaced the jax imported here.
    print("jax was replaced: restarting the runtime; run the notebook again from the top.", flush=True)
    os.kill(os.getpid(), 9)  # Colab and Jupyter restart a kernel that dies.
  if installed.returncode not in (0, 3):
    raise RuntimeError(f"colabs/install.py failed with exit status {installed.returncode}")
  sys.path.insert(0, str(checkout))  # The editable install's path hook is read at the next interpreter start.
  importlib.invalidate_caches()

# %% tags=["parameters"]
# The model to evaluate: a workdir with config.json and checkpoints/ (a training run) or garg_params/ (a converted
# Garg et al. checkpoint), e.g. "runs/paper" or "runs/garg". "": train the tiny stand-in below.
workdir = ""
# Evaluation settings changed from the run's own config.eval. {}: Fu et al.'s protocol (1280 prompts, 256 probe
# prompts, SimW on 16 prompts x 64 queries, 1000 bootstrap resamples). CI: {"num_prompts": 128,
# "probe_prompts": 64, "sim_w_prompts": 4, "sim_w_queries": 32, "bootstrap_samples": 200}.
eval_overrides = {}
tiny_steps = 40  # Training steps of the stand-in (only with workdir = ""). It stays a stand-in at any size.
out_dir = "paper_figures"  # results.json and the figures (PNG and PDF) go here; the run's workdir is not touched.

# %%
import io
import json
import logging as std_logging

import jax
import matplotlib
import ml_collections
import numpy as np
from absl import logging
from IPython.display import Image, Markdown, display

from configs import linreg
from icl_jax import checkpointing, train
from icl_jax.analysis import evaluate, figures, probing, similarity

print(f"JAX {jax.__version__}, backend {jax.default_backend()!r}: {jax.devices()}")
logging.set_verbosity(logging.INFO)
# Orbax logs dozens of INFO lines per checkpoint. run_logs.quiet_orbax() filters them out of absl's handler,
# which only absl.app.run installs (the command line); in a notebook the filter goes on absl's logger.
logging.get_absl_logger().addFilter(
    lambda record: record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname)

# Fu et al. 2024, read off the paper.
PAPER = {
    # Best-matching Newton steps per layer: the legend of Fig. 7(b).
    "newton": [1, 1, 3, 5, 8, 10, 14, 17, 20, 21, 21, 21],
    # Best-matching GD steps on the log grid 2^0..2^12 (eta = 0.01): read off Fig. 10.
    "gd_log": [1, 1, 4, 8, 32, 64, 256, 512, 1024, 4096, 4096, 4096],
}


def show(make_figure, *args):
  """Draws `make_figure(*args)`, one of icl_jax.analysis.figures' functions, as a PNG in the output. Those
  functions return a matplotlib Figure that belongs to no pyplot backend, so the PNG is rendered here rather than
  left to one."""
  with matplotlib.rc_context(figures.STYLE):  # The style must be in force when the text is laid out and drawn.
    buffer = io.BytesIO()
    make_figure(*args).savefig(buffer, format="png", dpi=100)
  display(Image(data=buffer.getvalue()))

# %% [markdown]
# ## The model
#
# A finished run is read back with the configuration it was trained with (`WORKDIR/config.json`). Without one,
# the stand-in is the paper's configuration (`configs/linreg.py`) with a narrow model, no curriculum and
# `tiny_steps` steps.

# %%
stand_in = not workdir
if stand_in:
  config = linreg.get_config()
  config.task.curriculum.enabled = False
  config.model.update(num_layers=12, num_heads=2, width=32)
  config.train.update(num_steps=tiny_steps, learning_rate=1e-3, log_every=max(1, tiny_steps // 4),
                      checkpoint_every=tiny_steps, steps_per_dispatch=max(1, tiny_steps // 4))
  config.eval.num_prompts = eval_overrides.get("num_prompts", config.eval.num_prompts)  # For the error curve.
  run_dir = pathlib.Path(f"runs/paper_figures_stand_in_{tiny_steps}")
  train.train_and_evaluate(config, run_dir)
else:
  run_dir = pathlib.Path(workdir)
  config = ml_collections.ConfigDict(json.loads((run_dir / "config.json").read_text()))
config.eval.update(eval_overrides)
task, model = config.task, config.model
print(f"{run_dir}: d = {task.n_dims}, {task.n_points} points, kappa = {task.kappa}, {model.num_layers} layers, "
      f"{model.num_heads} heads, width {model.width}")
if stand_in:
  display(Markdown("**A tiny stand-in trained for a few steps: its numbers below are not expected to match "
                   "the paper's.**"))

# %% [markdown]
# ## Evaluate
#
# `evaluate.evaluate(config, workdir)` would write into `WORKDIR/eval/`; here the same three steps write into
# `out_dir` instead, so that evaluating someone's finished run with other settings leaves it untouched.

# %%
params, step = checkpointing.load_params(config, run_dir)
results = probing.Evaluator(config)(params)
results["settings"]["checkpoint_step"] = step
out = pathlib.Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
(out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
print(f"checkpoint step {step}; evaluated on {config.eval.num_prompts} prompts in "
      f"{results['timing']['total_s']:.1f} s (incl. compilation); wrote {out / 'results.json'}")

# %% [markdown]
# ## Best-matching steps per layer (Fig. 7b and Fig. 10)
#
# For each layer, the number of steps of the algorithm whose residuals are most similar to the layer's (the
# argmax of SimE over Newton 1..23 and over GD's log grid 2⁰..2¹²). Fu et al.'s 12-layer model gains about 3
# Newton steps per layer over layers 3–9 and saturates at 21 steps (where Newton has converged), while the GD
# match doubles more than once per layer.

# %%
ours_newton, ours_gd = results["best_match"]["newton"], results["best_match"]["gd_log"]
ours_sim = results["best_similarity"]["newton"]
rows = ["| layer | Newton steps: ours | Fu et al. | GD steps (log grid): ours | Fu et al. | our best SimE (Newton) |",
        "|---:|---:|---:|---:|---:|---:|"]
for layer in range(1, max(len(ours_newton), len(PAPER["newton"])) + 1):
  ours = lambda values: str(values[layer - 1]) if layer <= len(ours_newton) else ""
  paper = lambda values: str(values[layer - 1]) if layer <= len(values) else ""
  rows.append(f"| {layer} | {ours(ours_newton)} | {paper(PAPER['newton'])} | {ours(ours_gd)} | "
              f"{paper(PAPER['gd_log'])} | {ours([f'{s:.3f}' for s in ours_sim])} |")
display(Markdown("\n".join(rows)))

# %% [markdown]
# ## The fits: Newton steps, and doublings of GD steps, against depth
#
# A least-squares line through the best-matching Newton steps, and through log₂ of the GD steps, over the
# middle layers (`config.eval.fit_layers`; Fu et al. name layers 3–9 of 12). The paper gives no slope: its
# numbers below are fits to its Fig. 7(b) legend and Fig. 10, over layers 3–9.

# %%
def fit_3_9(newton, gd_log):
  """Fits over layers 3-9, as for the paper: Newton steps, and log2 of GD steps, against the layer."""
  layers = np.arange(3, 10)
  return {"newton": similarity.linear_fit(layers, np.asarray(newton)[2:9]),
          "gd_log": similarity.linear_fit(layers, np.log2(gd_log)[2:9])}


fits = results["fits"]  # Over config.eval.fit_layers.
first, last = fits["layers"]
paper_fits = fit_3_9(PAPER["newton"], PAPER["gd_log"])  # Newton: 2.89 steps/layer, R² 0.993.
ours_3_9 = fit_3_9(ours_newton, ours_gd) if len(ours_newton) >= 9 else None


def fit_text(fit, unit):
  return f"{fit['slope']:.2f} {unit}/layer, R² {fit['r2']:.3f}" if fit["slope"] is not None else "no fit"


columns = {f"ours, layers {first}–{last}": fits}
if ours_3_9 and (first, last) != (3, 9):
  columns["ours, layers 3–9"] = ours_3_9
columns["Fu et al., layers 3–9"] = paper_fits
rows = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
for name, unit in (("newton", "Newton steps"), ("gd_log", "doublings of GD steps")):
  rows.append(f"| {figures.GRID_NAMES[name]} | " + " | ".join(fit_text(c[name], unit) for c in columns.values())
              + " |")
display(Markdown("\n".join(rows)))

# %% [markdown]
# ## The last layer's similarity to each algorithm
#
# The highest SimE (and SimW) between the last layer and each algorithm over its step grid, with 90% bootstrap
# intervals over the prompts. Fu et al.'s Table 1 (Newton .991, GD .957, online GD .806) is **not** this
# quantity, as far as can be told: their text and released code do not say which layer, read-out or setting
# it uses, and their Fig. 8 heatmap implies last-layer values of about .994 (Newton) and .987 (GD).
# `results["table1"]` keeps their row apart, with candidate definitions computed on this model.

# %%
rows = ["| | Iterative Newton | GD | BFGS | online GD | least squares |", "|---|---:|---:|---:|---:|---:|"]
for metric in ("sim_e", "sim_w"):
  last = results["last_layer_best"][metric]
  rows.append(f"| {figures.METRIC_SHORT[metric]}, last layer | " + " | ".join(
      f"{last[k]['value']:.3f} [{last[k]['low']:.3f}, {last[k]['high']:.3f}]"
      for k in ("newton", "gd", "bfgs", "online_gd", "least_squares")) + " |")
display(Markdown("\n".join(rows)))
print("Fu et al.'s Table 1 (definition not pinned down):", results["table1"]["paper"])

# %% [markdown]
# ## The figures
#
# The project's versions of Fu et al.'s figures (`icl_jax/analysis/figures.py`), drawn from `results`. On the paper's
# setting (12 layers, d = 20, κ = 1, the paper's grids) the best-match figure also draws the paper's values.
#
# **Fig. 2: error against layer.** Each line is a context length n; dashed, least squares with the same n. For
# n > d the paper's layers 3–8 cut the error by orders of magnitude per layer: superlinear, like Newton, unlike
# GD with a fixed step.

# %%
show(figures.error_vs_layer, results)

# %% [markdown]
# **Fig. 7(b) and Fig. 10: best match against layer with the fits.** Newton on a linear axis, GD's log grid on a
# log₂ axis.

# %%
show(figures.best_match, results)

# %% [markdown]
# **Fig. 8: SimE heatmaps.** Every layer against every number of Newton steps and GD steps (η = 0.01, Fu et al.'s
# grid 1, 50, …, 1300), each layer's best match boxed. GD needs hundreds of steps to match the late layers and
# its similarity plateaus below Newton's; Fig. 10 is the same with the log grid.

# %%
for grid in ("newton", "gd", "gd_log"):
  show(figures.similarity_heatmap, results, "sim_e", grid)

# %% [markdown]
# All figures, SimW heatmaps and error against context length included, as PNG and PDF files:

# %%
paths = evaluate.write_figures(figures.makers(results), figures.STYLE, out)
print("\n".join(sorted(str(p) for p in paths if p.suffix == ".png")))
