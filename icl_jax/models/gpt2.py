"""GPT-2 as Garg et al. 2022 use it for in-context regression (Hugging Face `GPT2Model` without `wte`).

Tokens interleave x_1, [y_1, 0, ..., 0], x_2, ...; a linear read-in maps them to the residual stream, learned
position embeddings are added, pre-LayerNorm blocks (causal softmax attention, tanh-GELU MLP) follow, then a
final LayerNorm and a linear read-out. The prediction for y_i is read at x_i's position, so it sees the i - 1
pairs before it. Parameter names follow Hugging Face's (`h_{i}/attn/c_attn`, `ln_f`, `wpe`, ...) so that a
released PyTorch checkpoint maps onto them one to one.

Mixed precision: `config.model.dtype` ("float32" or "bfloat16") is the dtype of the activations and of every
matmul's inputs. Parameters stay float32 (cast to the dtype where a matmul uses them); matmuls accumulate in
float32, and biases are added, softmax, LayerNorm (statistics and output), the read-out and so the predictions
and the loss are computed, in float32. Attention's q, k, v and head outputs change layout in float32 and are
cast at the batched matmuls.

Hidden states follow Hugging Face's convention: entry 0 is the embedding (read-in + positions), entry l for
1 <= l < L is the residual stream after block l *without* the final LayerNorm, and entry L is after it (the
read-out's input). Per-layer probes read these, so they need no second model.
"""

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections


def interleave(xs_BxNxD: jax.Array, ys_BxN: jax.Array) -> jax.Array:
  """Tokens x_1, [y_1, 0, ...], x_2, [y_2, 0, ...], ...: [B, 2N, D]."""
  b, n, d = xs_BxNxD.shape
  ys_BxNxD = jnp.zeros_like(xs_BxNxD).at[:, :, 0].set(ys_BxN)
  return jnp.stack([xs_BxNxD, ys_BxNxD], axis=2).reshape(b, 2 * n, d)


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _contract_last(a, b, dtype):
  """a [..., I] times b [I, O] from `dtype` inputs, accumulated and returned in float32."""
  return jax.lax.dot_general(
    a.astype(dtype), b.astype(dtype), (((a.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def mixed_matmul(x, kernel_IxO, dtype):
  """x [..., I] (in `dtype`) times kernel [I, O] (float32, cast to `dtype`), accumulated and returned in
  float32; the gradients are `dtype` matmuls with float32 results too (x's then cast to `dtype`).

  Why not JAX's own transpose: it would multiply the float32 cotangent by a `dtype` operand, which XLA runs as
  a float32 matmul. And why float32 results: XLA's CPU backend reaches its fast bfloat16 path only with
  float32 results (`python -m icl_jax.bench --benchmark=matmul` times both)."""
  return _contract_last(x, kernel_IxO, dtype)


def _mixed_matmul_fwd(x, kernel_IxO, dtype):
  kernel_IxO = kernel_IxO.astype(dtype)
  return _contract_last(x, kernel_IxO, dtype), (x, kernel_IxO)


def _mixed_matmul_bwd(dtype, residuals, g):
  x, kernel_IxO = residuals
  g = g.astype(dtype)
  batch = tuple(range(x.ndim - 1))
  dkernel_IxO = jax.lax.dot_general(x, g, ((batch, batch), ((), ())), preferred_element_type=jnp.float32)
  return _contract_last(g, kernel_IxO.T, dtype).astype(dtype), dkernel_IxO


mixed_matmul.defvjp(_mixed_matmul_fwd, _mixed_matmul_bwd)


class Dense(nn.Module):
  """nn.Dense with float32 parameters, its matmul from `dtype` inputs (`mixed_matmul` in bfloat16), its bias
  added in float32 and its output in `out_dtype` (default: `dtype`). The float32 bias makes the bias gradient
  a float32 sum over batch and positions: from a bfloat16 cotangent, XLA's CPU backend computes that sum by a
  windowed reduction that took a fifth of the small config's bfloat16 step (README, "Speed"). Parameter names
  and shapes are nn.Dense's."""

  features: int
  kernel_init: nn.initializers.Initializer
  bias_init: nn.initializers.Initializer = nn.initializers.zeros
  dtype: jnp.dtype = jnp.float32
  out_dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
    if self.dtype == jnp.float32:
      y = _contract_last(x, kernel, jnp.float32)
    else:
      y = mixed_matmul(x.astype(self.dtype), kernel, self.dtype)
    return (y + bias.reshape((1,) * (y.ndim - 1) + (-1,))).astype(self.out_dtype or self.dtype)


def _torch_linear(features: int, fan_in: int, name: str, dtype=jnp.float32) -> Dense:
  """A Dense layer with torch.nn.Linear's default U(+-1/sqrt(fan_in)) initialisation: Garg et al.'s read-in and
  read-out are nn.Linear."""
  bound = 1.0 / math.sqrt(fan_in)
  init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
  return Dense(features, kernel_init=init, bias_init=init, dtype=dtype, name=name)


class CausalSelfAttention(nn.Module):
  """Causal softmax attention over the prompt; query tokens (if any) each see the prompt's tokens before their
  prefix and themselves, and are seen by nothing."""

  num_heads: int
  init_std: float
  proj_std: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h_BxTxW, g_BxNxQxW=None, x_positions_only: bool = False):
    """With `x_positions_only`, only the x tokens (even positions) query: returns [B, ceil(T / 2), W]."""
    width = h_BxTxW.shape[-1]
    head_dim = width // self.num_heads
    dense = lambda features, std, name, out_dtype=None: Dense(
      features, kernel_init=nn.initializers.normal(std), dtype=self.dtype, out_dtype=out_dtype, name=name
    )
    # q, k, v and the heads' outputs change layout in float32 and meet the dtype only at the batched matmuls:
    # the same numbers as casting first, and XLA's CPU backend copies float32 faster than bfloat16.
    c_attn = dense(3 * width, self.init_std, "c_attn", out_dtype=jnp.float32)
    c_proj = dense(width, self.proj_std, "c_proj")
    cast = lambda *arrays: tuple(a.astype(self.dtype) for a in arrays)
    # Softmax in float32 (its exp and sum lose most of bfloat16's 8 bits), probabilities back to the dtype.
    softmax = lambda logits: jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    split_heads = lambda a: jnp.moveaxis(a.reshape(*a.shape[:-1], 3, self.num_heads, head_dim), -3, 0)
    scale = 1.0 / math.sqrt(head_dim)
    q_BxTxHxV, k_BxTxHxV, v_BxTxHxV = split_heads(c_attn(h_BxTxW))
    t = h_BxTxW.shape[1]
    step = 2 if x_positions_only else 1
    q_BxTxHxV = q_BxTxHxV[:, ::step]
    # Heads before positions for the two batched matmuls: batch axes first is the layout XLA's CPU batched
    # matmul runs fastest (`python -m icl_jax.bench --benchmark=train_step` compares layouts by their step time).
    q_BxHxTxV, k_BxHxTxV, v_BxHxTxV = cast(*(jnp.swapaxes(a, 1, 2) for a in (q_BxTxHxV, k_BxTxHxV, v_BxTxHxV)))
    logits_BxHxTxT = (q_BxHxTxV @ jnp.swapaxes(k_BxHxTxV, -1, -2)) * scale
    causal_TxT = jnp.arange(0, t, step)[:, None] >= jnp.arange(t)[None, :]
    probs_BxHxTxT = softmax(jnp.where(causal_TxT, logits_BxHxTxT.astype(jnp.float32), _MASKED))
    out_BxHxTxV = (probs_BxHxTxT @ v_BxHxTxV).astype(jnp.float32)
    out_BxTxW = jnp.swapaxes(out_BxHxTxV, 1, 2).reshape(*q_BxTxHxV.shape[:2], width)
    if g_BxNxQxW is None:
      return c_proj(out_BxTxW), None
    qg_BxNxQxHxV, kg_BxNxQxHxV, vg_BxNxQxHxV = cast(*split_heads(c_attn(g_BxNxQxW)))
    k_BxTxHxV, v_BxTxHxV = cast(k_BxTxHxV, v_BxTxHxV)
    n = g_BxNxQxW.shape[1]
    # The query of prefix n stands where x_n does: it sees the 2n tokens (x_0, y_0, ..., y_{n-1}) and itself.
    sees_NxT = jnp.arange(t)[None, :] < 2 * jnp.arange(n)[:, None]
    context_BxHxNxQxT = jnp.einsum("bnqhk,bshk->bhnqs", qg_BxNxQxHxV, k_BxTxHxV) * scale
    context_BxHxNxQxT = jnp.where(sees_NxT[:, None, :], context_BxHxNxQxT.astype(jnp.float32), _MASKED)
    self_BxHxNxQx1 = jnp.einsum("bnqhk,bnqhk->bhnq", qg_BxNxQxHxV, kg_BxNxQxHxV)[..., None] * scale
    probs_BxHxNxQxS = softmax(jnp.concatenate([context_BxHxNxQxT, self_BxHxNxQx1.astype(jnp.float32)], axis=-1))
    out_BxNxQxHxV = jnp.einsum("bhnqs,bshk->bnqhk", probs_BxHxNxQxS[..., :-1], v_BxTxHxV) + jnp.einsum(
      "bhnq,bnqhk->bnqhk", probs_BxHxNxQxS[..., -1], vg_BxNxQxHxV
    )
    return c_proj(out_BxTxW), c_proj(out_BxNxQxHxV.reshape(g_BxNxQxW.shape))


_MASKED = float(jnp.finfo(jnp.float32).min)


class MLP(nn.Module):
  hidden: int
  init_std: float
  proj_std: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h_BxTxW):
    width = h_BxTxW.shape[-1]
    h_BxTxF = Dense(self.hidden, kernel_init=nn.initializers.normal(self.init_std), dtype=self.dtype, name="c_fc")(
      h_BxTxW
    )
    h_BxTxF = nn.gelu(h_BxTxF, approximate=True)  # GPT-2's "gelu_new".
    return Dense(width, kernel_init=nn.initializers.normal(self.proj_std), dtype=self.dtype, name="c_proj")(h_BxTxF)


class Block(nn.Module):
  """A pre-LayerNorm block applied to the prompt's stream and, with the same weights, to the query stream."""

  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, h_BxTxW, g_BxNxQxW=None, x_positions_only: bool = False):
    c = self.config
    # GPT-2 scales the residual projections' initialisation by 1/sqrt(2 L): two per block add to the stream.
    proj_std = c.init_std / math.sqrt(2 * c.num_layers)
    dtype = DTYPES[c.dtype]
    ln_1, ln_2 = (_layer_norm(c, name) for name in ("ln_1", "ln_2"))
    mlp = MLP(c.mlp_ratio * c.width, c.init_std, proj_std, dtype, name="mlp")
    attn_h, attn_g = CausalSelfAttention(c.num_heads, c.init_std, proj_std, dtype, name="attn")(
      ln_1(h_BxTxW), None if g_BxNxQxW is None else ln_1(g_BxNxQxW), x_positions_only
    )
    h_BxTxW = h_BxTxW[:, :: 2 if x_positions_only else 1] + attn_h
    h_BxTxW = h_BxTxW + mlp(ln_2(h_BxTxW))
    if g_BxNxQxW is None:
      return h_BxTxW, None
    g_BxNxQxW = g_BxNxQxW + attn_g
    return h_BxTxW, g_BxNxQxW + mlp(ln_2(g_BxNxQxW))


def _layer_norm(c: ml_collections.ConfigDict, name: str) -> nn.LayerNorm:
  """LayerNorm in float32 (statistics and output) whatever the model's dtype; the next matmul casts."""
  return nn.LayerNorm(epsilon=c.layer_norm_epsilon, dtype=jnp.float32, name=name)


class QueryOutputs(NamedTuple):
  preds_BxN: jax.Array  # Predictions on the prompt, as without queries.
  hidden_Lx: jax.Array  # [L + 1, B, 2N, width]: the prompt's hidden states.
  query_preds_BxNxQ: jax.Array  # [B, N, Q]: prediction for query q given the points before prefix n.
  query_hidden_Lx: jax.Array  # [L + 1, B, N, Q, width]: the queries' hidden states, same convention.


class GPT2Regressor(nn.Module):
  """Predicts y_i from (x_1, y_1, ..., x_i) for every i at once.

  `__call__(xs [B, N, D], ys [B, N])` returns predictions [B, N]; with `return_hidden=True` it returns
  (predictions, hidden [L + 1, B, 2N, width]) with the Hugging Face convention of the module docstring.

  With `queries` [B, N, Q, D] it also predicts, for every prefix n, Q fresh queries from the n points before
  it (as if each stood in x_n's place), in one pass: returns `QueryOutputs`. This is what induced weights
  (Fu et al.'s SimW) need, without one forward pass per prefix and query.
  """

  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, xs_BxNxD, ys_BxN, return_hidden: bool = False, queries=None):
    c = self.config
    tokens_BxTxD = interleave(xs_BxNxD, ys_BxN)
    # Predictions alone (training's forward pass) need neither the last token, y_N, which no prediction sees,
    # nor the last block at the y positions: the same predictions with ~5-15% fewer FLOPs.
    predictions_only = queries is None and not return_hidden
    if predictions_only:
      tokens_BxTxD = tokens_BxTxD[:, :-1]
    t = tokens_BxTxD.shape[1]
    dtype = DTYPES[c.dtype]
    wpe_PxW = self.param("wpe", nn.initializers.normal(c.init_std), (c.n_positions, c.width)).astype(dtype)
    read_in = _torch_linear(c.width, tokens_BxTxD.shape[-1], "read_in", dtype)
    h_BxTxW = read_in(tokens_BxTxD) + wpe_PxW[None, :t]
    g_BxNxQxW = None if queries is None else read_in(queries.astype(dtype)) + wpe_PxW[:t:2][None, :, None]
    hidden, query_hidden = [h_BxTxW], [g_BxNxQxW]
    for layer in range(c.num_layers):
      x_positions_only = predictions_only and layer == c.num_layers - 1
      h_BxTxW, g_BxNxQxW = Block(c, name=f"h_{layer}")(h_BxTxW, g_BxNxQxW, x_positions_only)
      hidden.append(h_BxTxW)
      query_hidden.append(g_BxNxQxW)
    ln_f = _layer_norm(c, "ln_f")
    read_out = _torch_linear(1, c.width, "read_out")  # float32: the predictions and the loss.
    if predictions_only:
      return read_out(ln_f(h_BxTxW))[..., 0]
    hidden[-1] = ln_f(h_BxTxW)
    preds_BxN = read_out(hidden[-1])[:, ::2, 0]
    if queries is not None:
      query_hidden[-1] = ln_f(g_BxNxQxW)
      return QueryOutputs(preds_BxN, jnp.stack(hidden), read_out(query_hidden[-1])[..., 0], jnp.stack(query_hidden))
    if return_hidden:
      return preds_BxN, jnp.stack(hidden)
    return preds_BxN


def validate(model: ml_collections.ConfigDict, task: ml_collections.ConfigDict) -> list[str]:
  """Errors in config.model for this family, each naming its field and the allowed values."""
  errors = []
  for field in ("num_layers", "num_heads", "width", "mlp_ratio", "n_positions"):
    value = model.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      errors.append(f"config.model.{field} = {value!r}: must be an integer >= 1")
  if not errors and model.width % model.num_heads:
    errors.append(
      f"config.model.num_heads = {model.num_heads} does not divide config.model.width = "
      f"{model.width}: allowed num_heads are the divisors of width"
    )
  if not errors and 2 * task.n_points > model.n_positions:
    errors.append(
      f"config.task.n_points = {task.n_points} needs 2 * n_points = {2 * task.n_points} positions but "
      f"config.model.n_positions = {model.n_positions}: allowed n_points <= {model.n_positions // 2}"
    )
  if not (isinstance(model.layer_norm_epsilon, float) and model.layer_norm_epsilon > 0):
    errors.append(f"config.model.layer_norm_epsilon = {model.layer_norm_epsilon!r}: must be a float > 0")
  if not (isinstance(model.init_std, float) and model.init_std > 0):
    errors.append(f"config.model.init_std = {model.init_std!r}: must be a float > 0")
  if model.get("dtype") not in DTYPES:
    errors.append(f"config.model.dtype = {model.get('dtype')!r}: allowed {', '.join(map(repr, DTYPES))}")
  return errors
