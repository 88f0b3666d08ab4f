"""Where a step's time goes, by kind of operation, for JAX (XLA) and PyTorch alike.

`jax_breakdown(hlo, call, steps)`: traces `steps` calls of `call()` (which runs a jitted
function whose compiled HLO text is `hlo`, and waits for it) with the JAX profiler, maps
every executed XLA operation (a fusion, a dot, a copy, ...) to what the HLO computes, and
sums the time per kind:
  matmul       dots and convolutions (and what XLA fused into them)
  layout       transposes and copies (e.g. an operand laid out again for a dot)
  reduction    reductions (norm statistics, softmax sums, gradient sums over the batch)
  elementwise  everything else (activations, norms' arithmetic, optimizer updates)
and per part of the model, from the operation's name (`encoder`, `projector`, ...).
`torch_breakdown(fn, steps)`: the same kinds from torch.profiler's per-operator self
times. Times are per step, in ms; operations that run concurrently are each counted, so a
column can add up to more than the wall time.
"""

import collections
import glob
import gzip
import json
import re
import tempfile

LAYOUT_OPS = {"transpose", "copy", "bitcast", "reshape", "parameter", "slice", "concatenate",
              "pad", "broadcast", "dynamic-slice", "dynamic-update-slice", "tuple",
              "get-tuple-element", "constant", "iota"}
KINDS = ("matmul", "layout", "reduction", "elementwise")


def _hlo_tables(hlo: str):
  """({computation: opcodes}, {instruction: (called computation, opcode, op_name)})."""
  computations, instructions, current = {}, {}, None
  for line in hlo.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header:
      current = computations.setdefault(header.group(1), set())
      continue
    op = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?\s([a-z][\w\-]*)\(", line)
    if op and current is not None:
      current.add(op.group(2))
      calls = re.search(r"calls=%?([\w.\-]+)", line)
      name = re.search(r'op_name="([^"]+)"', line)
      instructions[op.group(1)] = (calls.group(1) if calls else None, op.group(2),
                                   name.group(1) if name else "")
  return computations, instructions


def _kind(opcodes: set) -> str:
  if opcodes & {"dot", "convolution"}:
    return "matmul"
  if opcodes & {"reduce", "reduce-window"}:
    return "reduction"
  if opcodes <= LAYOUT_OPS:
    return "layout"
  return "elementwise"


def _part(op_name: str) -> str:
  for part in ("predictor", "projector", "encoder"):
    if f"/{part}/" in op_name:
      online = "while/body" in op_name or "transpose(jvp" in op_name or "jvp(" in op_name
      return f"{part} ({'online' if online else 'target'})" if part != "predictor" else part
  return "rest (loss, queue, optimizer, momentum update)"


def jax_breakdown(hlo: str, call, steps: int = 2) -> dict:
  """{"kinds": {kind: ms}, "parts": {part: ms}} per `call()`."""
  import jax
  computations, instructions = _hlo_tables(hlo)
  call()
  with tempfile.TemporaryDirectory() as folder:
    jax.profiler.start_trace(folder, create_perfetto_trace=True)
    for _ in range(steps):
      call()
    jax.profiler.stop_trace()
    trace = sorted(glob.glob(f"{folder}/**/*.trace.json.gz", recursive=True))[-1]
    events = json.load(gzip.open(trace))["traceEvents"]
  kinds, parts = collections.Counter(), collections.Counter()
  for event in events:
    entry = instructions.get(event.get("name"))
    if event.get("ph") != "X" or entry is None:
      continue
    called, opcode, op_name = entry
    if opcode in ("while", "conditional", "call"):
      continue  # their bodies' operations are traced themselves
    ms = event["dur"] / 1e3 / steps
    kinds[_kind(computations.get(called, {opcode}))] += ms
    parts[_part(op_name)] += ms
  return {"kinds": dict(kinds), "parts": dict(parts)}


# PyTorch operators by kind (self time; the autograd wrappers carry no time of their own).
_TORCH_MATMUL = ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "convolution",
                 "conv2d", "_convolution", "mkldnn_convolution", "convolution_backward")
_TORCH_LAYOUT = ("copy_", "clone", "contiguous", "permute", "transpose", "view", "reshape",
                 "_unsafe_view", "cat", "roll", "slice", "select", "narrow", "t", "expand",
                 "as_strided", "index", "index_select", "empty", "empty_like", "zeros",
                 "zero_", "fill_", "unbind", "split", "chunk", "stack", "flatten")
_TORCH_REDUCTION = ("sum", "mean", "var", "var_mean", "norm", "linalg_vector_norm", "amax",
                    "max", "logsumexp", "native_layer_norm", "native_layer_norm_backward",
                    "_foreach_norm", "softmax", "_softmax", "_softmax_backward_data",
                    "log_softmax", "_log_softmax", "_log_softmax_backward_data",
                    "native_batch_norm", "native_batch_norm_backward")


def _torch_kind(name: str) -> str:
  base = name.split("::")[-1]
  if base in _TORCH_MATMUL:
    return "matmul"
  if base in _TORCH_LAYOUT:
    return "layout"
  if base in _TORCH_REDUCTION:
    return "reduction"
  return "elementwise"


def torch_breakdown(fn, steps: int = 2) -> dict:
  """{"kinds": {kind: ms}} per call of `fn()` (PyTorch on the CPU or a GPU)."""
  import torch
  fn()
  activities = [torch.profiler.ProfilerActivity.CPU]
  if torch.cuda.is_available():
    activities.append(torch.profiler.ProfilerActivity.CUDA)
  with torch.profiler.profile(activities=activities) as prof:
    for _ in range(steps):
      fn()
  kinds = collections.Counter()
  for event in prof.key_averages():
    if not event.key.startswith("aten::"):
      continue
    self_us = (event.self_device_time_total if torch.cuda.is_available()
               else event.self_cpu_time_total)
    kinds[_torch_kind(event.key)] += self_us / 1e3 / steps
  return {"kinds": dict(kinds)}


def table(results: dict) -> str:
  """A markdown table: kinds as rows, one column per framework result."""
  names = list(results)
  lines = ["| kind | " + " | ".join(f"{n} ms/step" for n in names) + " |",
           "| --- |" + " --- |" * len(names)]
  for kind in KINDS:
    lines.append(f"| {kind} | " + " | ".join(
        f"{results[n]['kinds'].get(kind, 0.0):.0f}" for n in names) + " |")
  lines.append("| sum | " + " | ".join(
      f"{sum(results[n]['kinds'].values()):.0f}" for n in names) + " |")
  parts = results.get("jax", {}).get("parts")
  if parts:
    lines.append("")
    lines.append("| JAX part | ms/step |")
    lines.append("| --- | --- |")
    for part, ms in sorted(parts.items(), key=lambda kv: -kv[1]):
      lines.append(f"| {part} | {ms:.0f} |")
  return "\n".join(lines)
