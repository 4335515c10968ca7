"""Prompt sampler statistics, the curriculum, and the per-example determinism of the data stream."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import linreg
from configs import lsa as lsa_config
from icl_jax import data
from tests import helpers


def _task(**overrides):
  task = linreg.get_config().task
  task.curriculum.enabled = False
  task.update(overrides)
  return task


def _batch(task, batch_size, seed=0, n_dims=None):
  key = data.step_key(jax.random.key(seed), 0)
  return data.sample_batch(key, 0, batch_size, task, task.n_dims if n_dims is None else n_dims)


def _eigh_per_prompt(xs_BxNxD):
  cov_BxDxD = np.einsum("bni,bnj->bij", xs_BxNxD, xs_BxNxD) / xs_BxNxD.shape[1]
  return np.linalg.eigh(cov_BxDxD)  # Ascending eigenvalues.


@pytest.mark.parametrize("spectrum", ["two_level", "log_spaced"])
def test_ill_conditioned_covariance_has_the_requested_spectrum(spectrum):
  task = _task(n_dims=6, n_points=40_000, kappa=100.0, spectrum=spectrum)
  eigvals_BxD, _ = _eigh_per_prompt(np.asarray(_batch(task, 3).xs_BxNxD))
  expected_D = np.sort(np.asarray(data.covariance_spectrum(task)))
  np.testing.assert_allclose(eigvals_BxD, np.broadcast_to(expected_D, eigvals_BxD.shape), rtol=0.06)
  kappas_B = eigvals_BxD[:, -1] / eigvals_BxD[:, 0]
  np.testing.assert_allclose(kappas_B, 100.0, rtol=0.12)
  np.testing.assert_allclose(eigvals_BxD.sum(axis=1), 6.0, rtol=0.03)  # Trace normalised to d.


def test_spectra_values():
  two = data.covariance_spectrum(_task(n_dims=4, kappa=100.0, normalize_trace=False))
  np.testing.assert_allclose(two, [100, 100, 1, 1])
  logs = data.covariance_spectrum(_task(n_dims=3, kappa=100.0, spectrum="log_spaced", normalize_trace=False))
  np.testing.assert_allclose(logs, [100, 10, 1], rtol=1e-6)
  normalised = data.covariance_spectrum(_task(n_dims=4, kappa=100.0))
  np.testing.assert_allclose(normalised, [200 / 101 * 1, 200 / 101, 2 / 101, 2 / 101], rtol=1e-6)


def _top_eigenvectors(task, batch_size):
  _, eigvecs_BxDxD = _eigh_per_prompt(np.asarray(_batch(task, batch_size).xs_BxNxD))
  return eigvecs_BxDxD[:, :, -(task.n_dims // 2) :]  # Spans the kappa-eigenspace.


@pytest.mark.parametrize("rotation, shared", [("per_prompt", False), ("per_batch", True)])
def test_rotation_is_per_prompt_or_per_batch(rotation, shared):
  task = _task(n_dims=4, n_points=20_000, kappa=100.0, rotation=rotation)
  top_BxDx2 = _top_eigenvectors(task, 2)
  projector_BxDxD = np.einsum("bik,bjk->bij", top_BxDx2, top_BxDx2)
  same_subspace = np.allclose(projector_BxDxD[0], projector_BxDxD[1], atol=0.05)
  assert same_subspace == shared


def test_isotropic_x_and_w_and_noise_std():
  task = _task(n_dims=5, n_points=2000, noise_std=0.1)
  batch = _batch(task, 64)
  xs = np.asarray(batch.xs_BxNxD).reshape(-1, 5)
  np.testing.assert_allclose(np.cov(xs.T), np.eye(5), atol=0.03)
  ws = np.asarray(batch.ws_BxD)
  assert abs(ws.mean()) < 0.3 and abs(ws.var() - 1) < 0.3
  residual = np.asarray(batch.ys_BxN) - np.einsum("bnd,bd->bn", batch.xs_BxNxD, batch.ws_BxD)
  np.testing.assert_allclose(residual.std(), 0.1, rtol=0.02)
  noiseless = _batch(_task(n_dims=5, n_points=50), 8)
  np.testing.assert_allclose(noiseless.ys_BxN, np.einsum("bnd,bd->bn", noiseless.xs_BxNxD, noiseless.ws_BxD), atol=1e-5)


def test_truncated_dimensions_are_zero():
  task = _task(n_dims=20, n_points=41, kappa=10.0)
  xs = np.asarray(_batch(task, 4, n_dims=jnp.asarray(7)).xs_BxNxD)
  assert np.all(xs[:, :, 7:] == 0) and np.all(xs[:, :, :7] != 0)


@pytest.mark.parametrize(
  "step, expected",
  [
    (0, (5, 11)),
    (1999, (5, 11)),
    (2000, (6, 13)),
    (9999, (9, 19)),
    (29_999, (19, 39)),
    (30_000, (20, 41)),
    (10**6, (20, 41)),
  ],
)
def test_garg_curriculum(step, expected):
  sizes = data.curriculum(jnp.asarray(step), linreg.get_config().task)
  assert (int(sizes.n_dims), int(sizes.n_points)) == expected


def test_curriculum_off_gives_full_size():
  sizes = data.curriculum(jnp.asarray(0), _task())
  assert (int(sizes.n_dims), int(sizes.n_points)) == (20, 41)


@pytest.mark.parametrize("rotation", ["per_prompt", "per_batch"])
def test_device_slices_assemble_the_same_global_batch(rotation):
  task = _task(n_dims=4, n_points=6, kappa=10.0, rotation=rotation)
  key = data.step_key(jax.random.key(3), 17)
  whole = data.sample_batch(key, 0, 8, task, 4)
  slices = [data.sample_batch(key, 2 * i, 2, task, 4) for i in range(4)]
  for name in ("xs_BxNxD", "ys_BxN", "ws_BxD"):
    np.testing.assert_array_equal(np.concatenate([getattr(s, name) for s in slices]), getattr(whole, name))
  other_step = data.sample_batch(data.step_key(jax.random.key(3), 18), 0, 8, task, 4)
  assert not np.allclose(other_step.xs_BxNxD, whole.xs_BxNxD)


# Ahn et al.'s setting (configs/lsa.py).
def test_explicit_spectrum_per_run_rotation_and_inverse_covariance_w():
  task = helpers.ahn_task(n_points=4000)
  sigma = np.asarray(data.covariance_matrix(task), np.float64)
  u = np.asarray(data.run_rotation(task))
  np.testing.assert_allclose(u @ u.T, np.eye(5), atol=1e-5)
  np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(sigma)), np.sort(task.eigenvalues), rtol=1e-5, atol=1e-6)
  batches = [data.sample_batch(data.step_key(jax.random.key(0), s), 0, 8, task, 5) for s in (0, 7)]
  for batch in batches:  # Every prompt of every step has the run's covariance.
    xs = np.asarray(batch.xs_BxNxD, np.float64).reshape(-1, 5)
    np.testing.assert_allclose(xs.T @ xs / len(xs), sigma, atol=0.04)
  assert not np.allclose(batches[0].xs_BxNxD, batches[1].xs_BxNxD)
  ws = np.asarray(
    data.sample_batch(data.step_key(jax.random.key(1), 0), 0, 20_000, helpers.ahn_task(n_points=2), 5).ws_BxD,
    np.float64,
  )
  np.testing.assert_allclose(ws.T @ ws / len(ws), np.linalg.inv(sigma), atol=0.25, rtol=0.05)
  identity_ws = data.sample_batch(
    data.step_key(jax.random.key(1), 0), 0, 20_000, helpers.ahn_task(n_points=2, w_distribution="identity"), 5
  ).ws_BxD
  np.testing.assert_allclose(np.cov(np.asarray(identity_ws).T), np.eye(5), atol=0.05)
  # The eigenbasis follows rotation_seed (configs/lsa.py ties it to the run's seed).
  assert not np.allclose(data.run_rotation(helpers.ahn_task(rotation_seed=1)), u)
  config = lsa_config.get_config()
  config.seed = 5
  assert config.task.rotation_seed == 5


def test_default_sampler_is_unchanged():
  """The defaults (isotropic, and kappa > 1 per prompt) draw exactly what the sampler drew before these options."""
  for kappa in (1.0, 100.0):
    task = linreg.get_config().task
    task.update(n_dims=4, n_points=6, kappa=kappa)
    key = data.step_key(jax.random.key(3), 2)
    batch = data.sample_batch(key, 0, 3, task, 4)
    examples_key = jax.random.split(key)[1]
    for i in range(3):
      key_x, key_w, _, key_rot = jax.random.split(jax.random.fold_in(examples_key, i), 4)
      zs = jax.random.normal(key_x, (6, 4))
      if kappa != 1.0:
        zs = (zs * jnp.sqrt(data.covariance_spectrum(task))[None]) @ data.random_rotation(key_rot, 4).T
      w = jax.random.normal(key_w, (4,))
      np.testing.assert_array_equal(batch.xs_BxNxD[i], zs)
      np.testing.assert_array_equal(batch.ws_BxD[i], w)
      np.testing.assert_array_equal(batch.ys_BxN[i], zs @ w)
  assert data.data_step(17, linreg.get_config().task) == 17


def test_resample_every_keeps_one_batch_per_window():
  # Parameters barely move: equal losses mean equal batches.
  config = helpers.tiny_lsa_config(learning_rate=1e-12, steps_per_dispatch=7)
  config.task.resample_every = 3
  assert [int(data.data_step(s, config.task)) for s in range(7)] == [0, 0, 0, 1, 1, 1, 2]
  losses, _, _ = helpers.chunk_losses(config, 7)
  np.testing.assert_allclose(losses[0:3], losses[0], rtol=1e-6)
  np.testing.assert_allclose(losses[3:6], losses[3], rtol=1e-6)
  assert abs(losses[3] - losses[0]) > 1e-3 * losses[0] and abs(losses[6] - losses[3]) > 1e-3 * losses[3]
  # A constant curriculum disables the in-loop batch cache: the per-step sampler gives the same losses.
  config.task.curriculum.update(
    enabled=True, dims_start=5, points_start=8, dims_interval=1, points_interval=1, dims_increment=0, points_increment=0
  )
  np.testing.assert_array_equal(helpers.chunk_losses(config, 7)[0], losses)


TWO_DEVICE_SAMPLE = """
import sys
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from icl_jax import data
from icl_jax.runtime import config_files

task = config_files.load_file("configs/linreg_ill_conditioned.py").get_config("large").task
first = lambda: jax.lax.axis_index("batch") * 32
sample = lambda hyper: data.sample_batch(data.step_key(jax.random.key(0), 0), first(), 32, task, task.n_dims, hyper)
if sys.argv[1] == "alone":
  programme = lambda: sample(None).xs_BxNxD
else:  # Two models trained together (train.train_runs): kappa traced, 1 and 100.
  programme = lambda: jax.vmap(lambda k: sample(data.Hyper(k, 0.0)).xs_BxNxD, out_axes=1)(jnp.array([1.0, 100.0]))
mesh = jax.make_mesh((2,), ("batch",))
print(jax.block_until_ready(jax.jit(jax.shard_map(programme, mesh=mesh, in_specs=(), out_specs=P("batch")))()).shape)
"""


@pytest.mark.parametrize("models", ["alone", "vmapped"])
def test_per_prompt_eigenbases_on_two_cpu_devices_finish(models):
  """Two CPU devices sampling the large rung's kappa = 100 prompts at once, for one model or two vmapped. Drawn
  as one batched QR per device, jaxlib split each batch over XLA's intra-op threads and waited on one of them:
  on a 2-core CPU (two threads, as CI's) both waited and the program never finished. With more cores than
  devices it finishes either way."""
  env = {**helpers.subprocess_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  out = subprocess.run(
    [sys.executable, "-c", TWO_DEVICE_SAMPLE, models],
    cwd=helpers.REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  shape = ["(64,", "41,", "20)"] if models == "alone" else ["(64,", "2,", "41,", "20)"]
  assert out.returncode == 0 and out.stdout.split() == shape, out.stderr[-2000:]
