"""`linreg_eval`: frozen evaluation prompts for in-context linear regression (icl_jax), one config per setting.

Prompts made by JAX's PRNG may change between JAX versions; published numbers are measured on this set
instead. Each setting has one split, "test", of 1280 prompts (Garg et al.'s evaluation size), each with
d = 20, n = 41 points, w ~ N(0, I_d) and y = w.x + noise_std * eps:

  isotropic  x ~ N(0, I), noise_std = 0 (seed 1)
  kappa100   x ~ N(0, U diag(lambda) U^T), noise_std = 0 (seed 2)
  noisy      x ~ N(0, I), noise_std = 0.1 (seed 3)

kappa100 is icl_jax.data's kappa = 100 with spectrum "two_level", normalize_trace and rotation "per_prompt":
d // 2 eigenvalues at 100 c and the rest at c, with c such that trace = d, and a fresh Haar rotation U for
every prompt. Each setting's kappa and noise_std, and these choices, are in its metadata.json.

Generation is plain numpy: prompt i of a setting depends only on (seed, i), through
`np.random.default_rng([seed, i])`. Sums are written out in a fixed order rather than left to BLAS or LAPACK,
whose kernels may add in another order on another machine, so a rebuild gives the same bits wherever numpy
draws the same normals. TFDS stores records in a hash-shuffled order and its files are not byte-reproducible,
so every record carries its `index`, and a set is identified by `content_hash` of the decoded arrays in
index order: recorded in metadata.json ("content_sha256") at build time, and published for each version in
PUBLISHED_SHA256 of icl_jax/datasets/linreg_eval/linreg_eval_dataset_builder.py.
"""

import dataclasses
import hashlib

import numpy as np
import tensorflow_datasets as tfds

SPLIT = "test"

# content_hash of each published setting, by version: a build or a copy that decodes to anything else is
# not the published set.
PUBLISHED_SHA256 = {
  "1.0.0": {
    "isotropic": "0b1c3c1e58e8dc552d9c6a532a432a26a9f96989d903a9e78c59027176545b2a",
    "kappa100": "860f5a53ea4408fceb87b3a9c907e00a4d096d1e84280c825668ea3d7ee7dfda",
    "noisy": "5bdcceebfd678a882d95a3b06e63830edd307cfb1cde5c315a00f864d2a45336",
  },
}


@dataclasses.dataclass(eq=False)
class SettingConfig(tfds.core.BuilderConfig):
  """One evaluation setting: the prompt distribution and the seed it is drawn with."""

  n_dims: int = 20
  n_points: int = 41
  kappa: float = 1.0  # Condition number of Cov(x), two-level spectrum with trace d; 1 is x ~ N(0, I).
  noise_std: float = 0.0
  seed: int = 0
  num_prompts: int = 1280


def content_hash(xs_BxNxD: np.ndarray, ys_BxN: np.ndarray, ws_BxD: np.ndarray) -> str:
  """sha256 of the little-endian float32 bytes of xs, then ys, then ws, prompts in index order."""
  digest = hashlib.sha256()
  for array in (xs_BxNxD, ys_BxN, ws_BxD):
    digest.update(np.ascontiguousarray(array, dtype="<f4").tobytes())
  return digest.hexdigest()


def _dot(a_BxK: np.ndarray, b_BxK: np.ndarray) -> np.ndarray:
  """Sum over the last axis of a * b, added in index order on every machine."""
  total_B = a_BxK[..., 0] * b_BxK[..., 0]
  for k in range(1, a_BxK.shape[-1]):
    total_B = total_B + a_BxK[..., k] * b_BxK[..., k]
  return total_B


def haar_rotations(gaussian_BxDxD: np.ndarray) -> np.ndarray:
  """Q of the QR decomposition of each matrix with diag(R) > 0, by modified Gram-Schmidt on the columns.

  Of a Gaussian matrix this Q is Haar-distributed, and it is icl_jax.data.random_rotation's (whose sign fix
  makes diag(R) > 0); Gram-Schmidt here because LAPACK's QR is not bit-reproducible across machines.
  """
  columns = []
  for j in range(gaussian_BxDxD.shape[-1]):
    v_BxD = gaussian_BxDxD[:, :, j]
    for q_BxD in columns:
      v_BxD = v_BxD - _dot(q_BxD, v_BxD)[:, None] * q_BxD
    columns.append(v_BxD / np.sqrt(_dot(v_BxD, v_BxD))[:, None])
  return np.stack(columns, axis=-1)


def two_level_spectrum(n_dims: int, kappa: float) -> np.ndarray:
  """icl_jax.data.covariance_spectrum for "two_level" with normalize_trace: d // 2 eigenvalues at kappa c,
  the rest at c, summing to d."""
  eig_D = np.where(np.arange(n_dims) < n_dims // 2, kappa, 1.0)
  return eig_D * (n_dims / np.sum(eig_D))


def generate(setting: SettingConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The setting's prompts in index order: xs [B, N, D], ys [B, N], ws [B, D], float32."""
  b, n, d = setting.num_prompts, setting.n_points, setting.n_dims
  rngs = [np.random.default_rng([setting.seed, i]) for i in range(b)]
  zs_BxNxD = np.stack([rng.standard_normal((n, d)) for rng in rngs])
  ws_BxD = np.stack([rng.standard_normal(d) for rng in rngs]).astype(np.float32)
  xs_BxNxD = zs_BxNxD
  if setting.kappa != 1.0:
    rotations_BxDxD = haar_rotations(np.stack([rng.standard_normal((d, d)) for rng in rngs]))
    # x = U diag(sqrt(lambda)) z has covariance U diag(lambda) U^T.
    scaled_BxNxD = zs_BxNxD * np.sqrt(two_level_spectrum(d, setting.kappa))
    xs_BxNxD = np.zeros_like(zs_BxNxD)
    for k in range(d):
      xs_BxNxD = xs_BxNxD + scaled_BxNxD[:, :, k, None] * rotations_BxDxD[:, None, :, k]
  xs_BxNxD = xs_BxNxD.astype(np.float32)
  # y from the stored (float32) x and w, rounded once: a reader finds y = w.x to float32 precision.
  ys_BxN = _dot(xs_BxNxD.astype(np.float64), ws_BxD.astype(np.float64)[:, None, :])
  if setting.noise_std:
    ys_BxN = ys_BxN + setting.noise_std * np.stack([rng.standard_normal(n) for rng in rngs])
  return xs_BxNxD, ys_BxN.astype(np.float32), ws_BxD


class Builder(tfds.core.GeneratorBasedBuilder):
  """Frozen evaluation prompts for in-context linear regression (icl_jax)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Settings isotropic, kappa100 and noisy; 1280 prompts each, d = 20, n = 41."}
  BUILDER_CONFIGS = [
    SettingConfig(name="isotropic", description="x ~ N(0, I), no noise.", seed=1),
    SettingConfig(
      name="kappa100",
      description="Cov(x) of condition number 100 (two-level, trace d), a fresh "
      "random eigenbasis per prompt; no noise.",
      kappa=100.0,
      seed=2,
    ),
    SettingConfig(name="noisy", description="x ~ N(0, I), y = w.x + 0.1 eps.", noise_std=0.1, seed=3),
  ]

  def __init__(self, *, file_format="array_record", **kwargs):
    # ArrayRecord is what tfds.data_source reads, without TensorFlow; TFDS's default, TFRecord, needs it.
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    setting = self.builder_config
    n, d = setting.n_points, setting.n_dims
    return self.dataset_info_from_configs(
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "xs": tfds.features.Tensor(shape=(n, d), dtype=np.float32),
          "ys": tfds.features.Tensor(shape=(n,), dtype=np.float32),
          "w": tfds.features.Tensor(shape=(d,), dtype=np.float32),
          "index": tfds.features.Scalar(dtype=np.int64),
        }
      ),
      metadata=tfds.core.MetadataDict(
        n_dims=d,
        n_points=n,
        kappa=setting.kappa,
        noise_std=setting.noise_std,
        seed=setting.seed,
        spectrum="two_level",
        normalize_trace=True,
        rotation="per_prompt",
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    arrays = generate(self.builder_config)
    self.info.metadata["content_sha256"] = content_hash(*arrays)
    return {SPLIT: self._generate_examples(*arrays)}

  def _generate_examples(self, xs_BxNxD, ys_BxN, ws_BxD):
    for i in range(len(ws_BxD)):
      yield i, {"xs": xs_BxNxD[i], "ys": ys_BxN[i], "w": ws_BxD[i], "index": i}
