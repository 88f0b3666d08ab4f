"""What a compiled step costs: FLOPs, memory per device, and the collectives it runs.

Shared by the pod planner (`moby_jax.plan`) and anything else that needs a step's cost.

- `step_flops(config)`: the FLOPs of one MoBY step over the global batch, counted by XLA
  from the loop-free program (both views as one batch). XLA's cost analysis counts a
  loop body once, so the step with `train.views_in_scan` (a two-trip scan over the
  views) reports 5 of its 8 encoder passes; the loop-free program is the same
  arithmetic without the loop.
- `analytic_step_flops(config)`: the MoBY count, 8 encoder forward passes per image pair
  (online: 2 views x forward + backward = 3; target: 2 forwards), from XLA's count of one
  encoder forward.
- `collectives(hlo_text)`: every collective of a compiled (SPMD-partitioned) module, with
  its count, the bytes it outputs per device and an estimate of the bytes it sends over
  the interconnect per device, loops multiplied by their trip counts.
- `per_device_bytes(tree)`: the bytes a pytree of sharded shapes takes on one device.
- `peak_tflops(device_kind, dtype)`: a device's peak matmul rate (PEAKS), for MFU and the
  planner's lower bound.
"""

import dataclasses
import re

import jax
import numpy as np

from moby_jax import parallel

# ---------------------------------------------------------------------------------------
# FLOPs


def xla_flops(stage) -> float | None:
  """XLA's FLOP count of a lowered or compiled program (None where XLA gives none)."""
  cost = stage.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost["flops"]) if cost and "flops" in cost else None


def _lowered_flops(jitted, *args) -> float:
  """XLA's FLOP count of a jitted function's lowered (not yet optimised) module."""
  flops = xla_flops(jitted.lower(*args))
  if flops is None:
    raise RuntimeError("XLA gave no FLOP count for the lowered step")
  return flops


def _one_cpu_device_mesh():
  return parallel.make_mesh(jax.local_devices(backend="cpu")[:1])


def step_flops(config) -> float:
  """FLOPs of one MoBY step (SPEC §2) over the global batch `config.data.batch_size`.

  Counted by XLA from the step lowered for one CPU device with both views as one batch
  (`train.views_in_scan=False`: no loop, so nothing is counted once for two trips); the
  arithmetic is the same for any device count and for the scanned step. Includes the
  on-device augmentations, the heads, the loss, the queues and the optimizer update; not
  the forward passes that model.remat recomputes (model FLOPs, as MFU counts them).
  """
  from moby_jax.run import Pretraining
  loop_free = config.copy_and_resolve_references()
  with loop_free.unlocked():
    loop_free.train.views_in_scan = False
    loop_free.model.remat = "none"
  run = Pretraining(loop_free, _one_cpu_device_mesh())
  return _lowered_flops(run.step.jitted, run.abstract_state, run.abstract_batch())


def encoder_forward_flops(config) -> float:
  """FLOPs of one training-mode forward pass of the online encoder on one image."""
  from moby_jax.models import abstract_variables, build_encoder
  encoder = build_encoder(config.model)
  variables = abstract_variables(encoder)
  images = jax.ShapeDtypeStruct((1, *encoder.image_hw, 3), np.float32)

  def forward(variables, images):
    return encoder.apply(variables, images, train=True, mutable=["batch_stats"],
                         rngs={"dropout": jax.random.key(0)})

  return _lowered_flops(jax.jit(forward), variables, images)


# Encoder forward-equivalents per image pair in a MoBY step: the online encoder runs
# forward and backward (about 2 forwards) on both views, the target forward on both.
PASSES_PER_PAIR = 2 * 3 + 2


def analytic_step_flops(config) -> float:
  """The MoBY count: 8 encoder forward-equivalents per image pair, times the global batch."""
  return PASSES_PER_PAIR * encoder_forward_flops(config) * config.data.batch_size


# ---------------------------------------------------------------------------------------
# Peak rates


@dataclasses.dataclass(frozen=True)
class Peak:
  """Dense (no sparsity) matmul TFLOP/s of one device as a run sees it: a GPU, or a TPU
  chip (v4's two TensorCores are one megacore device in a run). `fp32` is the rate of
  float32 matmuls at JAX's default precision: TF32 tensor cores on these GPUs, one
  bfloat16 pass on TPUs (hence the same as bf16)."""
  bf16: float
  fp32: float
  source: str


PEAKS = {
    "H100 SXM": Peak(989.4, 494.7, "NVIDIA H100 datasheet (SXM5): 1979 / 989 TFLOPS with "
                                   "sparsity, halved"),
    "H100 PCIe": Peak(756.0, 378.0, "NVIDIA H100 datasheet (PCIe), sparsity halved"),
    "H100 NVL": Peak(835.5, 417.5, "NVIDIA H100 NVL datasheet, per GPU, sparsity halved"),
    "H200": Peak(989.4, 494.7, "NVIDIA H200 datasheet (SXM), sparsity halved"),
    "H200 NVL": Peak(835.5, 417.5, "NVIDIA H200 datasheet (NVL), sparsity halved"),
    "A100": Peak(312.0, 156.0, "NVIDIA A100 datasheet (SXM4 and PCIe): BF16 312, TF32 156"),
    "TPU v4": Peak(275.0, 275.0, "cloud.google.com/tpu/docs/v4: 275 TFLOPs bf16 per chip"),
    "TPU v5e": Peak(197.0, 197.0, "cloud.google.com/tpu/docs/v5e: 197 TFLOPs bf16 per chip"),
    "TPU v5p": Peak(459.0, 459.0, "cloud.google.com/tpu/docs/v5p: 459 TFLOPs bf16 per chip"),
    "TPU v6e": Peak(918.0, 918.0, "cloud.google.com/tpu/docs/v6e: 918 TFLOPs bf16 per chip"),
}
# Device.device_kind -> PEAKS key: the first whose pattern occurs in the kind wins
# ("NVIDIA H100 80GB HBM3" is the SXM part; v5p devices call themselves "TPU v5").
_KIND_PATTERNS = (("H100 PCIe", "H100 PCIe"), ("H100 NVL", "H100 NVL"), ("H100", "H100 SXM"),
                  ("H200 NVL", "H200 NVL"), ("H200", "H200"), ("A100", "A100"),
                  ("TPU v4", "TPU v4"), ("TPU v5 lite", "TPU v5e"), ("TPU v5e", "TPU v5e"),
                  ("TPU v5", "TPU v5p"), ("TPU v6", "TPU v6e"))


def peak_tflops(device_kind: str, dtype: str = "bfloat16") -> float | None:
  """The peak TFLOP/s of one device of `device_kind` (`jax.Device.device_kind`) for
  matmuls in `dtype` (the model's compute dtype); None where the kind is not in PEAKS
  (CPUs, other GPUs)."""
  for pattern, key in _KIND_PATTERNS:
    if pattern in device_kind:
      return PEAKS[key].bf16 if dtype == "bfloat16" else PEAKS[key].fp32
  return None


# ---------------------------------------------------------------------------------------
# Memory


def per_device_bytes(tree) -> int:
  """Bytes on one device of a pytree of `jax.ShapeDtypeStruct`s with shardings (the
  largest shard: every device holds one of that shape or a replica)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


# ---------------------------------------------------------------------------------------
# Collectives in a compiled module's text

COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                    "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1,
                "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
                "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_COMPUTATION = re.compile(r"^(?:ENTRY )?(%[\w.\-]+) \(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = (.+?) ([a-z][\w\-]*)\(")
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
_CALLED = re.compile(r"(?:calls|to_apply)=(%[\w.\-]+)|branch_computations=\{([^}]*)\}")
_NAME = re.compile(r"%[\w.\-]+")


def _shape_bytes(type_text: str, async_start: bool) -> int:
  arrays = [(dtype, dims) for dtype, dims in _ARRAY.findall(type_text) if dtype in _DTYPE_BYTES]
  if async_start and len(arrays) > 1:
    arrays = arrays[-1:]  # (operands..., result) of an async start: the result
  return int(sum(_DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d],
                                                   dtype=np.int64))
                 for dtype, dims in arrays))


def _group_size(line: str, num_devices: int) -> int:
  """The devices in one replica group of a collective (its participants)."""
  if m := re.search(r"replica_groups=\{\{([\d,]*)\}", line):
    return len(m.group(1).split(","))
  if m := re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line):
    return int(m.group(2))
  if m := re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line):
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
    return int(np.prod([int(sizes[a]) for a in re.findall(r"'([^']+)'", m.group(2))]))
  if "source_target_pairs" in line:
    return 2
  return num_devices


def _wire_bytes(kind: str, size: int, n: int) -> float:
  """Bytes one device sends for a collective whose result is `size` bytes over a group of
  `n` (ring/bidirectional algorithms: all-reduce = reduce-scatter + all-gather)."""
  if n <= 1:
    return 0.0
  share = (n - 1) / n
  return {"all-reduce": 2 * share * size, "all-gather": share * size,
          "reduce-scatter": (n - 1) * size, "all-to-all": share * size,
          "collective-permute": size}[kind]


@dataclasses.dataclass
class Collective:
  count: int = 0            # executions per step
  bytes: int = 0            # result bytes per device per step
  wire_bytes: float = 0.0   # estimated bytes sent per device per step


def _trip_count(condition_lines: list[str]) -> int | None:
  """Trips of a counted loop (`i < N`, i from 0), from its condition computation."""
  constants = {}
  for line in condition_lines:
    if m := re.match(r"\s*(%[\w.\-]+) = s32\[\]\S* constant\((\d+)\)", line):
      constants[m.group(1)] = int(m.group(2))
  for line in condition_lines:
    if " compare(" in line and "direction=LT" in line and line.lstrip().startswith("ROOT"):
      operands = _NAME.findall(line.split(" compare(", 1)[1].split(")", 1)[0])
      bounds = [constants[o] for o in operands if o in constants]
      if len(bounds) == 1:
        return bounds[0]
  return None


def collectives(hlo_text: str, num_devices: int) -> tuple[dict[str, Collective], list[str]]:
  """Collectives of a compiled module per step: {kind: Collective}, and notes (loops
  whose trip count could not be read are counted once and named there).

  A collective inside a loop body counts once per trip (the views scan of the step runs
  its body twice); async pairs are counted at their start. The TPU compiler emits a
  reduce-scatter as a fusion that calls an `all-reduce-scatter` computation (an
  all-reduce inside, whose result is the shard): it counts as the reduce-scatter it is.
  """
  computations: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    if m := _COMPUTATION.match(line):
      current = m.group(1)
      computations[current] = []
      if line.startswith("ENTRY"):
        entry = current
    elif current is not None:
      if line.startswith("}"):
        current = None
      else:
        computations[current].append(line)
  if entry is None:
    raise ValueError("no ENTRY computation in the compiled module's text")

  out = {kind: Collective() for kind in COLLECTIVE_KINDS}
  notes: list[str] = []

  def record(kind: str, line: str, size: int, count: int) -> None:
    found = out[kind]
    found.count += count
    found.bytes += count * size
    found.wire_bytes += count * _wire_bytes(kind, size, _group_size(line, num_devices))

  def visit(name: str, count: int) -> None:
    for line in computations.get(name, []):
      m = _INSTRUCTION.match(line)
      if not m:
        continue
      type_text, op = m.groups()
      kind = op.removesuffix("-start")
      if kind in out and not op.endswith("-done"):
        record(kind, line, _shape_bytes(type_text, op.endswith("-start")), count)
      elif op == "while":
        body = re.search(r"body=(%[\w.\-]+)", line).group(1)
        condition = re.search(r"condition=(%[\w.\-]+)", line).group(1)
        trips = _trip_count(computations.get(condition, []))
        if trips is None:
          notes.append(f"a loop ({body}) of unknown trip count is counted once")
          trips = 1
        visit(body, count * trips)
      elif m2 := re.search(r"calls=(%(?:all-)?reduce-scatter[\w.\-]*)", line):
        inner = "\n".join(computations.get(m2.group(1), []))
        record("reduce-scatter", inner or line, _shape_bytes(type_text, False), count)
      else:
        for single, branches in _CALLED.findall(line):
          for callee in [single] if single else _NAME.findall(branches):
            if callee in computations:
              visit(callee, count)

  visit(entry, 1)
  return {k: v for k, v in out.items() if v.count}, notes
