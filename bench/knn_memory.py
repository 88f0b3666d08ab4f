"""Peak host memory of a kNN pass (pretrain.KnnMonitor) as the training split grows.

  python bench/knn_memory.py                  # 10k and 40k images at 64 px
  python bench/knn_memory.py --sizes 20000,80000 --img_size 64

For each size, a child process builds a kNN monitor of a tiny Swin (`swin_mu`) over a
synthetic source of that many random images (generated on read, so the source itself
holds nothing), runs one pass, and reports its peak RSS. A monitor that keeps only
features and labels grows by about (feature dim x 4 + 4) bytes per image; one that keeps
the decoded images grows by img_size^2 x 3 bytes per image as well.
"""

import argparse
import json
import resource
import subprocess
import sys

import common  # noqa: F401  (import paths)


class RandomImages:
  """`n` uint8 (s, s, 3) images made on read from their index; 10 classes."""
  num_classes = 10
  skipped: list = []

  def __init__(self, n: int, size: int):
    self.n, self.size = n, size

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    import numpy as np
    pixels = np.random.default_rng(i).integers(0, 256, (self.size, self.size, 3), np.uint8)
    return {"image": pixels, "label": i % self.num_classes}


def child(n: int, img_size: int) -> None:
  import jax
  from configs import moby_swin_tiny
  from moby_jax import parallel, pretrain
  from moby_jax.models import build_encoder, init_encoder
  config = moby_swin_tiny.get_config("runlocal")
  config.model.img_size = img_size
  config.data.batch_size = 500
  mesh = parallel.make_mesh(jax.devices()[:1])
  variables = init_encoder(build_encoder(config.model), jax.random.key(0))
  baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  monitor = pretrain.KnnMonitor(config, mesh, RandomImages(n, img_size), RandomImages(1000, img_size))
  result = monitor(variables)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  print(json.dumps({"images": n, "peak_rss_mb": peak / 1024,
                    "growth_mb": (peak - baseline) / 1024, "top1": result["top1"]}))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="10000,40000")
  p.add_argument("--img_size", type=int, default=64)
  p.add_argument("--child", type=int, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    return child(args.child, args.img_size)
  print("| train images | peak RSS (MB) | growth during the kNN pass (MB) |")
  print("| --- | --- | --- |")
  for n in map(int, args.sizes.split(",")):
    out = subprocess.run([sys.executable, __file__, "--child", str(n), "--img_size",
                          str(args.img_size)], capture_output=True, text=True, check=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"| {n} | {row['peak_rss_mb']:.0f} | {row['growth_mb']:.0f} |", flush=True)


if __name__ == "__main__":
  main()
