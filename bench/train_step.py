"""Throughput of the MoBY train step: moby_jax vs an independent PyTorch MoBY, same machine.

  python bench/train_step.py --config moby_swin_tiny --batch 64 --dtype float32
  python bench/train_step.py --config moby_deit_small --batch 256 --dtype bfloat16
  python bench/train_step.py --batch 128 --dtype bfloat16 --views batch --remat dots
  python bench/train_step.py --config moby_swin_tiny --batch 8 --breakdown
  python bench/train_step.py --config moby_swin_tiny --batch 128 --trace /tmp/trace

Each framework runs in its own child process (so peak RSS is its own): build the model,
`--warmup` untimed steps (compilation included there), then the median of `--repeats`
timed steps. Prints image pairs/s, step time, peak host RSS, the host's CPU use over the
timed steps (cores busy, system time and page faults per step), and for JAX the FLOPs per
step (moby_jax.costs.step_flops: the count training runs and the pod planner use) and MFU
when the device's peak is in moby_jax.costs.PEAKS (or given with --peak-tflops); with
--trace, a profiler trace of three more steps and the operations that took the most
device time in it (bench/breakdown.py). The views are random normalised images fed as
device arrays, and per-pixel augmentation is off in both, so the model step alone is
measured. PyTorch uses tests/torch_moby_reference.py with the same architecture, batch
and optimizer (bf16 autocast on CUDA when --dtype bfloat16).
"""

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys

from common import timed_steps  # sets the import paths

# glibc malloc settings (--malloc). XLA:CPU takes a step's temporary buffers as one
# allocation (1.8 GB for Swin-T at batch 8), which glibc serves with a fresh mmap and
# unmaps at the end of the step: every step faults it in again, page by page.
TRACED_STEPS = 3  # --trace
MALLOC_TUNABLES = {
    "default": "",
    "hugepages": "glibc.malloc.hugetlb=1",
    "keep": "glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
            "glibc.malloc.trim_threshold=68719476736",
}


def load_config(args):
  config = importlib.import_module(f"configs.{args.config}").get_config(args.arg)
  config.data.batch_size = args.batch
  config.model.dtype = args.dtype
  config.model.remat = args.remat
  config.train.views_in_scan = args.views == "scan"
  config.augment.on_device = False
  config.moby.queue_size = max(config.moby.queue_size // args.batch, 1) * args.batch
  return config


def bench_jax(args) -> dict:
  import jax
  import numpy as np
  import moby_jax
  from moby_jax import costs, parallel

  config = load_config(args)
  mesh = parallel.make_mesh()
  state = moby_jax.create_train_state(config, jax.random.key(0), mesh)
  step = moby_jax.make_train_step(config, mesh)
  size = config.model.img_size
  rng = np.random.default_rng(0)
  batch = parallel.to_global(
      {k: rng.normal(size=(args.batch, size, size, 3)).astype(np.float32)
       for k in ("view1", "view2")}, mesh)
  flops = costs.step_flops(config)
  holder = {"state": state}

  def run_step():
    holder["state"], metrics = step(holder["state"], batch)
    metrics["loss"].block_until_ready()

  timing = timed_steps(run_step, args.warmup, args.repeats)
  seconds = timing["seconds"]
  breakdown = None
  if args.breakdown:
    from breakdown import jax_breakdown
    hlo = step.jitted.lower(holder["state"], batch).compile().as_text()
    breakdown = jax_breakdown(hlo, run_step)
  kind = jax.devices()[0].device_kind
  peak = args.peak_tflops or costs.peak_tflops(kind, args.dtype)
  out = dict(framework="jax", device=f"{jax.device_count()} x {kind}", **timing,
             pairs_per_s=args.batch / seconds, flops_per_step=flops)
  if peak and flops:
    out["mfu"] = flops / seconds / (peak * 1e12 * jax.device_count())
  memory = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in memory:
    out["peak_device_gib"] = memory["peak_bytes_in_use"] / 2 ** 30
  if breakdown:
    out["breakdown"] = breakdown
  if args.trace:
    from breakdown import top_operations
    os.makedirs(args.trace, exist_ok=True)
    jax.profiler.start_trace(args.trace)
    for _ in range(TRACED_STEPS):
      run_step()
    jax.profiler.stop_trace()
    out["trace"] = args.trace
    out["top_operations"] = top_operations(args.trace, TRACED_STEPS)
  return out


def bench_torch(args) -> dict:
  import torch
  import torch_moby_reference as tmoby

  config = load_config(args)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  net = tmoby.like(config, total_steps=1_000_000).to(device)
  opt = tmoby.make_optimizer(net, lr=1e-4, weight_decay=config.optim.weight_decay)
  size = config.model.img_size
  views = [torch.randn(args.batch, 3, size, size, device=device) for _ in range(2)]
  autocast = torch.autocast(device, dtype=torch.bfloat16,
                            enabled=args.dtype == "bfloat16" and device == "cuda")

  def run_step():
    with autocast:
      tmoby.train_step(net, opt, views[0], views[1], clip_grad=config.optim.clip_grad)
    if device == "cuda":
      torch.cuda.synchronize()

  timing = timed_steps(run_step, args.warmup, args.repeats)
  name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
  out = dict(framework="torch", device=name, **timing,
             pairs_per_s=args.batch / timing["seconds"])
  if args.breakdown:
    from breakdown import torch_breakdown
    out["breakdown"] = torch_breakdown(run_step)
  if device == "cuda":
    out["peak_device_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="moby_swin_tiny", help="a module of configs/")
  parser.add_argument("--arg", default=None, help="get_config argument, e.g. runlocal")
  parser.add_argument("--batch", type=int, default=64, help="global batch (image pairs)")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--views", default="scan", choices=["scan", "batch"],
                      help="JAX: the two views one after the other or as one batch")
  parser.add_argument("--remat", default="none", choices=["none", "full", "dots"],
                      help="JAX: rematerialisation of the blocks")
  parser.add_argument("--frameworks", default="jax,torch", help="which to run, in order")
  parser.add_argument("--json", help="append one JSON line per framework to this file")
  parser.add_argument("--breakdown", action="store_true",
                      help="also profile two steps and split their time by kind of "
                           "operation (matmul, layout, reduction, elementwise) and, for "
                           "JAX, by part of the model (bench/breakdown.py)")
  parser.add_argument("--trace", metavar="DIR",
                      help="JAX: also trace three steps with jax.profiler into DIR (open "
                           "with TensorBoard's profile plugin or ui.perfetto.dev) and print "
                           "the operations that took the most time")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--peak-tflops", type=float, default=None,
                      help="per-device peak for MFU when the device is not in the table")
  parser.add_argument("--malloc", default="default", choices=sorted(MALLOC_TUNABLES),
                      help="glibc malloc settings for both frameworks (GLIBC_TUNABLES): "
                           "default; hugepages (transparent huge pages for large "
                           "allocations: ~10x fewer page faults); keep (huge pages, one "
                           "arena and no mmap: freed memory is reused, never returned to "
                           "the kernel, so a step's buffers cost no page faults)")
  parser.add_argument("--only", choices=["jax", "torch"], default=None,
                      help="run one framework in this process (used by the parent)")
  args = parser.parse_args()

  if args.only:
    result = (bench_jax if args.only == "jax" else bench_torch)(args)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print("RESULT " + json.dumps(result))
    return

  env = dict(os.environ)
  if MALLOC_TUNABLES[args.malloc]:
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"),
                                                   MALLOC_TUNABLES[args.malloc]]))
  results = {}
  for framework in args.frameworks.split(","):
    cmd = [sys.executable, __file__, "--only", framework] + sys.argv[1:]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
      print(f"{framework} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
      sys.exit(1)
    results[framework] = json.loads(lines[-1][len("RESULT "):])

  print(f"MoBY step, {args.config} ({args.arg or 'default'}), global batch {args.batch}, "
        f"{args.dtype}, views {args.views}, remat {args.remat}, median of {args.repeats} "
        f"after {args.warmup} warm-up steps"
        f"{'' if args.malloc == 'default' else ', malloc ' + args.malloc}")
  for name, r in results.items():
    extra = ""
    if r.get("flops_per_step"):
      extra += f"  {r['flops_per_step'] / 1e9:.1f} GFLOP/step"
    if "mfu" in r:
      extra += f"  MFU {100 * r['mfu']:.1f}%"
    if "peak_device_gib" in r:
      extra += f"  peak device memory {r['peak_device_gib']:.1f} GiB"
    print(f"  {name:6s} {r['device']:>24s}: {r['pairs_per_s']:9.2f} pairs/s  "
          f"{r['seconds'] * 1e3:9.1f} ms/step  peak RSS {r['peak_rss_gib']:.2f} GiB{extra}")
    print(f"  {'':6s} {'':>24s}  host: {r['cores_busy']:.2f} cores busy, "
          f"{r['system_s_per_step'] * 1e3:.0f} ms system time and "
          f"{r['page_faults_per_step']:,.0f} page faults per step")
  if len(results) == 2:
    ratio = results["jax"]["pairs_per_s"] / results["torch"]["pairs_per_s"]
    print(f"  ratio jax / torch: {ratio:.2f}x")
  if "top_operations" in results.get("jax", {}):
    r = results["jax"]
    print(f"\nOperations that took the most time in {TRACED_STEPS} traced steps "
          f"(trace in {r['trace']}), ms per step:")
    for where, name, ms in r["top_operations"]:
      print(f"  {ms:9.2f}  {name}  [{where}]")
  if args.breakdown:
    from breakdown import table
    print("\nTime by kind of operation over two profiled steps (bench/breakdown.py):")
    print(table({name: r["breakdown"] for name, r in results.items()}))
    flops = results.get("jax", {}).get("flops_per_step")
    if flops:
      rates = []
      for name, r in results.items():
        b = r["breakdown"]
        matmul_ms = b.get("wall", b["kinds"]).get("matmul")
        if matmul_ms:
          rates.append(f"{name} {flops / matmul_ms / 1e6:.0f}")
      print("\nMatmul rate in the step (model FLOPs per step over matmul time, wall time "
            "for JAX), GFLOP/s: " + ", ".join(rates))
  if args.json:
    with open(args.json, "a") as f:
      for r in results.values():
        f.write(json.dumps(dict(r, config=args.config, batch=args.batch, dtype=args.dtype,
                                views=args.views, remat=args.remat,
                                malloc=args.malloc)) + "\n")


if __name__ == "__main__":
  main()
