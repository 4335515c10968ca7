"""Model families, chosen by `config.model.family`.

Every family maps prompts to predictions with the same interface, so the trainer and the evaluator never
look inside: `model.apply({"params": params}, xs [B, N, D], ys [B, N])` returns predictions [B, N] (the
prediction for y_i uses (x_1, y_1, ..., x_i)), and `return_hidden=True` also returns each layer's hidden
state [L + 1, B, T, width]. For the evaluator's induced weights (SimW), `queries=` [B, N, Q, D] returns
`gpt2.QueryOutputs`: each query predicted from the points before its prefix, as if it stood in x_n's place.
A new family registers a `Family` here, and its evaluation in `icl_jax.analysis.evaluate.EVALUATIONS`.

Exception: "lsa" (Ahn et al.'s linear self-attention, models/lsa.py) returns each prefix's matrix Z_l as its
hidden states, [L + 1, B, N, d + 1, N], so the per-layer probes do not apply to it; the analysis package
evaluates it by its own protocol. This package imports nothing of icl_jax outside itself.
"""

from typing import Callable
from typing import NamedTuple

import flax.linen as nn
import ml_collections

from icl_jax.models import gpt2
from icl_jax.models import lsa
from icl_jax.models import lstm


class Family(NamedTuple):
  build: Callable[[ml_collections.ConfigDict], nn.Module]  # config.model -> module.
  # (config.model, config.task) -> errors, each naming its field and the allowed values.
  validate: Callable[[ml_collections.ConfigDict, ml_collections.ConfigDict], list[str]]


REGISTRY: dict[str, Family] = {
  "gpt2": Family(build=lambda model: gpt2.GPT2Regressor(model), validate=gpt2.validate),
  "lstm": Family(build=lambda model: lstm.LSTMRegressor(model), validate=lstm.validate),
  "lsa": Family(build=lambda model: lsa.LSARegressor(model), validate=lsa.validate),
}


def build_model(model: ml_collections.ConfigDict) -> nn.Module:
  """The module of `model.family` (validated beforehand by `icl_jax.analysis.evaluate.validate`)."""
  return REGISTRY[model.family].build(model)
