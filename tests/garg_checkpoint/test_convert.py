"""Garg et al.'s PyTorch model, converted, computes what it computed in PyTorch: predictions and every hidden state.

The PyTorch side is a randomly initialised model of exactly the released structure (Hugging Face GPT2Model with
n_positions 202, width 256, 12 layers, 8 heads, inside Garg et al.'s TransformerModel), saved the way their
training loop saves state.pt.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from torch import nn

from configs import linreg
from icl_jax import checkpointing
from icl_jax import models
from icl_jax.analysis import evaluate
from icl_jax.analysis import probing
from icl_jax.garg_checkpoint import convert

REPO = pathlib.Path(__file__).resolve().parents[2]
N_DIMS, N_POINTS, NUM_LAYERS = 20, 41, 12


class GargTransformer(nn.Module):
  """Garg et al.'s TransformerModel (src/models.py): the attribute names make its state-dict keys."""

  def __init__(self, num_layers: int = NUM_LAYERS):
    super().__init__()
    config = transformers.GPT2Config(
      n_positions=202,
      n_embd=256,
      n_layer=num_layers,
      n_head=8,
      resid_pdrop=0.0,
      embd_pdrop=0.0,
      attn_pdrop=0.0,
      use_cache=False,
      attn_implementation="eager",
    )  # The attention of Garg's transformers 4.17.
    self._read_in = nn.Linear(N_DIMS, 256)
    self._backbone = transformers.GPT2Model(config)
    self._read_out = nn.Linear(256, 1)

  def forward(self, xs_BxNxD, ys_BxN):
    b, n, d = xs_BxNxD.shape
    ys_BxNxD = torch.cat([ys_BxN.view(b, n, 1), xs_BxNxD.new_zeros(b, n, d - 1)], dim=2)
    tokens_BxTxD = torch.stack([xs_BxNxD, ys_BxNxD], dim=2).view(b, 2 * n, d)
    output = self._backbone(inputs_embeds=self._read_in(tokens_BxTxD), output_hidden_states=True)
    return self._read_out(output.last_hidden_state)[:, ::2, 0], torch.stack(output.hidden_states)


def _garg_model(num_layers: int = NUM_LAYERS) -> GargTransformer:
  torch.manual_seed(0)
  model = GargTransformer(num_layers).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      # Hugging Face initialises LayerNorms to scale 1, bias 0 and Conv1D biases to 0: a swapped scale and bias,
      # or a bias left out, would go unnoticed.
      if name.endswith("bias") or ".ln_" in name:
        param.add_(0.2 * torch.randn_like(param))
      # At GPT-2's initial scale every head attends almost uniformly, which would hide a wrong query/key layout.
      if name.endswith("attn.c_attn.weight"):
        param.mul_(5.0)
  return model


def _garg_state_dict(model: GargTransformer) -> dict:
  state_dict = model.state_dict()
  num_layers = model._backbone.config.n_layer
  # transformers 4.17, with which Garg et al. trained, also saved each block's causal mask and mask value.
  causal_1x1xPxP = torch.tril(torch.ones(202, 202, dtype=torch.uint8)).view(1, 1, 202, 202)
  for layer in range(num_layers):
    state_dict[f"_backbone.h.{layer}.attn.bias"] = causal_1x1xPxP
    state_dict[f"_backbone.h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
  return state_dict


@pytest.fixture(scope="module")
def garg(tmp_path_factory):
  """(torch model, path of its state.pt, converted params, config overrides)."""
  model = _garg_model()
  path = tmp_path_factory.mktemp("garg") / "state.pt"
  torch.save({"model_state_dict": _garg_state_dict(model), "optimizer_state_dict": {}, "train_step": 0}, path)
  params, overrides = convert.load_garg_checkpoint(path)
  return model, path, params, overrides


def test_the_released_structure_is_the_paper_config(garg):
  _, _, params, overrides = garg
  paper = linreg.get_config()
  assert convert.garg_config(overrides, linreg.get_config()).to_dict() == paper.to_dict()
  model = models.build_model(paper.model)
  like = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, N_POINTS, N_DIMS)), np.zeros((1, N_POINTS)))
  assert jax.tree.structure(params) == jax.tree.structure(like["params"])
  assert all(
    a.shape == b.shape and a.dtype == np.float32
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(like["params"]))
  )


def test_converted_model_matches_pytorch_predictions_and_every_hidden_state(garg):
  torch_model, _, params, overrides = garg
  rng = np.random.default_rng(0)
  xs_BxNxD = rng.standard_normal((3, N_POINTS, N_DIMS), dtype=np.float32)
  ws_BxD = rng.standard_normal((3, N_DIMS), dtype=np.float32)
  ys_BxN = np.einsum("bnd,bd->bn", xs_BxNxD, ws_BxD)
  with torch.no_grad():
    torch_preds_BxN, torch_hidden_LxBxTxW = torch_model(torch.from_numpy(xs_BxNxD), torch.from_numpy(ys_BxN))

  model = models.build_model(convert.garg_config(overrides, linreg.get_config()).model)
  preds_BxN, hidden_LxBxTxW = model.apply({"params": params}, xs_BxNxD, ys_BxN, return_hidden=True)
  assert hidden_LxBxTxW.shape == torch_hidden_LxBxTxW.shape == (NUM_LAYERS + 1, 3, 2 * N_POINTS, 256)
  for layer in range(NUM_LAYERS + 1):
    np.testing.assert_allclose(
      hidden_LxBxTxW[layer], torch_hidden_LxBxTxW[layer].numpy(), rtol=1e-5, atol=1e-5, err_msg=f"hidden state {layer}"
    )
  np.testing.assert_allclose(preds_BxN, torch_preds_BxN.numpy(), rtol=1e-5, atol=1e-5)
  # Not vacuous: the predictions depend on the context, and are far from the read-out's bias alone.
  assert np.std(preds_BxN) > 0.1


def test_bare_and_in_memory_state_dicts_convert_the_same(garg, tmp_path):
  torch_model, _, params, _ = garg
  path = tmp_path / "model_500000.pt"
  torch.save(torch_model.state_dict(), path)
  bare, _ = convert.load_garg_checkpoint(path)
  jax.tree.map(np.testing.assert_array_equal, bare, params)
  in_memory, _ = convert.convert_state_dict(torch_model.state_dict())
  jax.tree.map(np.testing.assert_array_equal, in_memory, params)


def _command_line(*flags):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # One CPU device is enough to convert.
  return subprocess.run(
    [sys.executable, "-m", "icl_jax.garg_checkpoint", "--config=configs/linreg.py", *flags],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_command_line_writes_a_workdir_that_load_params_restores(garg, tmp_path):
  _, path, params, _ = garg
  result = _command_line(f"--checkpoint={path}", f"--workdir={tmp_path}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads((tmp_path / "config.json").read_text()) == json.loads(linreg.get_config().to_json())
  restored = checkpointing.load_garg_params(tmp_path)
  assert jax.tree.structure(restored) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, restored, params)


def test_command_line_names_a_file_that_is_not_a_checkpoint(tmp_path):
  bad = tmp_path / "state.pt"
  bad.write_text("not a checkpoint")
  result = _command_line(f"--checkpoint={bad}", f"--workdir={tmp_path / 'out'}")
  assert result.returncode == 1
  assert f"error: {bad} is not a PyTorch checkpoint" in result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "out").exists()


def test_missing_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'state.pt'}: no such file")):
    convert.load_garg_checkpoint(tmp_path / "state.pt")


@pytest.mark.parametrize(
  "contents, message",
  [
    ({"train_step": 3}, "found a dict with keys 'train_step'"),
    ({"model_state_dict": {"encoder.weight": torch.zeros(2, 2)}}, "it has no '_read_in.weight'"),
  ],
)
def test_other_pytorch_files_are_named(tmp_path, contents, message):
  path = tmp_path / "state.pt"
  torch.save(contents, path)
  with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
    convert.load_garg_checkpoint(path)


def _numpy_state_dict(model):
  return {key: value.numpy() for key, value in _garg_state_dict(model).items()}


@pytest.mark.parametrize(
  "edit, message",
  [
    (lambda sd: sd.pop("_backbone.h.7.ln_2.bias"), r"missing keys: '_backbone.h.7.ln_2.bias'"),
    (
      lambda sd: sd.update({"_backbone.h.3.attn.q_proj.weight": np.zeros((256, 256))}),
      r"unknown keys: '_backbone.h.3.attn.q_proj.weight'",
    ),
    (
      lambda sd: sd.update({"_backbone.h.2.attn.c_proj.weight": np.zeros((256, 255))}),
      r"'_backbone.h.2.attn.c_proj.weight' has shape \(256, 255\), expected \(256, 256\)",
    ),
    (lambda sd: sd.update({"_read_out.weight": np.full((1, 256), np.nan)}), r"'_read_out.weight' has non-finite"),
    (lambda sd: sd.update({"_backbone.h.0.attn.bias": np.ones((1, 1, 202, 202))}), r"not GPT-2's causal attention"),
  ],
)
def test_bad_state_dicts_name_the_source_and_the_key(garg, edit, message):
  state_dict = _numpy_state_dict(garg[0])
  edit(state_dict)
  with pytest.raises(ValueError, match=r"^state\.pt.*" + message):
    convert.convert_state_dict(state_dict, source="state.pt")


def test_num_heads_must_divide_the_width(garg):
  with pytest.raises(ValueError, match="num_heads = 7 must be a positive divisor of state.pt's model width 256"):
    convert.convert_state_dict(_numpy_state_dict(garg[0]), num_heads=7, source="state.pt")


@pytest.mark.parametrize("num_layers", [3, 6])
def test_garg_small_and_tiny_models_convert_and_evaluate(num_layers, tmp_path):
  """Garg et al.'s Tiny (3 layers) and Small (6) structures: the paper configuration takes any depth, and the
  fit layers adapt to it."""
  path = tmp_path / "state.pt"
  torch.save({"model_state_dict": _garg_state_dict(_garg_model(num_layers))}, path)
  result = _command_line(f"--checkpoint={path}", f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 0, result.stderr[-3000:]
  config = checkpointing.load_saved_config(tmp_path / "run")
  assert config.model.num_layers == num_layers and config.eval.fit_layers is None
  config.eval.update(
    num_prompts=64, probe_prompts=32, sim_w_prompts=2, sim_w_queries=24, bootstrap_samples=50, batch_size=32
  )
  results = evaluate.evaluate(config, tmp_path / "run")
  assert results["fits"]["layers"] == list(probing.fit_layers(config)) == [num_layers // 5 + 1, -(-3 * num_layers // 4)]
  assert len(results["best_match"]["newton"]) == num_layers and (tmp_path / "run" / "eval" / "results.json").exists()
