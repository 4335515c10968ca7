"""Ahn et al. 2023's linear self-attention (LSA), with the project's interface (README, "Other model families").

Z_0 = [x_1 ... x_n x_query; y_1 ... y_n 0] ((d + 1) x (n + 1), a token is a column) and each of the L layers
adds Z_{l+1} = Z_l + (1/n) P_l Z_l M (Z_l^T Q_l Z_l), M = diag(I_n, 0) (the query's unknown label never feeds
back); the prediction is -[Z_L]_{d+1,n+1}. The conventions are those of `analysis.constructions.lsa_forward`.

Parameters: per layer the d x d matrices `A` and `B` of Ahn et al.'s code (allparam[l, 0, 1] and [l, 0, 0]),
embedded as P_l = [B_l 0; 0 1] and Q_l = [A_l^T 0; 0 0] (the code keeps tokens as rows, so its Q is the
transpose). `model.lsa_sparse=True` (their Theorem 3's form) has P_l = [0 0; 0 1] and only A trained; layer l
is then the step w <- w - (-A_l) grad R(w) of preconditioned GD. Entries start N(0, lsa_init_std^2) (the code's
`normal_(0, 1e-4)` takes 1e-4 as the standard deviation).

Interface: position t of `apply(..., xs [B, N, D], ys [B, N])` -> [B, N] is the LSA on the prefix of t context
points with x_t as the query (1/n is 1/t; t = 0 predicts 0), all prefixes at once, vmapped over t with masks.
`position=t` computes prefix t only ([B]; the last-position loss uses it via `predicts_one_position`).
`return_hidden=True` also returns hidden [L + 1, B, N, D + 1, N], Z_l of every prefix, which the per-layer
probes do not apply to: this family is evaluated by `analysis.lsa_analysis`. `prefix_forward` computes the
layers in blocks, O(d N) per layer and prefix in the sparse form (O(d^2 N) in the full form).
"""

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections


class LSALayer(nn.Module):
  """One layer's parameters: (A, B), d x d each, B None in the sparse form (see the module docstring)."""

  sparse: bool
  init_std: float

  @nn.compact
  def __call__(self, d: int, dtype=jnp.float32) -> tuple[jax.Array, jax.Array | None]:
    init = nn.initializers.normal(self.init_std)
    a_DxD = self.param("A", init, (d, d), dtype)
    return a_DxD, None if self.sparse else self.param("B", init, (d, d), dtype)


def prefix_forward(
  xs_BxDxN: jax.Array, ys_BxN: jax.Array, t: jax.Array, layers: list[tuple[jax.Array, jax.Array | None]]
) -> tuple[jax.Array, list[jax.Array]]:
  """The LSA on prefix t of every prompt: the prediction -[Z_L]_{d+1,t} [B] and Z_0..Z_L, [B, D + 1, N] each.

  Z_0 keeps columns 0..t (context and query), with the query's label zeroed, and zeroes the later ones; the
  values and keys are the t context columns, and the scale is 1/t (1 at t = 0, where nothing is added).

  Computed in blocks, which P = [B 0; 0 1] and Q = [A^T 0; 0 0] allow: with X the x rows, y the label row and
  a subscript c for the context columns, Z^T Q Z = X^T A^T X and P Z M = [B X_c; y_c], so a layer adds
  (1/t) B (X_c X_c^T) A^T X to X and (1/t) (A X_c y_c)^T X to y. This equals the general formula
  (`constructions.lsa_forward`, tests/models/test_lsa.py) and costs O(d N) per prefix in the sparse form (X never
  changes) instead of O(d^2 N).
  """
  n = xs_BxDxN.shape[-1]
  columns_N = jnp.arange(n)
  context_N = (columns_N < t).astype(xs_BxDxN.dtype)
  x_BxDxN = xs_BxDxN * (columns_N <= t).astype(xs_BxDxN.dtype)[None, None]
  y_BxN = ys_BxN * context_N[None]
  scale = 1.0 / jnp.maximum(t, 1).astype(xs_BxDxN.dtype)
  stack = lambda x_BxDxN, y_BxN: jnp.concatenate([x_BxDxN, y_BxN[:, None]], axis=1)
  zs = [stack(x_BxDxN, y_BxN)]
  for a_DxD, b_DxD in layers:
    xc_BxDxN = x_BxDxN * context_N[None, None]
    u_BxD = jnp.einsum("bdn,bn->bd", xc_BxDxN, y_BxN) @ a_DxD.T  # A X_c y_c.
    new_y_BxN = y_BxN + jnp.einsum("bd,bdn->bn", u_BxD, x_BxDxN) * scale
    if b_DxD is not None:
      s_BxDxD = jnp.einsum("bdn,ben->bde", xc_BxDxN, x_BxDxN)  # X_c X_c^T.
      m_BxDxD = jnp.einsum("de,bef->bdf", b_DxD, s_BxDxD) @ a_DxD.T
      x_BxDxN = x_BxDxN + jnp.einsum("bdf,bfn->bdn", m_BxDxD, x_BxDxN) * scale
    y_BxN = new_y_BxN
    zs.append(stack(x_BxDxN, y_BxN))
  pred_B = -jax.lax.dynamic_index_in_dim(y_BxN, t, axis=1, keepdims=False)
  return pred_B, zs


class LSARegressor(nn.Module):
  """Ahn et al.'s L-layer linear self-attention, predicting y_t from the t points before it for every t.

  `__call__(xs [B, N, D], ys [B, N])` -> predictions [B, N]; `return_hidden=True` -> (predictions, hidden
  [L + 1, B, N, D + 1, N]); `position=t` -> the predictions of prefix t only, [B]. See the module docstring.
  """

  config: ml_collections.ConfigDict
  predicts_one_position: ClassVar[bool] = True  # `position=` is supported (train_step.last_position_loss).

  @nn.compact
  def __call__(self, xs_BxNxD, ys_BxN, return_hidden: bool = False, position=None):
    c = self.config
    d = xs_BxNxD.shape[-1]
    layers = [
      LSALayer(bool(c.lsa_sparse), c.lsa_init_std, name=f"layer_{i}")(d, xs_BxNxD.dtype) for i in range(c.num_layers)
    ]
    xs_BxDxN = jnp.swapaxes(xs_BxNxD, 1, 2)
    if position is not None:
      return prefix_forward(xs_BxDxN, ys_BxN, jnp.asarray(position, jnp.int32), layers)[0]
    preds_TxB, zs = jax.vmap(lambda t: prefix_forward(xs_BxDxN, ys_BxN, t, layers))(jnp.arange(xs_BxNxD.shape[1]))
    preds_BxN = preds_TxB.T
    if return_hidden:  # zs: L + 1 arrays [T, B, E, N].
      return preds_BxN, jnp.swapaxes(jnp.stack(zs), 1, 2)
    return preds_BxN


def matrices(params: dict) -> tuple[list[jax.Array], list[jax.Array]]:
  """Every layer's (P_l, Q_l), paper column convention, from the parameters of an `LSARegressor`."""
  ps, qs = [], []
  for i in range(len(params)):
    layer = params[f"layer_{i}"]
    d = layer["A"].shape[0]
    q = jnp.zeros((d + 1, d + 1), layer["A"].dtype).at[:d, :d].set(layer["A"].T)
    p = jnp.zeros((d + 1, d + 1), layer["A"].dtype).at[d, d].set(1)
    if "B" in layer:
      p = p.at[:d, :d].set(layer["B"])
    ps.append(p)
    qs.append(q)
  return ps, qs


def params_from_preconditioners(preconditioners: list[jax.Array]) -> dict:
  """Sparse-form parameters whose layer l is the step w <- w - G_l grad R(w): A_l = -G_l (see the module
  docstring; equal to `constructions.preconditioned_gd_lsa_weights`)."""
  return {f"layer_{i}": {"A": -jnp.asarray(g)} for i, g in enumerate(preconditioners)}


def validate(model: ml_collections.ConfigDict, task: ml_collections.ConfigDict) -> list[str]:
  """Errors in config.model for this family, each naming its field and the allowed values. The LSA reads only
  num_layers, lsa_sparse and lsa_init_std; any prompt length works (no position table)."""
  del task
  errors = []
  value = model.get("num_layers")
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    errors.append(f"config.model.num_layers = {value!r}: must be an integer >= 1")
  if model.get("lsa_sparse") not in (True, False):
    errors.append(
      f"config.model.lsa_sparse = {model.get('lsa_sparse')!r}: allowed values are True (Ahn et al.'s "
      "sparse form, eq. 8), False (the full form, eq. 11)"
    )
  std = model.get("lsa_init_std")
  if not (isinstance(std, (int, float)) and not isinstance(std, bool) and std >= 0):
    errors.append(f"config.model.lsa_init_std = {std!r}: must be a number >= 0")
  if model.get("dtype", "float32") != "float32":
    errors.append(
      f"config.model.dtype = {model.get('dtype')!r}: the lsa family runs in float32 only; allowed 'float32'"
    )
  return errors
