"""GPT-2 as Garg et al. 2022 use it for in-context regression (Hugging Face `GPT2Model` without `wte`).

Tokens interleave x_1, [y_1, 0, ..., 0], x_2, ...; a linear read-in maps them to the residual stream, learned
position embeddings are added, pre-LayerNorm blocks (causal softmax attention, tanh-GELU MLP) follow, then a
final LayerNorm and a linear read-out. The prediction for y_i is read at x_i's position, so it sees the i - 1
pairs before it. Parameter names follow Hugging Face's (`h_{i}/attn/c_attn`, `ln_f`, `wpe`, ...) so that a
released PyTorch checkpoint maps onto them one to one.

Hidden states follow Hugging Face's convention: entry 0 is the embedding (read-in + positions), entry l for
1 <= l < L is the residual stream after block l *without* the final LayerNorm, and entry L is after it (the
read-out's input). Per-layer probes read these, so they need no second model.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections


def interleave(xs_BxNxD: jax.Array, ys_BxN: jax.Array) -> jax.Array:
  """Tokens x_1, [y_1, 0, ...], x_2, [y_2, 0, ...], ...: [B, 2N, D]."""
  b, n, d = xs_BxNxD.shape
  ys_BxNxD = jnp.zeros_like(xs_BxNxD).at[:, :, 0].set(ys_BxN)
  return jnp.stack([xs_BxNxD, ys_BxNxD], axis=2).reshape(b, 2 * n, d)


def _torch_linear(features: int, fan_in: int, name: str) -> nn.Dense:
  """A Dense layer with torch.nn.Linear's default U(+-1/sqrt(fan_in)) initialisation: Garg et al.'s read-in and
  read-out are nn.Linear."""
  bound = 1.0 / math.sqrt(fan_in)
  init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
  return nn.Dense(features, kernel_init=init, bias_init=init, name=name)


class CausalSelfAttention(nn.Module):
  num_heads: int
  init_std: float
  proj_std: float

  @nn.compact
  def __call__(self, h_BxTxD):
    b, t, width = h_BxTxD.shape
    head_dim = width // self.num_heads
    qkv_BxTx3D = nn.Dense(3 * width, kernel_init=nn.initializers.normal(self.init_std), name="c_attn")(h_BxTxD)
    q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = jnp.split(qkv_BxTx3D.reshape(b, t, 3, self.num_heads, head_dim), 3, axis=2)
    q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = (a[:, :, 0] for a in (q_BxTxHxK, k_BxTxHxK, v_BxTxHxK))
    logits_BxHxTxT = jnp.einsum("bqhk,bshk->bhqs", q_BxTxHxK, k_BxTxHxK) / math.sqrt(head_dim)
    causal_TxT = jnp.tril(jnp.ones((t, t), dtype=bool))
    logits_BxHxTxT = jnp.where(causal_TxT, logits_BxHxTxT, jnp.finfo(logits_BxHxTxT.dtype).min)
    probs_BxHxTxT = jax.nn.softmax(logits_BxHxTxT, axis=-1)
    out_BxTxD = jnp.einsum("bhqs,bshk->bqhk", probs_BxHxTxT, v_BxTxHxK).reshape(b, t, width)
    return nn.Dense(width, kernel_init=nn.initializers.normal(self.proj_std), name="c_proj")(out_BxTxD)


class MLP(nn.Module):
  hidden: int
  init_std: float
  proj_std: float

  @nn.compact
  def __call__(self, h_BxTxD):
    width = h_BxTxD.shape[-1]
    h_BxTxF = nn.Dense(self.hidden, kernel_init=nn.initializers.normal(self.init_std), name="c_fc")(h_BxTxD)
    h_BxTxF = nn.gelu(h_BxTxF, approximate=True)  # GPT-2's "gelu_new".
    return nn.Dense(width, kernel_init=nn.initializers.normal(self.proj_std), name="c_proj")(h_BxTxF)


class Block(nn.Module):
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, h_BxTxD):
    c = self.config
    # GPT-2 scales the residual projections' initialisation by 1/sqrt(2 L): two per block add to the stream.
    proj_std = c.init_std / math.sqrt(2 * c.num_layers)
    h_BxTxD = h_BxTxD + CausalSelfAttention(c.num_heads, c.init_std, proj_std, name="attn")(
        nn.LayerNorm(epsilon=c.layer_norm_epsilon, name="ln_1")(h_BxTxD))
    return h_BxTxD + MLP(c.mlp_ratio * c.width, c.init_std, proj_std, name="mlp")(
        nn.LayerNorm(epsilon=c.layer_norm_epsilon, name="ln_2")(h_BxTxD))


class GPT2Regressor(nn.Module):
  """Predicts y_i from (x_1, y_1, ..., x_i) for every i at once.

  `__call__(xs [B, N, D], ys [B, N])` returns predictions [B, N]; with `return_hidden=True` it returns
  (predictions, hidden [L + 1, B, 2N, width]) with the Hugging Face convention of the module docstring.
  """

  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, xs_BxNxD, ys_BxN, return_hidden: bool = False):
    c = self.config
    tokens_BxTxD = interleave(xs_BxNxD, ys_BxN)
    t = tokens_BxTxD.shape[1]
    wpe_PxW = self.param("wpe", nn.initializers.normal(c.init_std), (c.n_positions, c.width))
    h_BxTxW = _torch_linear(c.width, tokens_BxTxD.shape[-1], "read_in")(tokens_BxTxD) + wpe_PxW[None, :t]
    hidden = [h_BxTxW]
    for layer in range(c.num_layers):
      h_BxTxW = Block(c, name=f"h_{layer}")(h_BxTxW)
      hidden.append(h_BxTxW)
    h_BxTxW = nn.LayerNorm(epsilon=c.layer_norm_epsilon, name="ln_f")(h_BxTxW)
    hidden[-1] = h_BxTxW
    preds_BxN = _torch_linear(1, c.width, "read_out")(h_BxTxW)[:, ::2, 0]
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
    errors.append(f"config.model.num_heads = {model.num_heads} does not divide config.model.width = "
                  f"{model.width}: allowed num_heads are the divisors of width")
  if not errors and 2 * task.n_points > model.n_positions:
    errors.append(f"config.task.n_points = {task.n_points} needs 2 * n_points = {2 * task.n_points} positions but "
                  f"config.model.n_positions = {model.n_positions}: allowed n_points <= {model.n_positions // 2}")
  if not (isinstance(model.layer_norm_epsilon, float) and model.layer_norm_epsilon > 0):
    errors.append(f"config.model.layer_norm_epsilon = {model.layer_norm_epsilon!r}: must be a float > 0")
  if not (isinstance(model.init_std, float) and model.init_std > 0):
    errors.append(f"config.model.init_std = {model.init_std!r}: must be a float > 0")
  return errors
