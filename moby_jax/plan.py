"""Plan a pod run from a laptop: compile the real step for a TPU slice without the TPUs.

  python3 -m moby_jax.plan --config configs/moby_swin_tiny.py --topology v5p-128
  python3 -m moby_jax.plan --config configs/quickstart.py --topology v5e:2x2 --json plan.json
  python3 -m moby_jax.plan --config configs/moby_swin_tiny.py --topology v5e:8x8 --max-batch

Builds the run exactly as train.py does (`moby_jax.run.Pretraining`: the same config
checks, branches, optimizer, abstract state, shardings and jitted step; with
eval.enabled also the linear probe's step), compiles it for the devices of the topology
that libtpu describes (`jax.experimental.topologies`, no TPU needed), and reports per
device: memory against the chip's HBM (FITS / DOES NOT FIT), FLOPs per step, the
lower-bound step time at the chip's peak, and every collective with its bytes and an
estimate of its interconnect time. Exits 1 when the run does not fit or the config is
wrong, so scripts (launch/tpu_pod.sh) can gate on it.

Needs libtpu: `python3 -m pip install -r requirements-plan.txt`.
"""

# Compile for described devices only: never start a local accelerator backend (libtpu
# would look for TPU chips), and let several planners load libtpu at once.
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from moby_jax import costs, evaluate, files, parallel  # noqa: E402
from moby_jax.data import embedded  # noqa: E402
from moby_jax.data import loader as loaders  # noqa: E402

GiB = 2 ** 30
INSTALL = "python3 -m pip install -r requirements-plan.txt"


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation, per chip. Sources: the Cloud TPU system-architecture pages
  (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e); the peak rates are costs.PEAKS (the
  table MFU uses). The pages' HBM figures say GB or GiB for the same number; they are
  taken as GiB, the compiler's unit (it reports 15.75 GiB of a v5e chip's 16 as available
  to a program)."""
  peak_bf16_tflops: float
  hbm_gib: float
  ici_gbytes_per_s: float | None   # bidirectional inter-chip interconnect; None: not given
  devices_per_chip: int            # JAX devices per chip in a libtpu topology description
  torus_dims: int                  # 2-D (v5e, v6e) or 3-D (v4, v5p) slices
  type_counts: str                 # what the accelerator-type name counts: chips or cores


CHIPS = {
    # v4: 2 TensorCores per chip; libtpu describes each as a device (no megacore).
    "v4": Chip(costs.PEAKS["TPU v4"].bf16, 32, None, 2, 3, "cores"),
    "v5e": Chip(costs.PEAKS["TPU v5e"].bf16, 16, 400, 1, 2, "chips"),
    "v5p": Chip(costs.PEAKS["TPU v5p"].bf16, 95, 1200, 1, 3, "cores"),
    "v6e": Chip(costs.PEAKS["TPU v6e"].bf16, 32, 800, 1, 2, "chips"),
}
# Accelerator-type prefixes (`gcloud compute tpus tpu-vm create --accelerator-type`).
TYPE_PREFIXES = {"v4": "v4", "v5e": "v5e", "v5litepod": "v5e", "v5p": "v5p", "v6e": "v6e"}
EXAMPLES = "v5e:2x2, v5e:8x8, v5p:4x4x4, v4:2x2x4, v6e:16x16, v5litepod-16, v5p-128, v4-32, v6e-256"


@dataclasses.dataclass(frozen=True)
class Topology:
  generation: str
  dims: tuple[int, ...]     # chips along each torus axis
  name: str                 # as the user wrote it

  @property
  def chip(self) -> Chip:
    return CHIPS[self.generation]

  @property
  def chips(self) -> int:
    return math.prod(self.dims)

  @property
  def libtpu_name(self) -> str:
    return f"{self.generation}:{'x'.join(map(str, self.dims))}"


def _slice_dims(chips: int, torus_dims: int) -> tuple[int, ...]:
  """The slice shape of `chips` chips (a power of two, at least 4), as Cloud TPU shapes
  them: 2-D 2x2, 2x4, 4x4, 4x8, 8x8, ...; 3-D 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ..."""
  if torus_dims == 2:
    dims = [2, 2]
    while math.prod(dims) < chips:
      dims[1 if dims[0] == dims[1] else 0] *= 2
    return tuple(dims)
  dims = [2, 2, 1]
  while math.prod(dims) < chips:
    if dims[2] == 1:
      dims[2] = 2
    elif dims[0] == dims[1] == dims[2]:
      dims[2] *= 2
    else:
      dims[max(i for i, d in enumerate(dims) if d == min(dims))] *= 2
  return tuple(dims)


def parse_topology(name: str) -> Topology:
  """`gen:AxB[xC]` (libtpu's names) or an accelerator type (`v5p-128`: TensorCores for v4
  and v5p, chips for v5e/v5litepod and v6e). Raises ValueError with accepted examples."""
  text = name.strip().lower()
  if m := re.fullmatch(r"(v\w+?):(\d+(?:x\d+)+)", text):
    generation, dims = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
    generation = TYPE_PREFIXES.get(generation, generation)
    if generation in CHIPS and len(dims) == CHIPS[generation].torus_dims and min(dims) >= 1:
      return Topology(generation, dims, name)
  elif m := re.fullmatch(r"(v\w+?)-(\d+)", text):
    generation = TYPE_PREFIXES.get(m.group(1))
    if generation is not None:
      chip, count = CHIPS[generation], int(m.group(2))
      chips = count // 2 if chip.type_counts == "cores" else count
      if chip.type_counts == "cores" and count % 2:
        raise ValueError(f"topology {name!r}: {m.group(1)} types count TensorCores, 2 per "
                         "chip, so the number must be even")
      if chips == 1:
        return Topology(generation, (1,) * chip.torus_dims, name)
      if chips >= 4 and chips & (chips - 1) == 0:
        return Topology(generation, _slice_dims(chips, chip.torus_dims), name)
      raise ValueError(f"topology {name!r}: {chips} chips is not a slice size this planner "
                       "knows (1, or a power of two from 4); name the shape instead, e.g. "
                       f"{generation}:{'x'.join(['2'] * chip.torus_dims)}")
  raise ValueError(f"unknown topology {name!r}; accepted: {EXAMPLES} (generations: "
                   f"{', '.join(CHIPS)}; v5litepod = v5e)")


def topology_devices(topology: Topology) -> list:
  """The devices of the slice as libtpu describes it (no TPU needed)."""
  if importlib.util.find_spec("libtpu") is None:
    raise RuntimeError(f"planning for TPUs needs libtpu, which is not installed: {INSTALL}")
  from jax.experimental import topologies
  options = {}
  if topology.chips < 4:  # smaller than one host: the slice is its own host
    options["chips_per_host_bounds"] = tuple(topology.dims) + (1,) * (3 - len(topology.dims))
  return topologies.get_topology_desc(platform="tpu", topology_name=topology.libtpu_name,
                                      **options).devices


# ---------------------------------------------------------------------------------------
# One program


class DoesNotFit(Exception):
  """The compiler refused the program: it needs more memory than the device has."""

  def __init__(self, message: str):
    super().__init__(message)
    found = re.search(r"\(([\d.]+)([KMGT]?)\)[^()]*exceeds[^()]*\(([\d.]+)([KMGT]?)\)", message)
    units = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": GiB, "T": 2 ** 40}
    self.required = float(found.group(1)) * units[found.group(2)] if found else None
    self.available = float(found.group(3)) * units[found.group(4)] if found else None


def compile_program(jitted, *args):
  """(compiled, seconds). Raises DoesNotFit when the compiler runs out of device memory."""
  started = time.perf_counter()
  # Never written to JAX's persistent compilation cache (where the caller has one): an
  # executable for described devices cannot be loaded back (there is no client for them).
  # JAX decides once per process whether it reads the cache; whether it writes an entry
  # it decides per compile, by this threshold.
  min_seconds = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
  try:
    compiled = jitted.lower(*args).compile()
  except Exception as err:  # the compiler's JaxRuntimeError / XlaRuntimeError
    if "RESOURCE_EXHAUSTED" in str(err) or "Ran out of memory" in str(err):
      raise DoesNotFit(str(err).splitlines()[0]) from None
    raise
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)
  return compiled, time.perf_counter() - started


def _program_report(compiled, seconds: float, args: dict, topology: Topology,
                    num_devices: int) -> dict:
  """Memory, XLA's FLOP count and collectives of one compiled program, per device."""
  memory = compiled.memory_analysis()
  hbm = topology.chip.hbm_gib * GiB / topology.chip.devices_per_chip
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
           - memory.alias_size_in_bytes + memory.temp_size_in_bytes
           + memory.generated_code_size_in_bytes)
  found, notes = costs.collectives(compiled.as_text(), num_devices)
  ici = topology.chip.ici_gbytes_per_s
  collective_rows = {
      kind: dict(count=c.count, bytes=c.bytes, wire_bytes=round(c.wire_bytes),
                 ici_seconds=None if ici is None else c.wire_bytes / (ici * 1e9))
      for kind, c in found.items()}
  return dict(
      compile_seconds=round(seconds, 1),
      memory=dict(arguments={k: costs.per_device_bytes(v) for k, v in args.items()},
                  argument_bytes=memory.argument_size_in_bytes,
                  temp_bytes=memory.temp_size_in_bytes,
                  output_bytes=memory.output_size_in_bytes,
                  alias_bytes=memory.alias_size_in_bytes,
                  code_bytes=memory.generated_code_size_in_bytes,
                  total_bytes=total, hbm_bytes=int(hbm), fits=total <= hbm,
                  headroom_bytes=int(hbm - total)),
      xla_flops=costs.xla_flops(compiled) or 0.0,
      collectives=collective_rows, notes=notes)


def _state_parts(state) -> dict:
  """The train state's argument groups: params, target, optimizer state, queues, other."""
  return {"params": state.params, "batch_stats": state.batch_stats,
          "target": (state.target_params, state.target_batch_stats),
          "opt_state": state.opt_state, "queues": (state.queue1, state.queue2),
          "other": (state.step, state.queue_ptr, state.rng, state.skipped_steps)}


# ---------------------------------------------------------------------------------------
# The plan


def plan(config, topology: str | Topology, *, num_classes: int | None = None) -> dict:
  """Compiles `config`'s run for `topology` and returns the report (a JSON-able dict).

  Raises ValueError for a config that cannot run on the slice (the message train.py
  gives), RuntimeError when libtpu is missing. A program the compiler refuses for memory
  is reported with fits False and the compiler's required/available bytes.
  """
  from moby_jax.run import Pretraining, probe_config
  topology = parse_topology(topology) if isinstance(topology, str) else topology
  devices = topology_devices(topology)
  mesh = parallel.mesh_for(config, devices)
  n = mesh.size
  if config.task != "moby":
    raise ValueError(f"the planner plans MoBY pre-training (config.task='moby'), got "
                     f"task={config.task!r}")
  loaders.check_config(config.data)
  run = Pretraining(config, mesh)  # the trainer's construction, and its config checks
  batch = config.data.batch_size
  report = dict(
      topology=topology.name, libtpu_topology=topology.libtpu_name,
      generation=topology.generation, chips=topology.chips, devices=n,
      device_kind=devices[0].device_kind, model=config.model.name,
      img_size=config.model.img_size, dtype=config.model.dtype, global_batch=batch,
      per_device_batch=batch // n, fsdp=bool(config.parallel.fsdp),
      mesh={name: int(size) for name, size in mesh.shape.items()},
      views_in_scan=bool(config.train.views_in_scan), chip=dataclasses.asdict(topology.chip),
      programs={})
  if run.fsdp_left_whole:
    report["fsdp_left_whole"] = dict(
        leaves=len(run.fsdp_left_whole), bytes=sum(b for _, b in run.fsdp_left_whole),
        largest=[path for path, _ in run.fsdp_left_whole[:3]],
        text=parallel.describe_left_whole(run.fsdp_left_whole, mesh))

  step_flops = costs.step_flops(config)
  analytic = costs.analytic_step_flops(config)
  peak = topology.chip.peak_bf16_tflops * 1e12 / topology.chip.devices_per_chip
  report["flops"] = dict(
      per_step=step_flops, per_device=step_flops / n, per_pair=step_flops / batch,
      analytic_per_step=analytic, analytic_per_pair=analytic / batch,
      encoder_forward_per_image=analytic / batch / costs.PASSES_PER_PAIR,
      lower_bound_step_seconds=step_flops / n / peak)

  programs = [("train_step", run.step.jitted, run.abstract_state, run.abstract_batch(),
               _state_parts(run.abstract_state))]
  if config.eval.enabled:
    classes = num_classes or (embedded.NUM_CLASSES if config.data.dataset == "embedded"
                              else 1000)
    report["probe_classes"] = classes
    probe = probe_config(config, classes)
    probe_step = evaluate.make_linear_step(probe, mesh)
    from moby_jax.checkpoint import abstract_target
    probe_state = abstract_target(probe, mesh)
    size = config.model.img_size
    shard = parallel.batch_sharding(mesh)
    probe_batch = {"image": jax.ShapeDtypeStruct((probe.data.batch_size, size, size, 3),
                                                 np.uint8, sharding=shard),
                   "label": jax.ShapeDtypeStruct((probe.data.batch_size,), np.int32,
                                                 sharding=shard)}
    programs.append(("linear_probe_step", probe_step.jitted, probe_state, probe_batch,
                     {"probe_state": probe_state}))

  for name, jitted, state, batch_shapes, parts in programs:
    try:
      compiled, seconds = compile_program(jitted, state, batch_shapes)
    except DoesNotFit as err:
      report["programs"][name] = dict(
          memory=dict(fits=False, total_bytes=err.required, hbm_bytes=err.available,
                      compiler=str(err)))
      continue
    parts = dict(parts, batch=batch_shapes)
    report["programs"][name] = _program_report(compiled, seconds, parts, topology, n)
  report["fits"] = all(p["memory"]["fits"] for p in report["programs"].values())
  step = report["programs"]["train_step"]
  if "xla_flops" in step:
    step["xla_flops_vs_true"] = step["xla_flops"] / (step_flops / n)
    wire = sum(c["wire_bytes"] for c in step["collectives"].values())
    ici = topology.chip.ici_gbytes_per_s
    report["ici_seconds_per_step"] = None if ici is None else wire / (ici * 1e9)
  return report


def max_batch(config, topology: str | Topology, *, say=print) -> int | None:
  """The largest global batch that fits (a multiple of the device count that divides
  moby.queue_size, as the config rules want), by bisection on compiles of the train step;
  None when not even the smallest does. Each try is printed."""
  from moby_jax.run import Pretraining
  topology = parse_topology(topology) if isinstance(topology, str) else topology
  mesh = parallel.mesh_for(config, topology_devices(topology))
  n, queue = mesh.size, config.moby.queue_size
  candidates = [b for b in range(n, queue + 1, n) if queue % b == 0]
  if not candidates:
    raise ValueError(f"no global batch is both a multiple of the {n} devices and a divisor "
                     f"of moby.queue_size ({queue}): raise moby.queue_size to a multiple "
                     f"of {n}")

  def fits(batch: int) -> bool:
    trial = config.copy_and_resolve_references()
    with trial.unlocked():
      trial.data.batch_size = batch
      trial.eval.enabled = False
    run = Pretraining(trial, mesh)
    try:
      compiled, seconds = compile_program(run.step.jitted, run.abstract_state,
                                          run.abstract_batch())
    except DoesNotFit as err:
      say(f"  batch {batch:6d}: DOES NOT FIT ({_gib(err.required)} needed, "
          f"{_gib(err.available)} available)")
      return False
    report = _program_report(compiled, seconds, {}, topology, n)["memory"]
    say(f"  batch {batch:6d}: {'fits' if report['fits'] else 'DOES NOT FIT'} "
        f"({_gib(report['total_bytes'])} of {_gib(report['hbm_bytes'])}, compiled in "
        f"{seconds:.0f} s)")
    return report["fits"]

  return largest_fitting(candidates, fits)


def largest_fitting(candidates: list[int], fits) -> int | None:
  """The largest of the sorted `candidates` for which `fits` holds, assuming it holds up
  to some candidate and not beyond (memory grows with the batch): bisection."""
  lo, hi = -1, len(candidates)  # fits(candidates[lo]) (or none), not fits(candidates[hi])
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if fits(candidates[mid]):
      lo = mid
    else:
      hi = mid
  return candidates[lo] if lo >= 0 else None


# ---------------------------------------------------------------------------------------
# The printed report


def _gib(value) -> str:
  """Bytes in binary units (GiB, the unit of HBM sizes, down to KiB)."""
  if value is None:
    return "?"
  for scale, unit in ((GiB, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
    if abs(value) >= scale:
      return f"{value / scale:.2f} {unit}"
  return f"{value:.0f} B"


def _seconds(value: float) -> str:
  return f"{value:.2f} s" if value >= 1 else (f"{value * 1e3:.2f} ms" if value >= 1e-3
                                               else f"{value * 1e6:.1f} us")


def _si(value: float, unit: str) -> str:
  for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(value) >= scale:
      return f"{value / scale:.2f} {prefix}{unit}"
  return f"{value:.0f} {unit}"


def format_report(report: dict) -> str:
  """The report as text: what a user reads before renting the slice."""
  chip = report["chip"]
  lines = [
      f"plan: {report['model']} at {report['img_size']} px ({report['dtype']}), "
      f"global batch {report['global_batch']} on {report['topology']} "
      f"({report['libtpu_topology']}: {report['chips']} chips, {report['devices']} "
      f"devices, {report['device_kind']})",
      f"  per-device batch {report['per_device_batch']}, FSDP "
      f"{'on' if report['fsdp'] else 'off'}, mesh "
      f"{' x '.join(f'{k} {v}' for k, v in report['mesh'].items())}, views "
      f"{'in a scan' if report['views_in_scan'] else 'as one batch'}"]
  if "fsdp_left_whole" in report:
    lines.append(f"  {report['fsdp_left_whole']['text']}")
  flops = report["flops"]
  lines += [
      "FLOPs (XLA's count of the loop-free step; the lower bound assumes the chip's peak "
      f"bf16 rate, {chip['peak_bf16_tflops']:g} TFLOP/s per chip):",
      f"  per device per step {_si(flops['per_device'], 'FLOP')}, per image pair "
      f"{_si(flops['per_pair'], 'FLOP')} (analytic, 8 encoder passes: "
      f"{_si(flops['analytic_per_pair'], 'FLOP')}, ratio "
      f"{flops['per_pair'] / flops['analytic_per_pair']:.2f})",
      f"  step time at peak (a lower bound): {_seconds(flops['lower_bound_step_seconds'])}"]
  for name, program in report["programs"].items():
    memory = program["memory"]
    verdict = "FITS" if memory["fits"] else "DOES NOT FIT"
    lines.append(f"{name}: {verdict}")
    if "compiler" in memory:
      lines.append(f"  the compiler: {memory['compiler']}")
      continue
    parts = ", ".join(f"{k} {_gib(v)}" for k, v in memory["arguments"].items())
    lines += [
        f"  compiled in {program['compile_seconds']:.0f} s",
        f"  per device: arguments {_gib(memory['argument_bytes'])} ({parts}), temporaries "
        f"{_gib(memory['temp_bytes'])}, outputs {_gib(memory['output_bytes'])} "
        f"({_gib(memory['alias_bytes'])} of them in donated arguments), code "
        f"{_gib(memory['code_bytes'])}",
        f"  total {_gib(memory['total_bytes'])} of {_gib(memory['hbm_bytes'])} HBM per "
        f"device: headroom {_gib(memory['headroom_bytes'])}"]
    if program["collectives"]:
      lines.append("  collectives per device per step (count, result bytes, bytes sent; "
                   "time at the chip's ICI bandwidth, an estimate):")
      for kind, c in program["collectives"].items():
        time_text = "" if c["ici_seconds"] is None else f", {_seconds(c['ici_seconds'])}"
        lines.append(f"    {kind:18s} {c['count']:5d}  {_gib(c['bytes']):>10s}  "
                     f"{_gib(c['wire_bytes']):>10s}{time_text}")
    else:
      lines.append("  no collectives (one device)")
    lines += [f"  note: {note}" for note in program["notes"]]
  if "xla_flops_vs_true" in report["programs"]["train_step"]:
    lines.append(f"XLA's cost analysis of the compiled step counts "
                 f"{report['programs']['train_step']['xla_flops_vs_true']:.3f} of these "
                 "FLOPs (it counts a loop body once)")
  lines.append("Not modelled: the host input pipeline, DCN between slices, the real step "
               "time (overlap, kernels). " + ("FITS" if report["fits"] else "DOES NOT FIT"))
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python3 -m moby_jax.plan", description=__doc__.split("\n\n")[0],
      epilog="Any --config.FIELD=VALUE overrides the config, as in train.py.")
  parser.add_argument("--config", required=True, help="config file[:arg], as for train.py")
  parser.add_argument("--topology", required=True, help=f"e.g. {EXAMPLES}")
  parser.add_argument("--json", metavar="FILE", help="also write the report as JSON here")
  parser.add_argument("--max-batch", action="store_true",
                      help="find the largest global batch that fits, by bisection on compiles")
  parser.add_argument("--num-classes", type=int, default=None,
                      help="classes of the linear probe (eval.enabled); default: the "
                           "embedded data's 10, else ImageNet's 1000")
  args, overrides = parser.parse_known_args(argv)
  from moby_jax.config_file import load_config
  try:
    config = load_config(args.config, overrides)
    topology = parse_topology(args.topology)
    if args.max_batch:
      print(f"largest global batch on {topology.name}, by bisection:", flush=True)
      best = max_batch(config, topology, say=lambda line: print(line, flush=True))
      print(f"largest global batch that fits: {best}" if best else
            "DOES NOT FIT at any global batch")
      return 0 if best else 1
    report = plan(config, topology, num_classes=args.num_classes)
  except (ValueError, RuntimeError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 1
  print(format_report(report))
  if args.json:
    files.path(args.json).write_text(json.dumps(report, indent=2) + "\n")
  return 0 if report["fits"] else 1


if __name__ == "__main__":
  sys.exit(main())
