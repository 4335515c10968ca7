"""The LSTM baseline of Fu et al. 2024 (App. A.1): stacked unidirectional LSTMs on Garg et al.'s tokens.

Tokens interleave x_1, [y_1, 0, ..., 0], x_2, ... exactly as for GPT-2 (`gpt2.interleave`); a linear read-in
maps them to width W, `num_layers` LSTM layers of width W follow, each reading the sequence of hidden outputs
of the layer below, and a linear read-out at x_i's position predicts y_i. There is no position embedding (the
recurrence knows the order) and no final LayerNorm.

The cell is torch.nn.LSTM's, which Fu et al.'s baseline presumably used (their code for it is not released):
gates (input, forget, cell, output) = W_ih h_below + b_ih + W_hh h_prev + b_hh, every weight and bias
initialised U(+-1/sqrt(W)), no forget-gate bias offset. It keeps torch's two bias vectors per layer, so a layer
has 4 (W_in W + W^2 + 2 W) parameters and the paper-size model (d = 20, 10 layers, W = 256) has torch's
5,268,993, the 5.27M of Fu et al.'s App. A.1. (Flax's LSTMCell has one bias: 10,240 fewer at that size, the same
function class.) `kernel_ih` and `kernel_hh` are torch's `weight_ih_l{k}` and `weight_hh_l{k}` transposed, with
the gates in torch's order i, f, g, o.

Hidden states have GPT-2's layout and the same meaning for the probes: [L + 1, B, 2N, W], entry 0 the
read-in's output, entry l (1..L) the hidden output h_t of LSTM layer l at every token; entry L is the read-out's
input.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from icl_jax.models import gpt2


def _cell(gates_Xx4W: jax.Array, c_XxW: jax.Array) -> tuple[jax.Array, jax.Array]:
  """torch.nn.LSTM's update from the gates' pre-activations (order i, f, g, o): the new (h, c)."""
  i, f, g, o = jnp.split(gates_Xx4W, 4, axis=-1)
  c_XxW = jax.nn.sigmoid(f) * c_XxW + jax.nn.sigmoid(i) * jnp.tanh(g)
  return jax.nn.sigmoid(o) * jnp.tanh(c_XxW), c_XxW


class LSTMLayer(nn.Module):
  """One unidirectional LSTM layer over the prompt and, with the same weights, one step for each query."""

  width: int

  @nn.compact
  def __call__(self, h_BxTxI, g_BxNxQxI=None):
    w = self.width
    bound = 1.0 / math.sqrt(w)  # torch.nn.LSTM's initialisation, for weights and biases alike.
    init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
    kernel_ih = self.param("kernel_ih", init, (h_BxTxI.shape[-1], 4 * w))
    kernel_hh = self.param("kernel_hh", init, (w, 4 * w))
    bias_4W = self.param("bias_ih", init, (4 * w,)) + self.param("bias_hh", init, (4 * w,))
    # The input projections of all tokens in one large matmul, outside the recurrence: only h @ kernel_hh is
    # sequential.
    inputs_TxBx4W = jnp.einsum("bti,ig->tbg", h_BxTxI, kernel_ih) + bias_4W[None, None]

    def step(carry, inputs_Bx4W):
      h_BxW, c_BxW = _cell(inputs_Bx4W + carry[0] @ kernel_hh, carry[1])
      return (h_BxW, c_BxW), (h_BxW, c_BxW)

    # Derived from the inputs, not built from a shape: under shard_map (the trainer) the carry must vary over
    # the batch axis like the values the step returns.
    zeros_BxW = jnp.zeros_like(inputs_TxBx4W[0, :, :w])
    _, (h_TxBxW, c_TxBxW) = jax.lax.scan(step, (zeros_BxW, zeros_BxW), inputs_TxBx4W)
    out_BxTxW = jnp.swapaxes(h_TxBxW, 0, 1)
    if g_BxNxQxI is None:
      return out_BxTxW, None
    # The query of prefix n stands where x_n does: it continues from the state after the 2n tokens before it
    # (after y_{n-1}, token 2n - 1; the zero initial state for n = 0), one step, every prefix and query at once.
    h_NxBxW = jnp.concatenate([zeros_BxW[None], h_TxBxW[1:-1:2]])
    c_NxBxW = jnp.concatenate([zeros_BxW[None], c_TxBxW[1:-1:2]])
    recurrent_BxNx1x4W = jnp.einsum("nbw,wg->bng", h_NxBxW, kernel_hh)[:, :, None]
    g_BxNxQxW, _ = _cell(
      g_BxNxQxI @ kernel_ih + bias_4W[None, None, None] + recurrent_BxNx1x4W, jnp.swapaxes(c_NxBxW, 0, 1)[:, :, None]
    )
    return out_BxTxW, g_BxNxQxW


class LSTMRegressor(nn.Module):
  """Predicts y_i from (x_1, y_1, ..., x_i) for every i, with GPT2Regressor's interface.

  `__call__(xs [B, N, D], ys [B, N])` returns predictions [B, N]; with `return_hidden=True`, (predictions,
  hidden [L + 1, B, 2N, W]) as in the module docstring. With `queries` [B, N, Q, D] it also predicts, for every
  prefix n, each query as if it stood in x_n's place, and returns `gpt2.QueryOutputs` (query hidden states
  [L + 1, B, N, Q, W], same convention), for the evaluator's induced weights.
  """

  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, xs_BxNxD, ys_BxN, return_hidden: bool = False, queries=None):
    c = self.config
    tokens_BxTxD = gpt2.interleave(xs_BxNxD, ys_BxN)
    read_in = gpt2._torch_linear(c.width, tokens_BxTxD.shape[-1], "read_in")
    h_BxTxW = read_in(tokens_BxTxD)
    g_BxNxQxW = None if queries is None else read_in(queries)
    hidden, query_hidden = [h_BxTxW], [g_BxNxQxW]
    for layer in range(c.num_layers):
      h_BxTxW, g_BxNxQxW = LSTMLayer(c.width, name=f"lstm_{layer}")(h_BxTxW, g_BxNxQxW)
      hidden.append(h_BxTxW)
      query_hidden.append(g_BxNxQxW)
    read_out = gpt2._torch_linear(1, c.width, "read_out")
    preds_BxN = read_out(h_BxTxW)[:, ::2, 0]
    if queries is not None:
      return gpt2.QueryOutputs(preds_BxN, jnp.stack(hidden), read_out(g_BxNxQxW)[..., 0], jnp.stack(query_hidden))
    if return_hidden:
      return preds_BxN, jnp.stack(hidden)
    return preds_BxN


def validate(model: ml_collections.ConfigDict, task: ml_collections.ConfigDict) -> list[str]:
  """Errors in config.model for this family, each naming its field and the allowed values. The LSTM has no
  heads, MLP, positions, LayerNorm or init_std, so those fields are not read."""
  del task  # Any prompt length: the recurrence has no position table.
  errors = []
  for field in ("num_layers", "width"):
    value = model.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      errors.append(f"config.model.{field} = {value!r}: must be an integer >= 1")
  if model.get("dtype", "float32") != "float32":
    errors.append(
      f"config.model.dtype = {model.get('dtype')!r}: the lstm family runs in float32 only; allowed 'float32'"
    )
  return errors
