"""Prompts for in-context linear regression, generated on device by pure functions.

A prompt is (x_1, y_1, ..., x_n, y_n) with x ~ N(0, Sigma), w ~ N(0, I_d), y = w.x + sigma * eps.
Every example of a global batch has its own key, `fold_in(step_key, global_index)`, so a device that makes
examples [i * B_local, (i + 1) * B_local) of the batch at step s depends only on (seed, s, i), and the global
batch is the same for any number of devices or hosts: 8 devices reproduce 1 device's losses, and a run
resumed on another device count sees exactly the data it would have seen.

Shapes are static for the whole run: prompts always have `n_points` points and `n_dims` coordinates. The
curriculum zeroes the coordinates beyond the current dimension and masks the loss beyond the current
number of points (see `curriculum`), so no step ever recompiles.

Ahn et al. 2023 §4.3's distribution is also available: Sigma = U diag(task.eigenvalues) U^T
(spectrum="explicit") with one eigenbasis U for the whole run (rotation="per_run", `run_rotation`), w ~ N(0,
Sigma^-1) (w_distribution="inverse_covariance"), and one batch for resample_every consecutive steps
(`data_step`).
"""

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

SPECTRA = ("two_level", "log_spaced", "explicit")
ROTATIONS = ("per_prompt", "per_batch", "per_run")
W_DISTRIBUTIONS = ("identity", "inverse_covariance")
# Folded into key(task.rotation_seed) for the eigenbasis of rotation="per_run", so that it is independent of the
# run's other streams (`run_keys` splits key(seed)).
_RUN_ROTATION_TAG = 0x5EED


class Curriculum(NamedTuple):
  """The prompt size at one step; scalars that may be traced."""

  n_dims: jax.Array  # Active coordinates of x.
  n_points: jax.Array  # Active (x, y) pairs; the loss covers positions [0, n_points).


class Hyper(NamedTuple):
  """Task settings that may differ between models trained together in one program (`icl_jax.train.train_runs`).

  Python floats (from the config: the sampler then skips what they switch off) or traced scalars (one per
  vmapped model: both paths are computed and the value selects, so each model draws exactly the samples it
  would draw alone).
  """

  kappa: Any
  noise_std: Any


def _is(value, constant: float) -> bool:
  """Whether `value` is statically known to equal `constant` (a traced value never is)."""
  return isinstance(value, (int, float)) and value == constant


class Batch(NamedTuple):
  xs_BxNxD: jax.Array
  ys_BxN: jax.Array
  ws_BxD: jax.Array


def curriculum(step: jax.Array, task: ml_collections.ConfigDict) -> Curriculum:
  """Garg et al.'s schedule as a pure function of the step: start + increment * (step // interval), capped."""
  if not task.curriculum.enabled:
    return Curriculum(jnp.asarray(task.n_dims, jnp.int32), jnp.asarray(task.n_points, jnp.int32))
  c = task.curriculum
  step = jnp.asarray(step, jnp.int32)
  n_dims = jnp.minimum(c.dims_start + c.dims_increment * (step // c.dims_interval), task.n_dims)
  n_points = jnp.minimum(c.points_start + c.points_increment * (step // c.points_interval), task.n_points)
  return Curriculum(n_dims.astype(jnp.int32), n_points.astype(jnp.int32))


def covariance_spectrum(task: ml_collections.ConfigDict, kappa=None) -> jax.Array:
  """Eigenvalues of Cov(x), largest first, with ratio `kappa` (default `task.kappa`) between the extremes; or,
  for spectrum="explicit", `task.eigenvalues` in their order."""
  d = task.n_dims
  kappa = task.kappa if kappa is None else kappa
  if task.spectrum == "two_level":
    # Half the eigenvalues (rounded down, as in Fu et al.'s code) at kappa, the rest at 1.
    eig_D = jnp.where(jnp.arange(d) < d // 2, kappa, 1.0)
  elif task.spectrum == "log_spaced":
    eig_D = jnp.logspace(jnp.log10(kappa), 0.0, d) if d > 1 else jnp.ones((1,))
  elif task.spectrum == "explicit":
    # task.eigenvalues as given (d of them, in this order; kappa is not used), e.g. Ahn et al. §4.3's
    # (1, 1, 0.25, 0.0625, 1).
    eig_D = jnp.asarray(task.eigenvalues, jnp.float32)
  else:
    raise ValueError(f"config.task.spectrum = {task.spectrum!r}; allowed: {SPECTRA}")
  if task.normalize_trace:
    eig_D = eig_D * (d / jnp.sum(eig_D))
  return eig_D.astype(jnp.float32)


def random_rotation(key: jax.Array, d: int) -> jax.Array:
  """A Haar-distributed orthogonal d x d matrix (QR of a Gaussian matrix with the signs fixed)."""
  q_DxD, r_DxD = jnp.linalg.qr(jax.random.normal(key, (d, d)))
  return q_DxD * jnp.sign(jnp.diagonal(r_DxD))[None, :]


def _prompt_keys(key: jax.Array) -> jax.Array:
  """A prompt's keys: of its x, its w, its noise and its own eigenbasis."""
  return jax.random.split(key, 4)


def _rotated(task: ml_collections.ConfigDict, hyper: Hyper) -> bool:
  """Whether x has a non-identity covariance, i.e. an eigenbasis (statically; a traced kappa may be 1)."""
  return task.spectrum == "explicit" or not _is(hyper.kappa, 1.0)


def _sample_prompt(
  key: jax.Array, rotation_DxD: jax.Array | None, task: ml_collections.ConfigDict, n_dims: jax.Array, hyper: Hyper
) -> Batch:
  """One prompt: xs [N, D], ys [N], w [D]; `rotation_DxD` is its eigenbasis where `_rotated`."""
  key_x, key_w, key_noise, _ = _prompt_keys(key)
  d, n = task.n_dims, task.n_points
  zs_NxD = jax.random.normal(key_x, (n, d))
  explicit = task.spectrum == "explicit"  # Sigma from task.eigenvalues, whatever kappa is.
  if _rotated(task, hyper):
    # x = U diag(sqrt(lambda)) z has covariance U diag(lambda) U^T.
    eig_D = covariance_spectrum(task, hyper.kappa)
    rotated_NxD = (zs_NxD * jnp.sqrt(eig_D)[None, :]) @ rotation_DxD.T
    static = explicit or isinstance(hyper.kappa, (int, float))
    zs_NxD = rotated_NxD if static else jnp.where(hyper.kappa == 1.0, zs_NxD, rotated_NxD)
  xs_NxD = jnp.where(jnp.arange(d)[None, :] < n_dims, zs_NxD, 0.0)
  w_D = jax.random.normal(key_w, (d,))
  if task.get("w_distribution", "identity") == "inverse_covariance" and _rotated(task, hyper):
    # w = U diag(lambda)^(-1/2) g has covariance U diag(1 / lambda) U^T = Sigma^-1 (Ahn et al.'s Theorem 3 and
    # §4.3, and their code's W D^-1 U^T): then y = w.x = g.z is distributed as for isotropic data.
    rotated_w_D = rotation_DxD @ (w_D / jnp.sqrt(eig_D))
    w_D = rotated_w_D if static else jnp.where(hyper.kappa == 1.0, w_D, rotated_w_D)
  ys_N = xs_NxD @ w_D
  if not _is(hyper.noise_std, 0.0):
    ys_N = ys_N + hyper.noise_std * jax.random.normal(key_noise, (n,))
  return Batch(xs_NxD, ys_N, w_D)


def sample_batch(
  step_key: jax.Array,
  first_index: jax.Array,
  batch_size: int,
  task: ml_collections.ConfigDict,
  n_dims: jax.Array,
  hyper: Hyper | None = None,
) -> Batch:
  """Examples [first_index, first_index + batch_size) of the global batch whose key is `step_key`.

  Args:
    step_key: the key of one step's global batch (see `step_key`).
    first_index: global index of this slice's first example (a device's offset in the global batch).
    batch_size: number of examples in this slice.
    task: config.task.
    n_dims: active dimensions (coordinates beyond are zero); may be traced.
    hyper: kappa and noise_std, if not the task's (see `Hyper`).
  """
  if hyper is None:
    hyper = Hyper(task.kappa, task.noise_std)
  rotation_key, examples_key = jax.random.split(step_key)
  rotation_DxD = None
  if not _is(hyper.kappa, 1.0) and task.rotation == "per_batch":
    # Fu et al.'s code: one eigenbasis for the whole (global) batch of the step.
    rotation_DxD = random_rotation(rotation_key, task.n_dims)
  if task.rotation == "per_run":
    # Ahn et al. §4.3: one eigenbasis for the whole run, training and evaluation alike.
    rotation_DxD = run_rotation(task)
  indices_B = first_index + jnp.arange(batch_size)
  keys_B = jax.vmap(lambda i: jax.random.fold_in(examples_key, i))(indices_B)
  if rotation_DxD is None and not _rotated(task, hyper):
    return jax.vmap(lambda k: _sample_prompt(k, None, task, n_dims, hyper))(keys_B)
  if rotation_DxD is None:
    # Each prompt's own eigenbasis, one QR after another: jaxlib's CPU kernel splits a batch of QRs that is large
    # enough (the large rung's, not the medium's) over XLA's intra-op threads and waits on one of them, which
    # deadlocks when every thread waits so, as with one program per CPU device on a 2-core CPU
    # (docs/large_search.md).
    rotations_BxDxD = jax.lax.map(lambda k: random_rotation(_prompt_keys(k)[3], task.n_dims), keys_B)
  else:
    # One copy of the shared eigenbasis per prompt, so that its products are batched matmuls as for "per_prompt".
    # Shared, they would be one [B*N, D] matmul, which XLA's CPU kernels may round differently (last bit, seen on
    # one CI CPU) for a device's slice of the batch than for the whole batch, whose rows the slice must equal.
    rotations_BxDxD = jnp.broadcast_to(rotation_DxD, (batch_size, *rotation_DxD.shape))
  return jax.vmap(lambda k, r: _sample_prompt(k, r, task, n_dims, hyper))(keys_B, rotations_BxDxD)


def run_rotation(task: ml_collections.ConfigDict) -> jax.Array:
  """U of rotation="per_run": one Haar-distributed eigenbasis, a pure function of `task.rotation_seed` (which
  configs/lsa.py ties to the run's `seed`), the same at every step and in every evaluation."""
  key = jax.random.fold_in(jax.random.key(task.rotation_seed), _RUN_ROTATION_TAG)
  return random_rotation(key, task.n_dims)


def covariance_matrix(task: ml_collections.ConfigDict) -> jax.Array:
  """Cov(x) [D, D] when it is the same for every prompt: U diag(lambda) U^T for rotation="per_run", diag(lambda)
  = I for isotropic data (kappa = 1 and a spectrum other than "explicit"). Raises ValueError otherwise."""
  if task.rotation == "per_run":
    rotation_DxD = run_rotation(task)
    return (rotation_DxD * covariance_spectrum(task)[None, :]) @ rotation_DxD.T
  if task.spectrum != "explicit" and task.kappa == 1.0:
    return jnp.eye(task.n_dims)
  raise ValueError(
    f"config.task.rotation = {task.rotation!r} draws a new eigenbasis of Cov(x) per prompt or per "
    "batch, so no single covariance describes the data; use rotation='per_run' (or kappa = 1)."
  )


def data_step(step: jax.Array, task: ml_collections.ConfigDict) -> jax.Array:
  """The step whose key makes the batch of `step`: step // task.resample_every (Ahn et al. resample their batch
  every 100 steps); `step` itself for the default resample_every = 1."""
  every = task.get("resample_every", 1)
  return step if every == 1 else step // every


def step_key(data_key: jax.Array, step: jax.Array) -> jax.Array:
  """The key of the global batch at `step`: a pure function of the run's data key and the step."""
  return jax.random.fold_in(data_key, step)


def run_keys(seed: int) -> dict[str, jax.Array]:
  """Independent keys for parameter initialisation, the training data stream and evaluation prompts."""
  init, train_data, evaluation = jax.random.split(jax.random.key(seed), 3)
  return {"init": init, "data": train_data, "eval": evaluation}
