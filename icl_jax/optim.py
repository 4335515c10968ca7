"""The optimiser: Adam (or AdamW) with an optional warm-up, decay schedule, global-norm clipping and
per-matrix clipping (Ahn et al.)."""

import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ("constant", "cosine", "linear", "step_decay")


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up over `warmup_steps`, then constant, cosine or linear decay to 0 at `num_steps`, or
  "step_decay": multiplied by `decay_factor` every `decay_every` steps (Ahn et al.'s code halves it every 2000)."""
  peak, warmup = train.learning_rate, train.warmup_steps
  decay_steps = max(train.num_steps - warmup, 1)
  if train.schedule == "constant":
    after = optax.constant_schedule(peak)
  elif train.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps)
  elif train.schedule == "linear":
    after = optax.linear_schedule(peak, 0.0, decay_steps)
  elif train.schedule == "step_decay":
    after = optax.exponential_decay(peak, train.decay_every, train.decay_factor, staircase=True)
  else:
    raise ValueError(f"config.train.schedule = {train.schedule!r}; allowed: {SCHEDULES}")
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def clip_per_matrix(max_norm: float) -> optax.GradientTransformation:
  """Scales each parameter array's gradient g (each leaf: a matrix of Ahn et al.'s linear attention, a kernel
  or bias of GPT-2) to g * max_norm / ||g||_F when ||g||_F > max_norm, as Ahn et al.'s `clip_and_step` does for
  every d x d matrix (max_norm 0.01). Stateless."""

  def update(updates, state, params=None):
    del params

    def clip(g):
      norm = jnp.sqrt(jnp.sum(jnp.square(g)))
      return jnp.where(norm > max_norm, g * (max_norm / jnp.where(norm > max_norm, norm, 1.0)), g)

    return jax.tree.map(clip, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(train)
  kwargs = dict(learning_rate=schedule, b1=train.adam_b1, b2=train.adam_b2, eps=train.adam_eps)
  adam = optax.adamw(weight_decay=train.weight_decay, **kwargs) if train.weight_decay > 0 else optax.adam(**kwargs)
  if train.get("clip_per_matrix", 0.0) > 0:  # Before Adam (and after global-norm clipping, if that is on too).
    adam = optax.chain(clip_per_matrix(train.clip_per_matrix), adam)
  if train.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(train.grad_clip_norm), adam)
  return adam
