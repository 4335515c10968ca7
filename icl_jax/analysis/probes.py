"""Per-layer read-outs: a linear map from each layer's hidden state at the x positions to a prediction of y.

Layer l (1..L) reads `hidden[l]` of the model's Hugging Face-style hidden states: the raw residual stream after
block l for l < L, and the read-out's input for l = L (after GPT-2's final LayerNorm). Three kinds:
  * "least_squares": for each layer, the linear map (with bias) that minimises the squared error over all
    positions of `probe_prompts` fresh prompts, in closed form: the normal equations are accumulated and solved
    in float64 on the host, as their error grows with cond(features)^2 (~1e4 for some layers). It is the
    minimiser of Fu et al.'s probe objective, which their Adam-trained probes approach.
  * "trained": Fu et al.'s protocol: backbone frozen, all layers' probes trained together by Adam on the MSE
    over positions, on fresh full-size prompts every step.
  * "model": the model's own read-out applied to every layer, no fitting.
Probes are stored as {"kernel": [L, W], "bias": [L]}. A fitter returns them with their own mean squared error
on the prompts they were fit on, per layer (None for the model's read-out).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from icl_jax import data
from icl_jax.analysis.precision import highest_precision

READOUTS = ("least_squares", "trained", "model")
PROBE_INITS = ("read_out", "normal")


def x_position_states(hidden_LxBxTxW: jax.Array) -> jax.Array:
  """Layers 1..L at the x positions (where predictions are read): [L, B, N, W]."""
  return hidden_LxBxTxW[1:, :, ::2]


@highest_precision
def apply(probes: dict, states_LxBxNxW: jax.Array) -> jax.Array:
  """Per-layer predictions [L, B, N]."""
  return jnp.einsum("lbnw,lw->lbn", states_LxBxNxW, probes["kernel"]) + probes["bias"][:, None, None]


def model_readout(params: dict, num_layers: int) -> dict:
  """The model's read-out, the same for every layer."""
  read_out = params["read_out"]
  return {
    "kernel": jnp.tile(read_out["kernel"][:, 0][None], (num_layers, 1)),
    "bias": jnp.tile(read_out["bias"], num_layers),
  }


def _prompts(config: ml_collections.ConfigDict, key: jax.Array, index, batch_size: int) -> data.Batch:
  """Full-size prompts (no curriculum) [index * batch_size, (index + 1) * batch_size) of the stream of `key`."""
  return data.sample_batch(data.step_key(key, 0), index * batch_size, batch_size, config.task, config.task.n_dims)


def _states(model, params, prompts: data.Batch) -> jax.Array:
  _, hidden = model.apply({"params": params}, prompts.xs_BxNxD, prompts.ys_BxN, return_hidden=True)
  return x_position_states(hidden)


def solve_least_squares(gram_LxFxF: np.ndarray, moments_LxF: np.ndarray, relative_ridge: float) -> np.ndarray:
  """Per layer, the minimum-norm solution of (G + ridge I) beta = c in float64, with the ridge relative to the
  mean feature energy tr(G) / F: it keeps the fit well defined when a layer's states are degenerate (e.g. a
  LayerNorm makes them sum to a constant), and the minimum norm keeps the coefficients small there, so that
  applying them in float32 does not cancel. [L, F]."""
  gram_LxFxF, moments_LxF = np.asarray(gram_LxFxF, np.float64), np.asarray(moments_LxF, np.float64)
  f = gram_LxFxF.shape[-1]
  scale_L = np.trace(gram_LxFxF, axis1=1, axis2=2) / f
  ridged_LxFxF = gram_LxFxF + relative_ridge * scale_L[:, None, None] * np.eye(f)[None]
  return np.stack([np.linalg.lstsq(g, c, rcond=None)[0] for g, c in zip(ridged_LxFxF, moments_LxF)])


def feature_batches(config: ml_collections.ConfigDict, model):
  """`features(params, key, index) -> (features [L, M, W + 1], ys [M])`: batch `index` of the least-squares
  probes' fitting prompts (M = prompts x positions), each layer's states with a constant column for the bias."""
  batch = min(config.eval.batch_size, config.eval.probe_prompts)

  @highest_precision
  @jax.jit
  def features(params, key, index):
    prompts = _prompts(config, key, index, batch)
    states_LxBxNxW = _states(model, params, prompts)
    features_LxMxF = jnp.concatenate([states_LxBxNxW, jnp.ones(states_LxBxNxW.shape[:-1] + (1,))], -1).reshape(
      states_LxBxNxW.shape[0], -1, states_LxBxNxW.shape[-1] + 1
    )
    return features_LxMxF, prompts.ys_BxN.reshape(-1)

  return features


def _least_squares_fitter(config: ml_collections.ConfigDict, model):
  """Closed-form probes from the normal equations, accumulated in float64 over batches of fresh prompts."""
  evaluation = config.eval
  batch = min(evaluation.batch_size, evaluation.probe_prompts)
  features = feature_batches(config, model)

  def fit(params, key):
    gram, moments, energy, count = 0.0, 0.0, 0.0, 0
    for i in range(-(-evaluation.probe_prompts // batch)):
      features_LxMxF, ys_M = (np.asarray(a, np.float64) for a in features(params, key, i))
      gram = gram + np.matmul(np.swapaxes(features_LxMxF, 1, 2), features_LxMxF)  # BLAS, unlike np.einsum.
      moments = moments + np.matmul(np.swapaxes(features_LxMxF, 1, 2), ys_M)
      energy, count = energy + ys_M @ ys_M, count + ys_M.size
    solution_LxF = solve_least_squares(gram, moments, evaluation.probe_ridge)
    # ||F beta - y||^2 = beta^T G beta - 2 beta^T c + y^T y, from the same sums.
    residual_L = (
      np.einsum("lf,lfg,lg->l", solution_LxF, gram, solution_LxF)
      - 2 * np.einsum("lf,lf->l", solution_LxF, moments)
      + energy
    )
    readouts = {
      "kernel": jnp.asarray(solution_LxF[:, :-1], jnp.float32),
      "bias": jnp.asarray(solution_LxF[:, -1], jnp.float32),
    }
    return readouts, np.maximum(residual_L, 0.0) / count

  return fit


def _trainer(config: ml_collections.ConfigDict, model):
  """Fu et al.'s probes: Adam on the MSE over positions, all layers at once, backbone frozen."""
  evaluation = config.eval
  num_layers = config.model.num_layers
  optimizer = optax.adam(evaluation.probe_learning_rate)

  @highest_precision
  @jax.jit
  def fit(params, key):
    init_key, data_key = jax.random.split(key)
    if evaluation.probe_init == "read_out":
      # What Fu et al.'s code ends up doing: it re-initialises the read-out, then loads the pretrained state
      # over it.
      readouts = model_readout(params, num_layers)
    else:
      readouts = {
        "kernel": 0.01 * jax.random.normal(init_key, (num_layers, config.model.width)),
        "bias": jnp.zeros((num_layers,)),
      }

    def step(i, carry):
      readouts, opt_state = carry
      prompts = _prompts(config, data_key, i, evaluation.probe_batch_size)
      states_LxBxNxW = jax.lax.stop_gradient(_states(model, params, prompts))
      loss_fn = lambda r: jnp.sum(jnp.mean(jnp.square(apply(r, states_LxBxNxW) - prompts.ys_BxN[None]), (1, 2)))
      updates, opt_state = optimizer.update(jax.grad(loss_fn)(readouts), opt_state, readouts)
      return optax.apply_updates(readouts, updates), opt_state

    readouts = jax.lax.fori_loop(0, evaluation.probe_steps, step, (readouts, optimizer.init(readouts)))[0]
    # The fit's own error, on the next batch of its stream (one it was not trained on).
    prompts = _prompts(config, data_key, evaluation.probe_steps, evaluation.probe_batch_size)
    errors_L = jnp.mean(jnp.square(apply(readouts, _states(model, params, prompts)) - prompts.ys_BxN[None]), (1, 2))
    return readouts, errors_L

  return fit


def make_fitter(config: ml_collections.ConfigDict, model):
  """`fit(params, key) -> (probes, fit_mse [L] or None)` for `config.eval.readout`, compiled once for any
  number of calls."""
  readout = config.eval.readout
  if readout == "least_squares":
    return _least_squares_fitter(config, model)
  if readout == "trained":
    return _trainer(config, model)
  if readout == "model":
    return lambda params, key: (model_readout(params, config.model.num_layers), None)
  raise ValueError(f"config.eval.readout = {readout!r}; allowed: {READOUTS}")
