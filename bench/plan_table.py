"""The README's pod-planning table: the released recipes planned for TPU slices.

  python3 bench/plan_table.py [--jobs 2] [--out bench/plan_table.json] [--only fsdp|]

Runs `python3 -m moby_jax.plan` (one process per row, `--jobs` at a time) for MoBY Swin-T
and DeiT-S at global batch 512 (the paper's) and 4096 on v5e:8x8, v5p:4x4x4, v4:4x4x4 and
v6e:16x16, then `--max-batch` on one v5e chip, then data parallel against FSDP (over all
chips, and within groups of 8 on a data x fsdp mesh) for Swin-T, Swin-B and Swin-L sized
MoBY (the Swin-T recipe with the larger encoder) at global batch 2048 (32 pairs per chip,
the paper's 512 over 16 GPUs) on v5e:8x8, v5p:4x4x4 and v5e:16x16, and prints
the rows as Markdown tables. Rows already in --out are kept (the tables can be built over
several sessions). A Swin-T compile takes 2 to 15 minutes on 2 cores, Swin-B/L about twice
that: run it in the background.
"""

import argparse
import concurrent.futures
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = {"Swin-T": "configs/moby_swin_tiny.py", "DeiT-S": "configs/moby_deit_small.py"}
TOPOLOGIES = ("v5e:8x8", "v5p:4x4x4", "v4:4x4x4", "v6e:16x16")
BATCHES = (512, 4096)
FSDP_MODELS = {"Swin-T": "swin_tiny", "Swin-B": "swin_base", "Swin-L": "swin_large"}
FSDP_TOPOLOGIES = ("v5e:8x8", "v5p:4x4x4", "v5e:16x16")
FSDP_BATCH = 2048
GiB = 2 ** 30


def plan_row(model: str, topology: str, batch: int, *overrides: str) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / "plan.json"
    result = subprocess.run(
        [sys.executable, "-m", "moby_jax.plan", "--config", CONFIGS[model], "--topology",
         topology, "--json", str(out), f"--config.data.batch_size={batch}", *overrides],
        cwd=ROOT, capture_output=True, text=True)
    if not out.exists():
      raise RuntimeError(f"{model} {topology} {batch} {overrides}: {result.stderr[-2000:]}")
    return json.loads(out.read_text())


# Data parallel; FSDP over every device; FSDP within groups of 8 chips (data x fsdp mesh).
FSDP_MODES = {"dp": (False, 0), "fsdp": (True, 0), "fsdp8": (True, 8)}
FSDP_LABELS = {"dp": "data parallel", "fsdp": "FSDP over all chips",
               "fsdp8": "FSDP in groups of 8"}


def fsdp_row(model: str, topology: str, mode: str) -> dict:
  fsdp, group = FSDP_MODES[mode]
  return plan_row("Swin-T", topology, FSDP_BATCH, f"--config.model.name={FSDP_MODELS[model]}",
                  f"--config.parallel.fsdp={fsdp}", f"--config.parallel.fsdp_group={group}")


def max_batch_row(model: str) -> dict:
  result = subprocess.run(
      [sys.executable, "-m", "moby_jax.plan", "--config", CONFIGS[model], "--topology",
       "v5e-1", "--max-batch"], cwd=ROOT, capture_output=True, text=True)
  found = re.search(r"largest global batch that fits: (\d+)", result.stdout)
  return {"model": model, "max_batch_v5e_chip": int(found.group(1)) if found else None,
          "tries": result.stdout}


def _sent_mib(step: dict) -> float:
  """MiB each device sends per step over all the step's collectives (ring estimate)."""
  return sum(c["wire_bytes"] for c in step.get("collectives", {}).values()) / 2 ** 20


def fsdp_markdown(rows: dict) -> str:
  lines = [f"| model | topology | parallel | fits | GiB per device: arguments / temporaries / "
           f"total (of HBM) | all-gather MiB | reduce-scatter MiB | all-reduce MiB | "
           f"MiB sent per device (estimate) | ICI time (estimate) | compile |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for model in FSDP_MODELS:
    for topology in FSDP_TOPOLOGIES:
      for mode in FSDP_MODES:
        r = rows.get(f"fsdp|{model}|{topology}|{mode}")
        if r is None:
          continue
        step = r["programs"]["train_step"]
        memory = step["memory"]
        if "collectives" not in step:  # the compiler refused it: required bytes only
          lines.append(f"| {model} | {topology} | {FSDP_LABELS[mode]} | **no** | "
                       f"needs {memory['total_bytes'] / GiB:.2f} "
                       f"({memory['hbm_bytes'] / GiB:.2f}) | | | | | | |")
          continue
        sent = lambda kind: step["collectives"].get(kind, {}).get("bytes", 0) / 2 ** 20
        ici = r.get("ici_seconds_per_step")
        lines.append(
            f"| {model} | {topology} | {FSDP_LABELS[mode]} | "
            f"{'yes' if memory['fits'] else '**no**'} | "
            f"{memory['argument_bytes'] / GiB:.2f} / {memory['temp_bytes'] / GiB:.2f} / "
            f"{memory['total_bytes'] / GiB:.2f} ({memory['hbm_bytes'] / GiB:.2f}) | "
            f"{sent('all-gather'):.0f} | {sent('reduce-scatter'):.0f} | "
            f"{sent('all-reduce'):.0f} | "
            f"{_sent_mib(step):.0f} | "
            f"{'n/a' if ici is None else f'{ici * 1e3:.1f} ms'} | "
            f"{step['compile_seconds']:.0f} s |")
  return "\n".join(lines)


def markdown(rows: dict) -> str:
  lines = ["| model | global batch | topology | chips | fits | GiB per device (of HBM) | "
           "TFLOP per device per step | collective bytes sent per device per step | "
           "step time at peak (lower bound) | ICI time (estimate) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  def order(key):
    model, topology, batch = key.split("|")
    return list(CONFIGS).index(model), TOPOLOGIES.index(topology), int(batch)

  for key in sorted((k for k in rows if k.count("|") == 2), key=order):
    r = rows[key]
    model, topology, batch = key.split("|")
    step = r["programs"]["train_step"]
    memory = step["memory"]
    ici = r.get("ici_seconds_per_step")
    lines.append(
        f"| {model} | {batch} | {topology} | {r['chips']} | "
        f"{'yes' if memory['fits'] else '**no**'} | "
        f"{memory['total_bytes'] / GiB:.2f} ({memory['hbm_bytes'] / GiB:.2f}) | "
        f"{r['flops']['per_device'] / 1e12:.2f} | {_sent_mib(step):.0f} MiB | "
        f"{r['flops']['lower_bound_step_seconds'] * 1e3:.1f} ms | "
        f"{'n/a' if ici is None else f'{ici * 1e3:.1f} ms'} |")
  for key in sorted(k for k in rows if k.startswith("max_batch|")):
    r = rows[key]
    lines.append(f"\nLargest global batch of {r['model']} on one v5e chip (16 GiB): "
                 f"{r['max_batch_v5e_chip']}")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--jobs", type=int, default=1)
  parser.add_argument("--out", default=str(ROOT / "bench" / "plan_table.json"))
  parser.add_argument("--only", default="", help="compile only the rows whose key starts "
                      "with this, e.g. 'fsdp|' or 'max_batch|' (keys as in --out)")
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  rows = json.loads(out.read_text()) if out.exists() else {}
  todo = {f"{m}|{t}|{b}": (plan_row, (m, t, b))
          for t in TOPOLOGIES for m in CONFIGS for b in BATCHES}
  todo.update({f"max_batch|{m}": (max_batch_row, (m,)) for m in CONFIGS})
  todo.update({f"fsdp|{m}|{t}|{mode}": (fsdp_row, (m, t, mode))
               for m in FSDP_MODELS for t in FSDP_TOPOLOGIES for mode in FSDP_MODES})
  todo = {k: v for k, v in todo.items() if k not in rows and k.startswith(args.only)}
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    futures = {pool.submit(fn, *fn_args): key for key, (fn, fn_args) in todo.items()}
    for future in concurrent.futures.as_completed(futures):
      key = futures[future]
      try:
        rows[key] = future.result()
      except RuntimeError as err:
        print(f"{key}: failed: {err}", flush=True)
        continue
      out.write_text(json.dumps(rows, indent=1) + "\n")
      print(f"{key}: done", flush=True)
  print(markdown(rows))
  print("\nData parallel against FSDP at global batch", FSDP_BATCH)
  print(fsdp_markdown(rows))


if __name__ == "__main__":
  main()
