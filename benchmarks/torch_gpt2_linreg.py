"""The PyTorch + Hugging Face training step that icl_jax's own is timed against (`python -m icl_jax.bench
--benchmark=train_step --torch_python=PYTHON`): Garg et al.'s set-up as their code runs it, a GPT2Model fed
`inputs_embeds` between a linear read-in and read-out, Adam, the squared error over every x position.

  PYTHON benchmarks/torch_gpt2_linreg.py --layers 12 --embd 256 --heads 8 --dims 20 --points 41 --batch 64

prints one JSON line: the mean time of a step after warm-up, in whatever device torch sees. Needs torch and
transformers (`pip install -e .[dev]`).
"""

import argparse
import json
import time

import torch
import transformers


class Regressor(torch.nn.Module):
  """Tokens x_1, [y_1, 0, ...], x_2, ... -> read-in -> GPT-2 -> read-out at the x positions."""

  def __init__(self, args: argparse.Namespace):
    super().__init__()
    config = transformers.GPT2Config(
      n_positions=2 * args.points,
      n_embd=args.embd,
      n_layer=args.layers,
      n_head=args.heads,
      resid_pdrop=0.0,
      embd_pdrop=0.0,
      attn_pdrop=0.0,
      use_cache=False,
    )
    self.read_in = torch.nn.Linear(args.dims, args.embd)
    self.backbone = transformers.GPT2Model(config)
    self.read_out = torch.nn.Linear(args.embd, 1)

  def forward(self, xs_BxNxD: torch.Tensor, ys_BxN: torch.Tensor) -> torch.Tensor:
    y_tokens_BxNxD = torch.nn.functional.pad(ys_BxN[..., None], (0, xs_BxNxD.shape[-1] - 1))
    tokens_BxTxD = torch.stack([xs_BxNxD, y_tokens_BxNxD], dim=2).flatten(1, 2)
    hidden_BxTxW = self.backbone(inputs_embeds=self.read_in(tokens_BxTxD)).last_hidden_state
    return self.read_out(hidden_BxTxW[:, ::2])[..., 0]


def time_steps(args: argparse.Namespace) -> dict:
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.manual_seed(args.seed)
  model = Regressor(args).to(device)
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

  def step() -> torch.Tensor:
    xs_BxNxD = torch.randn(args.batch, args.points, args.dims, device=device)
    ys_BxN = torch.einsum("bnd,bd->bn", xs_BxNxD, torch.randn(args.batch, args.dims, device=device))
    loss = torch.mean(torch.square(model(xs_BxNxD, ys_BxN) - ys_BxN))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss

  def synchronise():
    if device.type == "cuda":
      torch.cuda.synchronize()

  for _ in range(args.warmup):
    step()
  synchronise()
  start = time.perf_counter()
  for _ in range(args.steps):
    loss = step()
  synchronise()
  seconds = (time.perf_counter() - start) / args.steps
  return {
    "impl": "torch + transformers GPT2Model",
    "device": str(device),
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "threads": torch.get_num_threads(),
    "params": sum(p.numel() for p in model.parameters()),
    "ms_per_step": 1e3 * seconds,
    "steps_per_s": 1 / seconds,
    "final_loss": float(loss.detach()),
    **vars(args),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  for name, default in (
    ("layers", 12),
    ("embd", 256),
    ("heads", 8),
    ("dims", 20),
    ("points", 41),
    ("batch", 64),
    ("steps", 10),
    ("warmup", 3),
    ("seed", 0),
  ):
    parser.add_argument(f"--{name}", type=int, default=default)
  print(json.dumps(time_steps(parser.parse_args())), flush=True)


if __name__ == "__main__":
  main()
