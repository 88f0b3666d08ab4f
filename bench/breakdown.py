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
For JAX also the wall time per kind (the union of its operations' intervals): XLA runs
independent operations side by side on the same cores, so summed times overstate what a
kind costs the step. On the CPU, unfused dots run asynchronously on Eigen's thread pool
and are timed up to their consumer (operation_intervals).
`top_operations(trace_dir, steps)`: the operations of a `jax.profiler` trace that took the
most time (self time, per step), on the devices when the trace has any (GPU, TPU), else
on the host (XLA:CPU), as bench/gpu_check.sh prints them.
`torch_breakdown(fn, steps)`: the same kinds from torch.profiler's per-operator self
times (PyTorch runs one operator at a time on the CPU, each over all cores, so these add
up to its wall time less the Python between them). Times are per step, in ms.
"""

import bisect
import collections
import glob
import gzip
import json
import pathlib
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


def _wall_ms(intervals) -> float:
  """Length of the union of [start, end) intervals (microseconds) in ms: the wall time
  during which at least one of them ran."""
  total, current_start, current_end = 0.0, None, None
  for start, end in sorted(intervals):
    if current_end is None or start > current_end:
      if current_end is not None:
        total += current_end - current_start
      current_start, current_end = start, end
    else:
      current_end = max(current_end, end)
  if current_end is not None:
    total += current_end - current_start
  return total / 1e3


def operation_intervals(events, instructions, computations, async_dots: bool):
  """[(start, end, kind, part)] (microseconds) of the traced XLA operations, in time order.

  With `async_dots` (XLA:CPU), a plain dot (one XLA did not fuse, e.g. a weight gradient
  X^T dY, which YNNPACK cannot take with a transposed operand) is handed to Eigen's thread
  pool and its trace event ends as soon as it is enqueued; the work runs until its
  consumer can start. Such a dot's interval is extended to the start of the next traced
  operation (an underestimate when an independent operation starts meanwhile).
  """
  ops = []
  for event in events:
    entry = instructions.get(event.get("name"))
    if event.get("ph") != "X" or entry is None:
      continue
    called, opcode, op_name = entry
    if opcode in ("while", "conditional", "call"):
      continue  # their bodies' operations are traced themselves
    kind = _kind(computations.get(called, {opcode}))
    ops.append([event["ts"], event["ts"] + event["dur"], kind, _part(op_name), opcode])
  ops.sort(key=lambda op: op[0])
  if async_dots:
    starts = [op[0] for op in ops]
    for op in ops:
      if op[4] == "dot":
        following = bisect.bisect_right(starts, op[1])
        if following < len(ops):
          op[1] = starts[following]
  return [tuple(op[:4]) for op in ops]


def jax_breakdown(hlo: str, call, steps: int = 2) -> dict:
  """Per `call()`, in ms: {"kinds": {kind: summed}, "wall": {kind: wall}, "busy": wall with
  any operation running, "span": first start to last end, "parts": {part: summed}}.

  Summed times count concurrent operations each (XLA runs independent operations side by
  side, sharing the cores); wall times count the time during which at least one
  operation of that kind ran, so the kinds' wall times can overlap and add up to more
  than "busy". Unfused dots on the CPU are timed to their consumer (operation_intervals).
  """
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
  intervals = operation_intervals(events, instructions, computations,
                                  async_dots=jax.default_backend() == "cpu")
  if not intervals:
    raise RuntimeError("the profile holds no operation of the compiled step (was the trace "
                       "written? does `hlo` belong to the function `call` runs?)")
  kinds, parts = collections.Counter(), collections.Counter()
  for start, end, kind, part in intervals:
    kinds[kind] += (end - start) / 1e3 / steps
    parts[part] += (end - start) / 1e3 / steps
  wall = {kind: _wall_ms([(s, e) for s, e, k, _ in intervals if k == kind]) / steps
          for kind in kinds}
  span = (max(e for _, e, _, _ in intervals) - intervals[0][0]) / 1e3 / steps
  return {"kinds": dict(kinds), "wall": wall,
          "busy": _wall_ms([(s, e) for s, e, _, _ in intervals]) / steps,
          "span": span, "parts": dict(parts)}


def top_operations(trace_dir: str, steps: int, count: int = 15) -> list[tuple[str, str, float]]:
  """[(process, operation, ms per step)] of the newest trace (`*.trace.json.gz`, as
  `jax.profiler` writes them) under `trace_dir`, the `count` largest by self time (an
  event's duration less that of the events nested in it on its thread), Python frames
  and end markers left out."""
  traces = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True),
                  key=lambda path: pathlib.Path(path).parent.name)
  if not traces:
    raise RuntimeError(f"no *.trace.json.gz under {trace_dir}")
  events = json.load(gzip.open(traces[-1]))["traceEvents"]
  process = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and not e["name"].startswith(("$", "end: ")):
      threads[(e["pid"], e.get("tid"))].append(e)
  self_us = collections.Counter()
  for (pid, _), thread in threads.items():
    stack = []  # [end, key, self time] of the enclosing events
    for e in sorted(thread, key=lambda e: (e["ts"], -e["dur"])):
      while stack and stack[-1][0] <= e["ts"]:
        _, key, own = stack.pop()
        self_us[key] += own
      if stack:
        stack[-1][2] -= e["dur"]
      stack.append([e["ts"] + e["dur"], (process.get(pid, str(pid)), e["name"]), e["dur"]])
    for _, key, own in stack:
      self_us[key] += own
  on_devices = {k: v for k, v in self_us.items() if re.match(r"/device:(GPU|TPU)", k[0])}
  ranked = sorted((on_devices or self_us).items(), key=lambda kv: -kv[1])[:count]
  return [(where, name, us / 1e3 / steps) for (where, name), us in ranked]


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
  """A markdown table: kinds as rows; per framework result its summed time and, where
  measured (JAX), its wall time per kind, the time any operation ran and the step's span."""
  columns = []  # (header, {row: ms})
  for name, r in results.items():
    summed = dict(r["kinds"], sum=sum(r["kinds"].values()))
    columns.append((f"{name} ms/step" + (" summed" if "wall" in r else ""), summed))
    if "wall" in r:
      columns.append((f"{name} ms/step wall", dict(r["wall"], busy=r["busy"], span=r["span"])))
  rows = list(KINDS) + ["sum", "busy", "span"]
  labels = {"sum": "sum", "busy": "any operation running", "span": "first to last operation"}
  lines = ["| kind | " + " | ".join(header for header, _ in columns) + " |",
           "| --- |" + " --- |" * len(columns)]
  for row in rows:
    cells = [f"{values[row]:.0f}" if row in values else "" for _, values in columns]
    if any(cells):
      lines.append(f"| {labels.get(row, row)} | " + " | ".join(cells) + " |")
  parts = results.get("jax", {}).get("parts")
  if parts:
    lines.append("")
    lines.append("| JAX part | ms/step summed |")
    lines.append("| --- | --- |")
    for part, ms in sorted(parts.items(), key=lambda kv: -kv[1]):
      lines.append(f"| {part} | {ms:.0f} |")
  return "\n".join(lines)
