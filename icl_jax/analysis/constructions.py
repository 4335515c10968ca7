"""Explicit transformer weights that run the reference algorithms exactly (README, "Constructions").

Conventions: B prompts, n context points, D dimensions, T = n + 1 tokens (the n points and one query), R rows
of the residual stream, H heads, A query/key width, F MLP width, E = D + 1 rows of Ahn et al.'s Z. A token is a
column, as in the papers.

1. Iterative Newton (Fu et al. 2024, Theorem 5.1). `transformer_forward` runs blocks of multi-head attention
   over all tokens with the activation ReLU(.)/T, then a ReLU MLP, both residual:
   h_j <- h_j + sum_heads sum_i V h_i ReLU((K h_i) . (Q h_j)) / T,  then  h <- h + W_out ReLU(W_in h).
   `newton_construction(d, n, k, alpha)` gives k Newton steps in k + 3 such blocks. Token i holds the rows
   x (d) | y (1) | x_query (d) | t (d) | w (d) | prediction (1) | one (1), and the rows t carry M_k x_i.
   Layer 1 sets t_i = alpha S x_i = M_0 x_i; each Newton layer's attention subtracts (1/2) M S M x_i and its MLP
   doubles t, giving M_{k+1} x_i; then w = M_k X^T y on every token, and the prediction x_query . w.
   Every attention layer has two heads with V_2 = -V_1, so that ReLU(a) - ReLU(-a) = a is one exact product.
2. Preconditioned GD by linear self-attention (von Oswald et al. 2023; Ahn et al. 2023, Lemma 1):
   `lsa_forward` runs Z_{l+1} = Z_l + (1/n) P_l Z_l M (Z_l^T Q_l Z_l), M = diag(I_n, 0), and
   `preconditioned_gd_lsa_weights` gives P_l = [0 0; 0 1], Q_l = -[A_l^T 0; 0 0]: L steps w <- w - A_l grad R(w)
   with R(w) = (1/2n) sum_i (w . x_i - y_i)^2, read out as -[Z_L]_{d+1,n+1} = +x_query . w_L.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Block(NamedTuple):
  """Weights of one transformer block (see the module docstring): H heads of ReLU attention, then an MLP."""

  query_HxAxR: jax.Array
  key_HxAxR: jax.Array
  value_HxRxR: jax.Array
  mlp_in_FxR: jax.Array
  mlp_out_RxF: jax.Array


def transformer_forward(h_RxT: jax.Array, layers: list[Block]) -> jax.Array:
  """The residual stream after every block of `layers`, for one prompt's tokens h [R, T]: [R, T]."""
  num_tokens = h_RxT.shape[1]
  for layer in layers:
    queries_HxAxT = layer.query_HxAxR @ h_RxT
    keys_HxAxT = layer.key_HxAxR @ h_RxT
    # [h, i, j]: how much token j reads from token i; every token reads every token.
    scores_HxTxT = jax.nn.relu(jnp.einsum("hai,haj->hij", keys_HxAxT, queries_HxAxT)) / num_tokens
    values_HxRxT = layer.value_HxRxR @ h_RxT
    h_RxT = h_RxT + jnp.einsum("hri,hij->rj", values_HxRxT, scores_HxTxT)
    h_RxT = h_RxT + layer.mlp_out_RxF @ jax.nn.relu(layer.mlp_in_FxR @ h_RxT)
  return h_RxT


# ---------------------------------------------------------------------------------------------------------------
# Iterative Newton.


def newton_width(d: int) -> int:
  """R, the rows of the residual stream of the Newton construction: 4 d + 3."""
  return 4 * d + 3


def _newton_rows(d: int) -> dict[str, slice]:
  return {
    "x": slice(0, d),
    "y": slice(d, d + 1),
    "x_query": slice(d + 1, 2 * d + 1),
    "t": slice(2 * d + 1, 3 * d + 1),
    "w": slice(3 * d + 1, 4 * d + 1),
    "prediction": slice(4 * d + 1, 4 * d + 2),
    "one": slice(4 * d + 2, 4 * d + 3),
  }


def _product_heads(query_AxR: jax.Array, key_AxR: jax.Array, value_RxR: jax.Array) -> tuple[jax.Array, ...]:
  """Query, key and value weights of two heads whose sum gives token j value h_i (key h_i . query h_j) / T.

  ReLU(a) v - ReLU(-a) v = a v, so the second head negates both the score and the value. Negating only the
  score (Fu et al.'s V_1 = V_2) would give |a| v.
  """
  return jnp.stack([query_AxR, -query_AxR]), jnp.stack([key_AxR, key_AxR]), jnp.stack([value_RxR, -value_RxR])


def newton_construction(d: int, n: int, num_steps: int, alpha: jax.Array) -> list[Block]:
  """Blocks that compute num_steps Newton steps from M_0 = alpha S and read out w_k and x_query . w_k for
  prompts of n points in d dimensions (the activation divides by T = n + 1 tokens): num_steps + 3 blocks.

  alpha may be traced, e.g. vmapped over prompts; d, n and num_steps fix the shapes.
  """
  rows = _newton_rows(d)
  num_tokens = n + 1
  identity_RxR = jnp.eye(newton_width(d))
  pick = lambda block: identity_RxR[rows[block]]  # [rows in block, R]: reads a block from the stream.
  no_mlp = (jnp.zeros((0, newton_width(d))), jnp.zeros((newton_width(d), 0)))

  initialise = Block(*_product_heads(alpha * num_tokens * pick("x"), pick("x"), pick("t").T @ pick("x")), *no_mlp)
  # The -1/2 leaves t - M S M x / 2 after the attention, so the MLP's t -> 2 t lands on 2 M x - M S M x.
  newton_step = Block(
    *_product_heads(-num_tokens / 2 * pick("x"), pick("t"), pick("t").T @ pick("t")),
    jnp.concatenate([pick("t"), -pick("t")]),
    jnp.concatenate([pick("t").T, -pick("t").T], 1),
  )
  read_weights = Block(*_product_heads(num_tokens * pick("one"), pick("y"), pick("w").T @ pick("t")), *no_mlp)
  # The value is the row one on all T tokens, so the 1/T of the activation is the mean of T equal terms.
  predict = Block(*_product_heads(pick("x_query"), pick("w"), pick("prediction").T @ pick("one")), *no_mlp)
  return [initialise] + [newton_step] * num_steps + [read_weights, predict]


def newton_prompt(xs_NxD: jax.Array, ys_N: jax.Array, x_query_D: jax.Array) -> jax.Array:
  """One prompt's tokens for `newton_construction`: the n points' columns, then the query's, [R, n + 1]."""
  n, d = xs_NxD.shape
  rows = _newton_rows(d)
  h_RxT = jnp.zeros((newton_width(d), n + 1), xs_NxD.dtype)
  h_RxT = h_RxT.at[rows["x"], :n].set(xs_NxD.T).at[rows["y"], :n].set(ys_N[None])
  return h_RxT.at[rows["x_query"], n].set(x_query_D).at[rows["one"]].set(1)


def newton_readout(h_RxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """w_k [D] and the prediction x_query . w_k [] from the query token of the final stream."""
  rows = _newton_rows((h_RxT.shape[0] - 3) // 4)
  return h_RxT[rows["w"], -1], h_RxT[rows["prediction"], -1][0]


def newton_transformer(xs: jax.Array, ys: jax.Array, x_query: jax.Array, num_steps: int) -> tuple[jax.Array, jax.Array]:
  """The Newton construction run on each prompt with alpha = 1 / ||S S^T||_F (Fu et al.'s code, the default
  of algorithms.iterative_newton): w_k [B, D] and the prediction x_query . w_k [B].

  Not jitted: a demonstration runs each num_steps once, and compiling every depth costs more than running it.

  Args:
    xs: [B, n, D].
    ys: [B, n].
    x_query: [B, D].
    num_steps: k, the number of Newton steps (k + 3 layers).
  """
  _, n, d = xs.shape
  s_BxDxD = jnp.einsum("bni,bnj->bij", xs, xs)
  alpha_B = 1 / jnp.linalg.norm(s_BxDxD @ s_BxDxD, axis=(-2, -1))

  def run(xs_NxD, ys_N, x_query_D, alpha):
    h_RxT = newton_prompt(xs_NxD, ys_N, x_query_D)
    return newton_readout(transformer_forward(h_RxT, newton_construction(d, n, num_steps, alpha)))

  return jax.vmap(run)(xs, ys, x_query, alpha_B)


# ---------------------------------------------------------------------------------------------------------------
# Linear self-attention (Ahn et al.'s notation).


def lsa_prompt(xs: jax.Array, ys: jax.Array, x_query: jax.Array) -> jax.Array:
  """Z_0 = [x_1 ... x_n x_query; y_1 ... y_n 0]: [B, D + 1, n + 1] from xs [B, n, D], ys [B, n], x_query [B, D]."""
  xs_BxTxD = jnp.concatenate([xs, x_query[:, None]], axis=1)
  ys_BxT = jnp.concatenate([ys, jnp.zeros_like(ys[:, :1])], axis=1)
  return jnp.concatenate([jnp.swapaxes(xs_BxTxD, 1, 2), ys_BxT[:, None]], axis=1)


def lsa_forward(z: jax.Array, ps: list[jax.Array], qs: list[jax.Array]) -> jax.Array:
  """Z_L of Z_{l+1} = Z_l + (1/n) P_l Z_l M (Z_l^T Q_l Z_l), M = diag(I_n, 0): [B, D + 1, n + 1].

  Args:
    z: Z_0, [B, D + 1, n + 1].
    ps, qs: P_l and Q_l, [D + 1, D + 1] each, one pair per layer.
  """
  z_BxExT = z
  n = z_BxExT.shape[-1] - 1
  # The mask keeps the query's column out of the values, so its unknown label cannot feed back.
  mask_T = jnp.ones(n + 1, z_BxExT.dtype).at[n].set(0)
  for p_ExE, q_ExE in zip(ps, qs, strict=True):
    scores_BxTxT = jnp.swapaxes(z_BxExT, 1, 2) @ q_ExE @ z_BxExT
    z_BxExT = z_BxExT + p_ExE @ (z_BxExT * mask_T[None, None]) @ scores_BxTxT / n
  return z_BxExT


def lsa_prediction(z: jax.Array) -> jax.Array:
  """Ahn et al.'s read-out -[Z_L]_{d+1,n+1}: [B]. Equals +x_query . w_L for `preconditioned_gd_lsa_weights`."""
  return -z[:, -1, -1]


def preconditioned_gd_lsa_weights(preconditioners: list[jax.Array]) -> tuple[list[jax.Array], list[jax.Array]]:
  """Ahn et al.'s sparse weights P_l = [0 0; 0 1], Q_l = -[A_l^T 0; 0 0] for the steps w <- w - A_l grad R(w):
  (ps, qs), lists of [D + 1, D + 1] matrices, from the A_l [D, D]."""
  ps, qs = [], []
  for a_DxD in preconditioners:
    d = a_DxD.shape[0]
    ps.append(jnp.zeros((d + 1, d + 1), a_DxD.dtype).at[d, d].set(1))
    qs.append(jnp.zeros((d + 1, d + 1), a_DxD.dtype).at[:d, :d].set(-a_DxD.T))
  return ps, qs
