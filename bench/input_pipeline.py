"""Throughput of the host input pipeline on ImageNet-like JPEGs (no accelerator involved).

  python bench/input_pipeline.py                      # 224 px, batch 64, workers 1 and 2
  python bench/input_pipeline.py --workers 1,2,4,8 --images 1024

Writes `--images` photograph-like JPEGs (moby_jax/data/synthetic.py: natural-image
spectrum, quality 90, ImageNet's spread of sizes, mean about 400 x 350 px, up to 2000 px)
into an image folder (cached between runs), then reports:

1. the cost of one two-view example on one core, split into header, decode and
   crop/resize/flip (the transform alone, no loader);
2. MoBY two-view pairs/s of `pretrain_loader` for each worker mode (threads, processes)
   and worker count, with the scaling efficiency against one worker;
3. images/s of the evaluation transform (resize + centre crop) through `eval_loader`
   (over the same images).

Loader rates are the median over `--repeats` one-epoch windows after one untimed epoch
(worker start-up excluded; whole epochs count every image equally, since a few large
images cost much more than the rest; the median because a shared machine is noisy),
while the main process only takes batches, as the training loop does when the
accelerator keeps up. "pairs per CPU-second" counts the CPU time of the main process and
its workers: the per-core rate, whatever else runs on the machine.
"""

import argparse
import json
import os
import pathlib
import statistics
import tempfile
import time

import numpy as np

import common  # noqa: F401  (import paths)
from moby_jax.data import loader, sources, synthetic, transforms


def image_folder(count: int, seed: int) -> pathlib.Path:
  """DIR/train/c<k>/<i>.JPEG with `count` images (cached between runs)."""
  root = pathlib.Path(tempfile.gettempdir()) / f"moby_bench_jpegs_{count}_{seed}"
  done = root / "complete"
  if done.exists():
    return root
  print(f"writing {count} ImageNet-like JPEGs to {root} (once)...", flush=True)
  rng = np.random.default_rng(seed)
  for i in range(count):
    folder = root / "train" / f"c{i % 8}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{i}.JPEG").write_bytes(
        synthetic.jpeg(synthetic.photo(rng, *synthetic.image_size(rng))))
  done.touch()
  return root


def config_for(root, size, batch, mode, workers, steps_per_epoch):
  from configs import moby_swin_tiny
  c = moby_swin_tiny.get_config()
  c.model.img_size = size
  c.data.update(dataset="folder", path=str(root), batch_size=batch, worker_mode=mode,
                num_workers=workers)
  c.train.steps_per_epoch = steps_per_epoch
  return c


def breakdown(files, size: int) -> dict:
  """Per two-view example on one core, ms: header, decode, crop + resize + flip."""
  rng = np.random.default_rng(0)
  data = [pathlib.Path(f).read_bytes() for f in files]
  t_header = t_decode = t_crop = 0.0
  for blob in data:
    start = time.perf_counter()
    image = transforms.Decoded(blob)
    boxes = [transforms.crop_box(rng, image.width, image.height) for _ in range(2)]
    t1 = time.perf_counter()
    pixels, factors = image.decode(max(size / min(w, h) for _, _, w, h in boxes))
    t2 = time.perf_counter()
    for box in boxes:
      transforms.cv2.flip(transforms.resize_box(pixels, box, factors, (size, size)), 1)
    t3 = time.perf_counter()
    t_header += t1 - start
    t_decode += t2 - t1
    t_crop += t3 - t2
  n = len(data)
  return {"header_ms": 1e3 * t_header / n, "decode_ms": 1e3 * t_decode / n,
          "crops_ms": 1e3 * t_crop / n, "pairs_per_s": n / (t_header + t_decode + t_crop)}


def cpu_seconds() -> float:
  """CPU time (user + system) of this process and all its descendants so far (Linux)."""
  tick = os.sysconf("SC_CLK_TCK")
  total, pending = 0.0, [os.getpid()]
  while pending:
    pid = pending.pop()
    try:
      fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
      total += (int(fields[11]) + int(fields[12])) / tick
      for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        pending += [int(c) for c in (task / "children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):  # exited meanwhile
      continue
  return total


def loader_rate(make, batch: int, warmup: int, steps: int, repeats: int) -> tuple[float, float]:
  """Medians over `repeats` windows of `steps` batches (after `warmup` untimed ones) of
  a loader's rows/s and rows per CPU-second of all processes."""
  rates, per_cpu = [], []
  with make() as it:
    for _ in range(warmup):
      next(it)
    for _ in range(repeats):
      start, cpu = time.perf_counter(), cpu_seconds()
      for _ in range(steps):
        next(it)
      rates.append(steps * batch / (time.perf_counter() - start))
      per_cpu.append(steps * batch / (cpu_seconds() - cpu))
  return statistics.median(rates), statistics.median(per_cpu)


class _eval_passes:
  """`passes` consecutive passes of eval_loader over `source`, as one loader."""

  def __init__(self, config, source, passes: int):
    self.loaders = [loader.eval_loader(config, source) for _ in range(passes)]
    self.batches = (b for it in self.loaders for b in it)

  def __enter__(self):
    return self.batches

  def __exit__(self, *exc):
    for it in self.loaders:
      it.close()


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--images", type=int, default=512)
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
  p.add_argument("--modes", default="threads,processes")
  p.add_argument("--repeats", type=int, default=5,
                 help="timed one-epoch windows per measurement (the median is reported)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", help="also write the results here")
  args = p.parse_args()

  root = image_folder(args.images, args.seed)
  train = sources.FolderSource.scan(str(root), "train")
  sizes = [transforms.Decoded(pathlib.Path(f).read_bytes()) for f in train.files]
  print(f"{len(train)} JPEGs, mean {np.mean([s.width for s in sizes]):.0f}"
        f" x {np.mean([s.height for s in sizes]):.0f} px, "
        f"{np.mean([pathlib.Path(f).stat().st_size for f in train.files]) / 1e3:.0f} kB; "
        f"{args.size} px crops, batch {args.batch}\n", flush=True)

  parts = breakdown(train.files, args.size)
  print("one core, transform only (ms per two-view example):")
  print(f"  header {parts['header_ms']:.2f} | decode {parts['decode_ms']:.2f} | "
        f"2 crops + resize + flip {parts['crops_ms']:.2f} | "
        f"= {parts['pairs_per_s']:.0f} pairs/s\n", flush=True)

  workers = [int(w) for w in args.workers.split(",")]
  steps_per_epoch = len(train) // args.batch
  rows = []
  print("| loader | workers | pairs/s | pairs/s per worker | scaling vs 1 worker | "
        "pairs per CPU-second |")
  print("| --- | --- | --- | --- | --- | --- |")
  for mode in args.modes.split(","):
    base = None
    for n in workers:
      config = config_for(root, args.size, args.batch, mode, n, steps_per_epoch)
      rate, per_cpu = loader_rate(lambda: loader.pretrain_loader(config, train), args.batch,
                                  steps_per_epoch, steps_per_epoch, args.repeats)
      base = rate / n if base is None else base
      scaling = rate / (base * n)
      rows.append({"loader": "pretrain", "mode": mode, "workers": n, "rate": rate,
                   "per_cpu_second": per_cpu, "scaling": scaling})
      print(f"| pretrain, {mode} | {n} | {rate:.0f} | {rate / n:.0f} | {scaling:.2f} | "
            f"{per_cpu:.0f} |", flush=True)
  for n in workers:
    config = config_for(root, args.size, args.batch, "threads", n, steps_per_epoch)
    # The eval transform over the train images (a bigger set), one pass per window.
    rate, per_cpu = loader_rate(lambda: _eval_passes(config, train, args.repeats + 1),
                                args.batch, steps_per_epoch, steps_per_epoch, args.repeats)
    rows.append({"loader": "eval", "mode": "threads", "workers": n, "rate": rate,
                 "per_cpu_second": per_cpu})
    print(f"| eval (images/s), threads | {n} | {rate:.0f} | {rate / n:.0f} | | "
          f"{per_cpu:.0f} |", flush=True)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps({"breakdown": parts, "loaders": rows},
                                                  indent=2))


if __name__ == "__main__":
  main()
