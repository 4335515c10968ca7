"""The pure, jitted parts of training: state initialisation, a chunk of training steps, the error curve.

Data parallelism is written with `jax.shard_map` over a one-axis mesh ("data"): the state is replicated,
every device makes its own slice of the global batch inside the step (`data.sample_batch`), and gradients
are averaged by differentiating the `pmean` of the per-device loss. (With shard_map's default `check_vma`,
the gradient of a replicated parameter is already summed over devices; differentiating the mean keeps it
the gradient of the global-batch loss.)
"""

from typing import Any
from typing import Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from icl_jax import data

AXIS = "data"
METRICS = ("loss", "grad_norm", "learning_rate", "n_dims", "n_points")
LOSS_POSITIONS = ("all", "last")  # config.train.loss_positions: Garg et al.'s loss, or Ahn et al.'s.


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: steps completed.
  params: Any
  opt_state: Any
  data_key: jax.Array  # Raw uint32 key data of the data stream (checkpointable as a plain array).


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def init_state(
  config: ml_collections.ConfigDict, model, optimizer: optax.GradientTransformation, mesh: Mesh
) -> TrainState:
  """The step-0 state, created directly in its replicated sharding."""
  task = config.task

  def init():
    keys = data.run_keys(config.seed)
    xs_BxNxD = jnp.zeros((1, task.n_points, task.n_dims))
    params = model.init(keys["init"], xs_BxNxD, jnp.zeros((1, task.n_points)))["params"]
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.init(params),
      data_key=jax.random.key_data(keys["data"]),
    )

  return jax.jit(init, out_shardings=replicated(mesh))()


def masked_mse(preds_BxN: jax.Array, ys_BxN: jax.Array, n_points: jax.Array) -> jax.Array:
  """Mean squared error over the batch and the first `n_points` positions (Garg et al.'s loss)."""
  mask_N = jnp.arange(ys_BxN.shape[1]) < n_points
  return jnp.sum(jnp.where(mask_N, jnp.square(preds_BxN - ys_BxN), 0.0)) / (ys_BxN.shape[0] * n_points)


def last_position_loss(model, params, batch: data.Batch, n_points: jax.Array) -> jax.Array:
  """Mean squared error over the batch at the last active position, n_points - 1, only: Ahn et al.'s loss (one
  query after n context points). A model whose class sets `predicts_one_position` computes just that position
  (`__call__(xs, ys, position=t)` -> [B]); any other model's predictions at the other positions are masked out.
  """
  last = n_points - 1
  ys_B = jax.lax.dynamic_index_in_dim(batch.ys_BxN, last, axis=1, keepdims=False)
  if getattr(model, "predicts_one_position", False):
    preds_B = model.apply({"params": params}, batch.xs_BxNxD, batch.ys_BxN, position=last)
  else:
    preds_BxN = model.apply({"params": params}, batch.xs_BxNxD, batch.ys_BxN)
    preds_B = jax.lax.dynamic_index_in_dim(preds_BxN, last, axis=1, keepdims=False)
  return jnp.mean(jnp.square(preds_B - ys_B))


def make_train_chunk(
  config: ml_collections.ConfigDict,
  model,
  optimizer: optax.GradientTransformation,
  schedule: optax.Schedule,
  mesh: Mesh,
  hypers: data.Hyper | None = None,
) -> Callable[[TrainState, int], tuple[TrainState, dict]]:
  """Returns `run(state, num_steps) -> (state, metrics)`: up to `steps_per_dispatch` steps in one call.

  One compiled program serves every chunk length (the count is a traced loop bound), so changing it never
  recompiles. `metrics[name]` has `steps_per_dispatch` entries, of which the first `num_steps` are filled.

  With `hypers` (kappa and noise_std as [M] arrays), `state` holds M models stacked on a leading axis that
  share shapes and optimiser but not seeds or data settings; they train in one program, vmapped, and each
  gets exactly the updates it would get alone. Metrics then have a trailing model axis.
  """
  task, max_steps = config.task, config.train.steps_per_dispatch
  local_batch = config.train.batch_size // mesh.size
  loss_positions = config.train.get("loss_positions", "all")
  resample_every = task.get("resample_every", 1)
  # With resample_every > 1 a chunk keeps its batch in the loop and makes a new one only at multiples of
  # resample_every: the same batches as sampling at every step (from the key of step // resample_every), made
  # once instead of resample_every times. (Not with the curriculum, whose sizes can change within a window, nor
  # for stacked models.)
  cache_batches = resample_every > 1 and hypers is None and not task.curriculum.enabled

  def sample(state: TrainState, hyper: data.Hyper) -> data.Batch:
    """This device's slice of the global batch of `state.step`."""
    sizes = data.curriculum(state.step, task)
    key = data.step_key(jax.random.wrap_key_data(state.data_key), data.data_step(state.step, task))
    return data.sample_batch(key, jax.lax.axis_index(AXIS) * local_batch, local_batch, task, sizes.n_dims, hyper)

  def one_step(state: TrainState, hyper: data.Hyper, cached: data.Batch | None = None) -> tuple[TrainState, dict]:
    sizes = data.curriculum(state.step, task)
    batch = sample(state, hyper) if cached is None else cached

    def loss_fn(params):
      # Varying over the devices from here on, as a replicated parameter becomes where it meets the device's
      # batch; the transpose of the cast sums the gradient over devices, as before. Made explicit so that a
      # custom_vjp in the model (`gpt2.mixed_matmul`) returns a parameter gradient of the parameter's type.
      params = jax.tree.map(lambda p: jax.lax.pcast(p, AXIS, to="varying"), params)
      if loss_positions == "last":
        return jax.lax.pmean(last_position_loss(model, params, batch, sizes.n_points), AXIS)
      preds_BxN = model.apply({"params": params}, batch.xs_BxNxD, batch.ys_BxN)
      return jax.lax.pmean(masked_mse(preds_BxN, batch.ys_BxN, sizes.n_points), AXIS)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    metrics = {
      "loss": loss,
      "grad_norm": optax.tree.norm(grads),
      "learning_rate": jnp.asarray(schedule(state.step)),
      "n_dims": sizes.n_dims,
      "n_points": sizes.n_points,
    }
    new_state = state.replace(
      step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
    )
    return new_state, metrics

  if hypers is None:
    hyper = data.Hyper(task.kappa, task.noise_std)
    step_fn, models_shape = (lambda state, batch: one_step(state, hyper, batch)), ()
  else:
    step_fn, models_shape = (lambda state, _: jax.vmap(one_step)(state, hypers)), hypers.kappa.shape

  def run(state: TrainState, num_steps: jax.Array):
    buffers = {
      name: jnp.zeros((max_steps,) + models_shape, jnp.int32 if name.startswith("n_") else jnp.float32)
      for name in METRICS
    }

    def body(i, carry):
      state, buffers, batch = carry
      if cache_batches:
        fresh = (i > 0) & (state.step % resample_every == 0)
        batch = jax.lax.cond(fresh, lambda: sample(state, hyper), lambda: batch)
      state, metrics = step_fn(state, batch)
      buffers = {name: buffers[name].at[i].set(metrics[name].astype(buffers[name].dtype)) for name in METRICS}
      return state, buffers, batch

    # A cached batch is first sampled outside the loop (so that the carry is typed as varying over devices),
    # whatever step the chunk starts at; without caching every step samples its own and the carry holds None.
    first_batch = sample(state, hyper) if cache_batches else None
    return jax.lax.fori_loop(0, num_steps, body, (state, buffers, first_batch))[:2]

  def run_at_precision(state: TrainState, num_steps: jax.Array):
    with jax.default_matmul_precision(config.train.matmul_precision):  # Read when the chunk is traced.
      return run(state, num_steps)

  sharded = jax.shard_map(run_at_precision, mesh=mesh, in_specs=(P(), P()), out_specs=(P(), P()))
  return jax.jit(sharded, donate_argnums=0)


def make_error_curve(config: ml_collections.ConfigDict, model, mesh: Mesh) -> Callable[[Any], dict]:
  """Returns `curve(params) -> {"error_per_dim": [N], "zero_per_dim": [N]}` on fresh full-size prompts.

  Squared error divided by d at every context length, averaged over `config.eval.num_prompts` prompts, next
  to the same for predicting zero (Garg et al.'s baseline of 1 for isotropic data).
  """
  task, num_prompts = config.task, config.eval.num_prompts
  local_batch = config.eval.batch_size  # Per device: the evaluation's memory bound holds on any device count.
  num_batches = -(-num_prompts // (local_batch * mesh.size))
  full = jnp.asarray(task.n_dims, jnp.int32)

  def sums(params):
    def add_batch(totals_2xN, batch_index):
      # Prompt j is example j of one stream whatever the device count and batch size.
      key = data.step_key(data.run_keys(config.seed)["eval"], 0)
      first = (batch_index * mesh.size + jax.lax.axis_index(AXIS)) * local_batch
      prompts = data.sample_batch(key, first, local_batch, task, full)
      preds_BxN = model.apply({"params": params}, prompts.xs_BxNxD, prompts.ys_BxN)
      # The last batch may run past num_prompts: those prompts get weight 0.
      counted_B = (first + jnp.arange(local_batch)) < num_prompts
      total = lambda v_BxN: jax.lax.psum(jnp.sum(jnp.where(counted_B[:, None], v_BxN, 0.0), axis=0), AXIS)
      batch_2xN = jnp.stack([total(jnp.square(preds_BxN - prompts.ys_BxN)), total(jnp.square(prompts.ys_BxN))])
      return totals_2xN + batch_2xN, None

    # One program for every batch: one program per batch, dispatched one after another, left two XLA CPU
    # devices waiting in an all-reduce's rendezvous until XLA aborted the process.
    zeros_2xN = jnp.zeros((2, task.n_points), jnp.float32)
    totals_2xN, _ = jax.lax.scan(add_batch, zeros_2xN, jnp.arange(num_batches, dtype=jnp.int32))
    return totals_2xN

  sharded = jax.jit(jax.shard_map(sums, mesh=mesh, in_specs=P(), out_specs=P()))

  def curve(params) -> dict:
    totals_2xN = jax.device_get(sharded(params)) * (1.0 / (num_prompts * task.n_dims))
    return {"error_per_dim": totals_2xN[0], "zero_per_dim": totals_2xN[1]}

  return curve
