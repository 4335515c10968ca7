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
# # icl_jax quickstart: train a transformer on in-context linear regression, then ask which algorithm each layer runs
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/GITHUB_ORG/icl_jax/blob/main/colabs/quickstart.ipynb)
#
# (`GITHUB_ORG` in the links of these notebooks stands for the repository's owner until it is public; see
# `colabs/README.md`. Colab runtimes: CPU, GPU or TPU all work; a GPU or TPU trains faster.)
#
# A prompt is (x₁, y₁, …, x_n, y_n) with x ~ N(0, I_d), a fresh w ~ N(0, I_d) per prompt and y = wᵀx. A GPT-2
# reads the prompt and predicts every y_t from the pairs before it, so it has to *learn to do linear regression
# in context*. This notebook
#
# 1. trains the laptop-size configuration `configs/linreg.py:quick` (d = 5, 11 points, 4 layers of width 64),
# 2. runs the evaluator (`icl_jax.analysis.evaluate`): it reads out a prediction after every layer and compares it with
#    Iterative Newton, gradient descent, online GD and least squares (Fu et al. 2024's protocol),
# 3. shows the figures the evaluator writes, and what they mean.
#
# It runs on whatever the runtime has (CPU, GPU or TPU). The defaults of the parameters cell are the full
# laptop-size run (about five minutes on a 2-core CPU), which is what the outputs stored with this notebook
# show. CI executes it with the smaller values in the comments (about a minute); a run that short has not
# learned much, so its figures show only the format.

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
# Sizes: configs/linreg.py:quick's. CI runs the smaller values in the comments (about a minute on a 2-core CPU).
num_steps = 6000  # Training steps. CI: 800.
eval_prompts = 1280  # Fresh prompts the evaluation averages over. CI: 256.
workdir = ""  # Where the run goes; "" means runs/quickstart_<num_steps>. Rerunning the notebook resumes it.

# %%
import json
import logging as std_logging

import jax
import matplotlib.pyplot as plt
from absl import logging
from IPython.display import Image, Markdown, display

from configs import linreg
from icl_jax import train
from icl_jax.analysis import evaluate

print(f"JAX {jax.__version__}, backend {jax.default_backend()!r}: {jax.devices()}")
logging.set_verbosity(logging.INFO)  # Training progress (loss, steps/s, ETA) goes to the cell's output.
# Orbax logs dozens of INFO lines per checkpoint. run_logs.quiet_orbax() filters them out of absl's handler,
# which only absl.app.run installs (the command line); in a notebook the filter goes on absl's logger.
logging.get_absl_logger().addFilter(
    lambda record: record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname)
workdir = pathlib.Path(workdir or f"runs/quickstart_{num_steps}")

# %% [markdown]
# ## Train
#
# `train.train_and_evaluate(config, workdir)` is what `python -m icl_jax.main --config=configs/linreg.py:quick
# --workdir=DIR` runs. It trains on every device JAX sees, writes checkpoints, `metrics.jsonl`, TensorBoard
# events and, at the end, `error_curve.json`; run again on the same workdir, it resumes (or, when the run is
# finished, only reloads it). A workdir holding a run with a different configuration is refused: use a new one.

# %%
config = linreg.get_config("quick")
config.train.num_steps = num_steps
config.train.warmup_steps = min(config.train.warmup_steps, num_steps // 10)  # 500 at full size.
config.eval.after_training = False  # The evaluation below runs with this notebook's own settings.
summary = train.train_and_evaluate(config, workdir)
print(json.dumps(summary["final"], indent=1))

# %%
records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
curve = summary["error_curve"]
figure, (loss_ax, curve_ax) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
loss_ax.plot([r["step"] for r in records], [r["loss_per_dim"] for r in records], "o-")
loss_ax.set(xlabel="step", ylabel="training loss / d", yscale="log", title="Training loss (metrics.jsonl)")
curve_ax.plot(curve["error_per_dim"], "o-", label="model")
curve_ax.plot(curve["zero_per_dim"], ":", color="grey", label="predicting 0")
curve_ax.axvline(config.task.n_dims, color="grey", lw=0.8)
curve_ax.set(xlabel="in-context examples", ylabel="error / d", yscale="log", title="Error against context length")
curve_ax.legend()
plt.show()
print(f"error/d with {config.task.n_points - 1} examples: {curve['last_error_per_dim']:.3g} "
      f"({curve['last_ratio_to_zero']:.3g} x predicting zero)")

# %% [markdown]
# ## Evaluate layer by layer
#
# `evaluate.evaluate(config, workdir)` is `python -m icl_jax.main ... --mode=eval`. On fresh prompts it fits a
# linear read-out to every layer's hidden state (`eval.readout = "least_squares"`), runs every algorithm on
# every prefix of the same prompts, and writes `WORKDIR/eval/results.json` and the figures. The evaluation
# settings do not change the trained model, so they can differ from the training run's.

# %%
eval_config = config.copy_and_resolve_references()
eval_config.eval.num_prompts = eval_prompts
results = evaluate.evaluate(eval_config, workdir)
fits = results["fits"]
print("best-matching Newton steps per layer:", results["best_match"]["newton"],
      f"({fits['newton']['steps_per_layer']:.2f} steps/layer, R² {fits['newton']['r2']:.3f})")
print("best-matching GD steps (log grid):    ", results["best_match"]["gd_log"],
      f"({fits['gd_log']['doublings_per_layer']:.2f} doublings/layer, R² {fits['gd_log']['r2']:.3f})")
print("last layer's best SimE [90% interval]:",
      {k: f"{v['value']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"
       for k, v in results["last_layer_best"]["sim_e"].items()})
print("evaluation time (s):", {k: round(v, 1) for k, v in results["timing"].items()})
figure_dir = workdir / "eval"
print(sorted(p.name for p in figure_dir.glob("*.png")))

# %% [markdown]
# ### Error against layer
#
# Each line is one context length n: the squared error / d of the prediction read out after each layer (bands:
# bootstrap interval over prompts), and dashed, least squares with the same n points. Once n ≥ d least squares
# is exact, so the gap to it is how far a layer is from solving the problem. In a trained model the error falls
# with depth by orders of magnitude per layer for n > d: faster than gradient descent could (its error falls by
# a constant factor per step), the first sign of a second-order method (Fu et al. Fig. 2).

# %%
display(Image(filename=str(figure_dir / "error_vs_layer.png")))

# %% [markdown]
# ### Error against context length
#
# The model's output and its last layer's read-out against the number of in-context examples, with least
# squares, Iterative Newton and gradient descent for a few step counts, online GD, and the zero predictor. A
# trained model tracks least squares: its error collapses at n = d, where the problem becomes determined.

# %%
display(Image(filename=str(figure_dir / "error_vs_context.png")))

# %% [markdown]
# ### SimE heatmaps: which algorithm, and how many steps of it, each layer matches
#
# SimE is the cosine similarity between two predictors' *residuals* (prediction minus target) over all
# positions, averaged over prompts: 1 means they make the same mistakes. A row is a layer, a column a number of
# steps of one algorithm; the red box marks each layer's best match. For Iterative Newton the boxes of a trained
# model move right by a roughly constant number of steps per layer; for gradient descent (log grid: 1, 2, 4, …
# steps) they move right by a roughly constant *factor* per layer. The `sim_w_*` heatmaps are the same with the
# similarity of induced weights (the linear map from query to prediction) instead of residuals.

# %%
display(Image(filename=str(figure_dir / "sim_e_newton_heatmap.png")))
display(Image(filename=str(figure_dir / "sim_e_gd_log_heatmap.png")))

# %% [markdown]
# ### Best match against layer, with the fits
#
# The argmax of each heatmap row against the layer. Left: Newton steps on a linear axis, with a straight-line
# fit over `eval.fit_layers` (Fu et al. find about 3 Newton steps per layer over the middle layers of their
# 12-layer model). Right: GD steps on a log₂ axis, where a straight line means a fixed number of *doublings*
# per layer, i.e. GD steps growing exponentially with depth. Newton linear in depth and GD exponential in depth
# is Fu et al.'s evidence that the layers implement a second-order method: one Newton step per layer or so would
# need exponentially many GD steps to match. At full size this notebook's run gives Newton steps [1, 3, 6, 11]
# (about 3.3 per layer) and GD [1, 16, 64, 512] (README.md); a CI-size run has not learned enough to show it.

# %%
display(Image(filename=str(figure_dir / "best_match.png")))

# %% [markdown]
# ### The other figures
#
# Every figure is also written as PDF next to the PNG. The remaining ones: SimW heatmaps and the SimE heatmap
# for GD's linear grid (1, 50, …, 1300 steps, Fu et al.'s Fig. 8).

# %%
shown = {"error_vs_layer", "error_vs_context", "sim_e_newton_heatmap", "sim_e_gd_log_heatmap", "best_match"}
for path in sorted(figure_dir.glob("*.png")):
  if path.stem not in shown:
    display(Markdown(f"`{path.name}`"), Image(filename=str(path)))
