"""Per-layer read-outs: a linear map from each layer's hidden state at the x positions to a prediction of y.

Layer l (1..L) reads `hidden[l]` of the model's Hugging Face-style hidden states: the raw residual stream after
block l for l < L, and the read-out's input for l = L (after GPT-2's final LayerNorm). Three kinds:
  * "least_squares": for each layer, the linear map (with bias) that minimises the squared error over all
    positions of `probe_prompts` fresh prompts, in closed form. It is the minimiser of Fu et al.'s probe
    objective, which their Adam-trained probes approach.
  * "trained": Fu et al.'s protocol: backbone frozen, all layers' probes trained together by Adam on the MSE
    over positions, on fresh full-size prompts every step.
  * "model": the model's own read-out applied to every layer, no fitting.
Probes are stored as {"kernel": [L, W], "bias": [L]}.
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax

from icl_jax import data

READOUTS = ("least_squares", "trained", "model")
PROBE_INITS = ("read_out", "normal")


def x_position_states(hidden_LxBxTxW: jax.Array) -> jax.Array:
  """Layers 1..L at the x positions (where predictions are read): [L, B, N, W]."""
  return hidden_LxBxTxW[1:, :, ::2]


def apply(probes: dict, states_LxBxNxW: jax.Array) -> jax.Array:
  """Per-layer predictions [L, B, N]."""
  return jnp.einsum("lbnw,lw->lbn", states_LxBxNxW, probes["kernel"]) + probes["bias"][:, None, None]


def model_readout(params: dict, num_layers: int) -> dict:
  """The model's read-out, the same for every layer."""
  read_out = params["read_out"]
  return {"kernel": jnp.tile(read_out["kernel"][:, 0][None], (num_layers, 1)),
          "bias": jnp.tile(read_out["bias"], num_layers)}


def _prompts(config: ml_collections.ConfigDict, key: jax.Array, index, batch_size: int) -> data.Batch:
  """Full-size prompts (no curriculum) [index * batch_size, (index + 1) * batch_size) of the stream of `key`."""
  return data.sample_batch(data.step_key(key, 0), index * batch_size, batch_size, config.task, config.task.n_dims)


def _states(model, params, prompts: data.Batch) -> jax.Array:
  _, hidden = model.apply({"params": params}, prompts.xs_BxNxD, prompts.ys_BxN, return_hidden=True)
  return x_position_states(hidden)


def _least_squares_fitter(config: ml_collections.ConfigDict, model):
  """Closed-form probes from the normal equations, accumulated over batches of fresh prompts."""
  evaluation = config.eval
  batch = min(evaluation.batch_size, evaluation.probe_prompts)

  @jax.jit
  def normal_equations(params, key, index):
    prompts = _prompts(config, key, index, batch)
    states_LxBxNxW = _states(model, params, prompts)
    features_LxMxF = jnp.concatenate([states_LxBxNxW, jnp.ones(states_LxBxNxW.shape[:-1] + (1,))], -1).reshape(
        states_LxBxNxW.shape[0], -1, states_LxBxNxW.shape[-1] + 1)
    return (jnp.einsum("lmf,lmg->lfg", features_LxMxF, features_LxMxF),
            jnp.einsum("lmf,m->lf", features_LxMxF, prompts.ys_BxN.reshape(-1)))

  @jax.jit
  def solve(gram_LxFxF, moments_LxF):
    # A ridge relative to the features' scale keeps the solve defined when a layer's states are degenerate
    # (e.g. a LayerNorm makes them sum to a constant) without visibly moving the fit.
    f = gram_LxFxF.shape[-1]
    scale_L = jnp.trace(gram_LxFxF, axis1=1, axis2=2) / f
    ridge_LxFxF = evaluation.probe_ridge * scale_L[:, None, None] * jnp.eye(f)[None]
    solution_LxF = jnp.linalg.solve(gram_LxFxF + ridge_LxFxF, moments_LxF[..., None])[..., 0]
    return {"kernel": solution_LxF[:, :-1], "bias": solution_LxF[:, -1]}

  def fit(params, key):
    totals = [normal_equations(params, key, i) for i in range(-(-evaluation.probe_prompts // batch))]
    return solve(sum(t[0] for t in totals), sum(t[1] for t in totals))

  return fit


def _trainer(config: ml_collections.ConfigDict, model):
  """Fu et al.'s probes: Adam on the MSE over positions, all layers at once, backbone frozen."""
  evaluation = config.eval
  num_layers = config.model.num_layers
  optimizer = optax.adam(evaluation.probe_learning_rate)

  @jax.jit
  def fit(params, key):
    init_key, data_key = jax.random.split(key)
    if evaluation.probe_init == "read_out":
      # What Fu et al.'s code ends up doing: it re-initialises the read-out, then loads the pretrained state
      # over it.
      readouts = model_readout(params, num_layers)
    else:
      readouts = {"kernel": 0.01 * jax.random.normal(init_key, (num_layers, config.model.width)),
                  "bias": jnp.zeros((num_layers,))}

    def step(i, carry):
      readouts, opt_state = carry
      prompts = _prompts(config, data_key, i, evaluation.probe_batch_size)
      states_LxBxNxW = jax.lax.stop_gradient(_states(model, params, prompts))
      loss_fn = lambda r: jnp.sum(jnp.mean(jnp.square(apply(r, states_LxBxNxW) - prompts.ys_BxN[None]), (1, 2)))
      updates, opt_state = optimizer.update(jax.grad(loss_fn)(readouts), opt_state, readouts)
      return optax.apply_updates(readouts, updates), opt_state

    return jax.lax.fori_loop(0, evaluation.probe_steps, step, (readouts, optimizer.init(readouts)))[0]

  return fit


def make_fitter(config: ml_collections.ConfigDict, model):
  """`fit(params, key) -> probes` for `config.eval.readout`, compiled once for any number of calls."""
  readout = config.eval.readout
  if readout == "least_squares":
    return _least_squares_fitter(config, model)
  if readout == "trained":
    return _trainer(config, model)
  if readout == "model":
    return lambda params, key: model_readout(params, config.model.num_layers)
  raise ValueError(f"config.eval.readout = {readout!r}; allowed: {READOUTS}")
