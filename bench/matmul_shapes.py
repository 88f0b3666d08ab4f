"""The matmuls of a Swin-T MoBY step, one by one: XLA (jax.jit) vs PyTorch on this machine.

  python bench/matmul_shapes.py --batch 8

Most of a CPU step is matmuls (bench/train_step.py --breakdown). This times each Linear
of Swin-T as the step runs it, at the step's batch: the forward product X W, and the two
products of its backward pass, dX = dY W^T and dW = X^T dY, plus the windowed attention
products, in float32, each framework with all cores. When XLA is slower here, the step
cannot be faster than PyTorch by changing the model code: the difference is in the
matmul kernels (XLA:CPU's YNNPACK/Eigen vs PyTorch's oneDNN/MKL).
"""

import argparse

import numpy as np

from common import median_seconds  # sets the import paths

# Swin-T stage by stage: (tokens per image, channels, heads, blocks); window 7 (49 tokens),
# MLP ratio 4.
STAGES = ((56 * 56, 96, 3, 2), (28 * 28, 192, 6, 2), (14 * 14, 384, 12, 6), (7 * 7, 768, 24, 2))


def shapes(batch: int):
  """[(name, a shape, b shape, transpose a, transpose b, times per view)] at `batch`."""
  out = []
  for stage, (tokens, c, heads, blocks) in enumerate(STAGES):
    m = batch * tokens
    for name, k, n in (("qkv", c, 3 * c), ("proj", c, c), ("fc1", c, 4 * c),
                       ("fc2", 4 * c, c)):
      out.append((f"s{stage} {name} X W", (m, k), (k, n), False, False, blocks))
      out.append((f"s{stage} {name} dY W^T", (m, n), (k, n), False, True, blocks))
      out.append((f"s{stage} {name} X^T dY", (m, k), (m, n), True, False, blocks))
    windows = batch * tokens // 49 * heads
    out.append((f"s{stage} attn q k^T", (windows, 49, 32), (windows, 49, 32), False, True,
                blocks))
    out.append((f"s{stage} attn p v", (windows, 49, 49), (windows, 49, 32), False, False,
                blocks))
  return out


def flops(a, b, ta, tb):
  m, k = (a[-1], a[-2]) if ta else (a[-2], a[-1])
  n = b[-2] if tb else b[-1]
  return 2 * m * k * n * (a[0] if len(a) == 3 else 1)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=8, help="images (one view)")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  import torch

  rng = np.random.default_rng(0)
  print(f"float32 matmuls of Swin-T at batch {args.batch}; GFLOP/s, median of {args.repeats}")
  print(f"| product | shapes | GFLOP | jax ms | torch ms | jax GFLOP/s | torch GFLOP/s |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  totals = {"jax": 0.0, "torch": 0.0}
  total_flops = 0
  for name, sa, sb, ta, tb, times in shapes(args.batch):
    a = rng.normal(size=sa).astype(np.float32)
    b = rng.normal(size=sb).astype(np.float32)
    swap = lambda x, t: jnp.swapaxes(x, -1, -2) if t else x
    fn = jax.jit(lambda x, y: jnp.matmul(swap(x, ta), swap(y, tb)))
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    jax_s = median_seconds(lambda: fn(ja, jb).block_until_ready(), 2, args.repeats)
    tswap = lambda x, t: x.transpose(-1, -2) if t else x
    xa, xb = torch.from_numpy(a), torch.from_numpy(b)
    torch_s = median_seconds(lambda: torch.matmul(tswap(xa, ta), tswap(xb, tb)), 2,
                             args.repeats)
    f = flops(sa, sb, ta, tb)
    total_flops += f * times
    totals["jax"] += jax_s * times
    totals["torch"] += torch_s * times
    print(f"| {name} | {sa} {sb} | {f / 1e9:.2f} | {jax_s * 1e3:.1f} | {torch_s * 1e3:.1f} | "
          f"{f / jax_s / 1e9:.0f} | {f / torch_s / 1e9:.0f} |")
  # Each Linear's three products and the attention's two as one view of the step runs them.
  print(f"| all, weighted by blocks | | {total_flops / 1e9:.1f} | {totals['jax'] * 1e3:.0f} | "
        f"{totals['torch'] * 1e3:.0f} | {total_flops / totals['jax'] / 1e9:.0f} | "
        f"{total_flops / totals['torch'] / 1e9:.0f} |")


if __name__ == "__main__":
  main()
