"""Forward throughput of a backbone: moby_jax (Flax) vs the PyTorch reference, same machine.

  python bench/backbone_forward.py --model swin_tiny --batch 8 [--dtype bfloat16]

Prints images/s for both (median of --repeats timed calls after --warmup untimed ones)
and their ratio. The PyTorch model is the independent reference of the tests
(tests/torch_reference.py), run in eval mode under torch.inference_mode (with bf16
autocast when --dtype bfloat16 on CUDA).
"""

import argparse

from common import median_seconds  # sets the import paths
import jax
import numpy as np
import torch

from moby_jax.models import build_encoder, init_encoder
import torch_reference


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="swin_tiny")
  parser.add_argument("--img-size", type=int, default=None)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  model = build_encoder(dict(name=args.model, img_size=args.img_size, dtype=args.dtype))
  variables = init_encoder(model, jax.random.key(0))
  x = np.random.default_rng(0).normal(size=(args.batch, *model.image_hw, 3)).astype(np.float32)
  x_dev = jax.device_put(x)
  forward = jax.jit(model.apply)
  jax_s = median_seconds(lambda: forward(variables, x_dev).block_until_ready(),
                          args.warmup, args.repeats)

  device = "cuda" if torch.cuda.is_available() else "cpu"
  net = torch_reference.like(model).to(device).eval()
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(device)
  autocast = torch.autocast(device, dtype=torch.bfloat16,
                            enabled=args.dtype == "bfloat16" and device == "cuda")

  def torch_step():
    with torch.inference_mode(), autocast:
      net(xt)
    if device == "cuda":
      torch.cuda.synchronize()

  torch_s = median_seconds(torch_step, args.warmup, args.repeats)
  print(f"{args.model} {model.image_hw[0]}px batch {args.batch} {args.dtype} on "
        f"{jax.devices()[0].device_kind} / torch {device}")
  print(f"  moby_jax : {args.batch / jax_s:10.1f} images/s")
  print(f"  PyTorch  : {args.batch / torch_s:10.1f} images/s")
  print(f"  ratio    : {torch_s / jax_s:10.2f}x")


if __name__ == "__main__":
  main()
