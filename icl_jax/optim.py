"""The optimiser: Adam (or AdamW) with an optional warm-up, decay schedule and global-norm clipping."""

import ml_collections
import optax

SCHEDULES = ("constant", "cosine", "linear")


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up over `warmup_steps`, then constant, cosine or linear decay to 0 at `num_steps`."""
  peak, warmup = train.learning_rate, train.warmup_steps
  decay_steps = max(train.num_steps - warmup, 1)
  if train.schedule == "constant":
    after = optax.constant_schedule(peak)
  elif train.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps)
  elif train.schedule == "linear":
    after = optax.linear_schedule(peak, 0.0, decay_steps)
  else:
    raise ValueError(f"config.train.schedule = {train.schedule!r}; allowed: {SCHEDULES}")
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(train)
  kwargs = dict(learning_rate=schedule, b1=train.adam_b1, b2=train.adam_b2, eps=train.adam_eps)
  adam = optax.adamw(weight_decay=train.weight_decay, **kwargs) if train.weight_decay > 0 else optax.adam(**kwargs)
  if train.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(train.grad_clip_norm), adam)
  return adam
