"""Garg et al.'s released PyTorch model as this project's Flax parameters.

Fu et al. never trained a transformer: they probed the one Garg et al. released (`models.zip` of
dtsip/in-context-learning, `linear_regression/pretrained/state.pt`). That file holds a `TransformerModel`:
`_read_in` (nn.Linear d -> width), `_backbone` (a Hugging Face GPT2Model fed `inputs_embeds`) and `_read_out`
(nn.Linear width -> 1), the network of `icl_jax.models.gpt2.GPT2Regressor`, whose parameter names follow Hugging
Face's so that this mapping is one to one.

`python -m icl_jax.garg_checkpoint` (README, "Garg et al.'s checkpoint") writes DIR/config.json (the paper
configuration with the model fields that the checkpoint implies) and DIR/garg_params (an Orbax checkpoint of the
parameters), which `icl_jax.checkpointing.load_params` reads back. Only the conversion needs torch.
"""

import inspect
import json
import pathlib
import re
from typing import Any
from typing import Mapping

import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from icl_jax import checkpointing
from icl_jax.analysis import evaluate
from icl_jax.runtime import config_files
from icl_jax.runtime import errors
from icl_jax.runtime import run_logs

# Not parameters of the network. `wte` is GPT2Model's token embedding, unused because Garg et al. feed
# inputs_embeds. `attn.bias` (the causal mask) and `attn.masked_bias` (the value that masked logits are set to)
# are buffers that older transformers releases (Garg et al. used 4.17) saved along with the weights.
_UNUSED_KEY = re.compile(r"_backbone\.(wte\.weight|h\.\d+\.attn\.(bias|masked_bias))")
_CAUSAL_MASK_KEY = re.compile(r"_backbone\.h\.\d+\.attn\.bias")
_LAYER_KEY = re.compile(r"_backbone\.h\.(\d+)\.")


def _block_layout(width: int, hidden: int) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """A block's tensors: name inside `_backbone.h.{i}` -> (our path inside `h_{i}`, shape). GPT-2's Conv1D
  stores its weight as [in, out], which already is a Flax kernel's layout."""
  return {
    "ln_1.weight": (("ln_1", "scale"), (width,)),
    "ln_1.bias": (("ln_1", "bias"), (width,)),
    "attn.c_attn.weight": (("attn", "c_attn", "kernel"), (width, 3 * width)),
    "attn.c_attn.bias": (("attn", "c_attn", "bias"), (3 * width,)),
    "attn.c_proj.weight": (("attn", "c_proj", "kernel"), (width, width)),
    "attn.c_proj.bias": (("attn", "c_proj", "bias"), (width,)),
    "ln_2.weight": (("ln_2", "scale"), (width,)),
    "ln_2.bias": (("ln_2", "bias"), (width,)),
    "mlp.c_fc.weight": (("mlp", "c_fc", "kernel"), (width, hidden)),
    "mlp.c_fc.bias": (("mlp", "c_fc", "bias"), (hidden,)),
    "mlp.c_proj.weight": (("mlp", "c_proj", "kernel"), (hidden, width)),
    "mlp.c_proj.bias": (("mlp", "c_proj", "bias"), (width,)),
  }


def _layout(
  n_dims: int, width: int, hidden: int, n_positions: int, num_layers: int
) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]]:
  """Every tensor a checkpoint must hold: its key -> (our path, shape in the file, whether to transpose)."""
  layout = {
    "_read_in.weight": (("read_in", "kernel"), (width, n_dims), True),  # nn.Linear stores [out, in].
    "_read_in.bias": (("read_in", "bias"), (width,), False),
    "_backbone.wpe.weight": (("wpe",), (n_positions, width), False),
    "_backbone.ln_f.weight": (("ln_f", "scale"), (width,), False),
    "_backbone.ln_f.bias": (("ln_f", "bias"), (width,), False),
    "_read_out.weight": (("read_out", "kernel"), (1, width), True),
    "_read_out.bias": (("read_out", "bias"), (1,), False),
  }
  for layer in range(num_layers):
    for name, (path, shape) in _block_layout(width, hidden).items():
      layout[f"_backbone.h.{layer}.{name}"] = ((f"h_{layer}", *path), shape, False)
  return layout


def _some(keys, limit: int = 8) -> str:
  keys = sorted(keys, key=str)
  more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
  return ", ".join(map(repr, keys[:limit])) + more


def _matrix_shape(state_dict: Mapping[str, Any], key: str, source: str) -> tuple[int, int]:
  if key not in state_dict:
    raise ValueError(
      f"{source} is not a checkpoint of Garg et al.'s TransformerModel: it has no {key!r} (its "
      f"keys should start with _read_in, _backbone, _read_out; it has {_some(state_dict)})."
    )
  shape = np.shape(state_dict[key])
  if len(shape) != 2:
    raise ValueError(f"{source}: {key!r} has shape {shape}, expected a matrix.")
  return shape


def convert_state_dict(
  state_dict: Mapping[str, Any], num_heads: int = 8, source: str = "the state dict"
) -> tuple[dict, dict[str, int]]:
  """Garg et al.'s `TransformerModel.state_dict()` as `GPT2Regressor` parameters.

  Args:
    state_dict: key -> array-like (torch tensors on the CPU, numpy arrays).
    num_heads: attention heads; the weights do not record them (Garg et al.'s "standard" model: 8).
    source: the file it came from, named in every error.

  Returns:
    (params, overrides): the parameter tree of `GPT2Regressor.init(...)["params"]` as float32 numpy arrays, and
    the configuration fields that the shapes imply, as `--config.FIELD` overrides ({"model.num_layers": 12,
    ..., "task.n_dims": 20}; apply them with `config.update_from_flattened_dict`).

  Raises:
    ValueError naming `source` and the key: a missing or unknown key, a wrong shape, a non-finite value.
  """
  width, n_dims = _matrix_shape(state_dict, "_read_in.weight", source)
  n_positions = _matrix_shape(state_dict, "_backbone.wpe.weight", source)[0]
  hidden = _matrix_shape(state_dict, "_backbone.h.0.mlp.c_fc.weight", source)[1]
  num_layers = 1 + max(int(m.group(1)) for key in state_dict if (m := _LAYER_KEY.match(key)))
  if hidden % width:
    raise ValueError(
      f"{source}: the MLP width {hidden} ('_backbone.h.0.mlp.c_fc.weight') is not a multiple of "
      f"the model width {width}, so no config.model.mlp_ratio describes it."
    )
  if not (isinstance(num_heads, int) and num_heads >= 1 and width % num_heads == 0):
    raise ValueError(f"num_heads = {num_heads!r} must be a positive divisor of {source}'s model width {width}.")

  layout = _layout(n_dims, width, hidden, n_positions, num_layers)
  unknown = [key for key in state_dict if key not in layout and not _UNUSED_KEY.fullmatch(key)]
  missing = [key for key in layout if key not in state_dict]
  if unknown or missing:
    found = {"unknown keys": unknown, "missing keys": missing}
    raise ValueError(
      f"{source} is not a checkpoint of Garg et al.'s TransformerModel with {num_layers} layers: "
      + "; ".join(f"{what}: {_some(keys)}" for what, keys in found.items() if keys)
      + "."
    )
  for key in state_dict:
    # Our attention is causal by construction: a checkpoint that saved a different mask computed something else.
    if _CAUSAL_MASK_KEY.fullmatch(key):
      mask = np.asarray(state_dict[key])
      if (
        mask.ndim != 4
        or mask.shape[-1] != mask.shape[-2]
        or not np.array_equal(mask[0, 0] != 0, np.tril(np.ones(mask.shape[-2:], dtype=bool)))
      ):
        raise ValueError(f"{source}: {key!r} (shape {mask.shape}) is not GPT-2's causal attention mask.")

  params = {}
  for key, (path, shape, transpose) in layout.items():
    array = np.asarray(state_dict[key], dtype=np.float32)
    if array.shape != shape:
      raise ValueError(
        f"{source}: {key!r} has shape {array.shape}, expected {shape} (for n_dims {n_dims}, width "
        f"{width}, MLP width {hidden}, n_positions {n_positions})."
      )
    if not np.isfinite(array).all():
      raise ValueError(f"{source}: {key!r} has non-finite values.")
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = np.ascontiguousarray(array.T) if transpose else array
  overrides = {
    "model.num_layers": num_layers,
    "model.num_heads": num_heads,
    "model.width": width,
    "model.mlp_ratio": hidden // width,
    "model.n_positions": n_positions,
    "task.n_dims": n_dims,
  }
  return params, overrides


def load_garg_checkpoint(path: str | pathlib.Path, num_heads: int = 8) -> tuple[dict, dict[str, int]]:
  """Reads Garg et al.'s `state.pt` (or a bare state dict such as their `model_STEP.pt`) and converts it.

  Returns `convert_state_dict`'s (params, overrides). Errors name the file.
  """
  path = pathlib.Path(path)
  try:
    import torch  # Deferred: only this conversion needs torch, and it is a large install.
  except ImportError as e:
    raise ImportError(
      "reading Garg et al.'s PyTorch checkpoint needs torch, which is only needed for this "
      "conversion: pip install torch"
    ) from e
  if not path.is_file():
    raise errors.MissingFileError(
      f"{path}: no such file (Garg et al.'s model is linear_regression/pretrained/state.pt "
      "in the models.zip of dtsip/in-context-learning)."
    )
  # Tensors and plain containers only: a pickle can run code. torch < 1.13 (Garg et al.'s environment has 1.11)
  # has no such mode.
  safe = {"weights_only": True} if "weights_only" in inspect.signature(torch.load).parameters else {}
  # torch raises a different exception type for each way a file can be unreadable (KeyError, EOFError,
  # RuntimeError, UnpicklingError, ...).
  try:
    loaded = torch.load(path, map_location="cpu", **safe)
  except Exception as e:
    raise ValueError(
      f"{path} is not a PyTorch checkpoint of tensors that torch.load(weights_only=True) can read "
      f"({errors.one_line(e)})."
    ) from e
  # Garg et al.'s training state holds the model under "model_state_dict" (next to "optimizer_state_dict" and
  # "train_step"); their periodic model_STEP.pt files are the bare state dict.
  if isinstance(loaded, Mapping) and "model_state_dict" in loaded:
    loaded = loaded["model_state_dict"]
  if not (isinstance(loaded, Mapping) and loaded and all(isinstance(v, torch.Tensor) for v in loaded.values())):
    described = f"a dict with keys {_some(loaded)}" if isinstance(loaded, Mapping) else type(loaded).__name__
    raise ValueError(
      f"{path} is not a checkpoint of Garg et al.'s TransformerModel: expected a model state dict "
      f"or a dict holding one under 'model_state_dict', found {described}."
    )
  state_dict = {
    key: value.detach().to(torch.float32).numpy() if value.is_floating_point() else value.numpy()
    for key, value in loaded.items()
  }
  return convert_state_dict(state_dict, num_heads=num_heads, source=str(path))


def garg_config(
  overrides: Mapping[str, int], base: ml_collections.ConfigDict, source: str = "the checkpoint"
) -> ml_collections.ConfigDict:
  """`base` (configs/linreg.py's paper configuration) with the checkpoint's fields; ValueError naming `source`
  if the two do not fit together (e.g. too few positions for the paper's 41 points)."""
  config = ml_collections.ConfigDict(base.to_dict())
  config.update_from_flattened_dict(dict(overrides))
  try:
    evaluate.validate(config, num_devices=1)
  except errors.ConfigError as e:
    raise ValueError(f"{source}: its model does not fit the configuration it is converted into: {e}") from e
  return config


def write_workdir(workdir: str | pathlib.Path, params: dict, config: ml_collections.ConfigDict) -> None:
  """Writes WORKDIR/config.json and the parameters to WORKDIR/garg_params (Orbax)."""
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  config_path = workdir / "config.json"
  current = config_files.config_dict(config)
  if config_path.exists():
    differences = config_files.config_differences(json.loads(config_path.read_text()), current)
    if differences:
      raise ValueError(
        f"{config_path} holds a different configuration; use a new --workdir. Differing fields:\n  "
        + "\n  ".join(differences)
      )
  run_logs.write_atomically(config_path, json.dumps(current, indent=2, sort_keys=True) + "\n")
  with ocp.StandardCheckpointer() as checkpointer:  # Leaving the block waits for the asynchronous save.
    checkpointer.save(workdir / checkpointing.GARG_PARAMS_DIR, params, force=True)
