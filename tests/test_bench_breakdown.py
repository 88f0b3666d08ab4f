"""bench/breakdown.py: wall time per kind of operation from a JAX profile.

The step benchmark's breakdown is how issue-level claims about the CPU step are checked
("the matmuls take X ms of the step"), so its accounting is tested: the union of
intervals, unfused dots timed to their consumer on the CPU (XLA hands them to Eigen
asynchronously), and a real profile of a jitted function.
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
import breakdown  # noqa: E402

HLO = """HloModule m

%fused_add (p0: f32[4,4], p1: f32[4,4]) -> f32[4,4] {
  %p0 = f32[4,4]{1,0} parameter(0)
  %p1 = f32[4,4]{1,0} parameter(1)
  ROOT %add.1 = f32[4,4]{1,0} add(%p0, %p1)
}

ENTRY %main (a: f32[4,4], b: f32[4,4]) -> f32[4,4] {
  %a = f32[4,4]{1,0} parameter(0)
  %b = f32[4,4]{1,0} parameter(1)
  %dot.1 = f32[4,4]{1,0} dot(%a, %b), lhs_contracting_dims={0}, rhs_contracting_dims={0}, metadata={op_name="jit(f)/encoder/dot_general"}
  ROOT %add_fusion = f32[4,4]{1,0} fusion(%dot.1, %b), kind=kLoop, calls=%fused_add, metadata={op_name="jit(f)/add"}
}
"""


def _event(name, ts, dur):
  return {"ph": "X", "name": name, "ts": ts, "dur": dur}


def test_wall_is_the_union_of_intervals():
  assert breakdown._wall_ms([]) == 0.0
  assert breakdown._wall_ms([(0, 1000), (500, 1500), (3000, 4000)]) == 2.5
  assert breakdown._wall_ms([(0, 4000), (1000, 2000)]) == 4.0


def test_unfused_dot_is_timed_to_its_consumer_on_cpu():
  computations, instructions = breakdown._hlo_tables(HLO)
  # The dot's event ends at 10 us (handed to Eigen); its consumer starts at 900 us.
  events = [_event("dot.1", 0, 10), _event("add_fusion", 900, 100), _event("unknown", 0, 5)]
  cpu = breakdown.operation_intervals(events, instructions, computations, async_dots=True)
  assert cpu == [(0, 900, "matmul", "encoder (target)"),
                 (900, 1000, "elementwise", "rest (loss, queue, optimizer, momentum update)")]
  traced = breakdown.operation_intervals(events, instructions, computations, async_dots=False)
  assert traced[0][:2] == (0, 10)


def test_profile_of_a_jitted_function():
  # x^T y is an unfused dot on XLA:CPU (YNNPACK takes no transposed operand), followed by
  # an element-wise consumer.
  f = jax.jit(lambda x, y: jnp.tanh(x.T @ y) + 1.0)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2048, 256)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(2048, 256)), jnp.float32)
  hlo = f.lower(x, y).compile().as_text()
  result = breakdown.jax_breakdown(hlo, lambda: f(x, y).block_until_ready(), steps=2)
  assert result["kinds"]["matmul"] > 0 and result["kinds"]["elementwise"] > 0
  for kind, wall in result["wall"].items():
    assert 0 < wall <= result["kinds"][kind] + 1e-9
  assert max(result["wall"].values()) <= result["busy"] <= result["span"] + 1e-9
  text = breakdown.table({"jax": result})
  assert "| matmul |" in text and "any operation running" in text


def test_profile_without_the_step_operations_is_an_error():
  f = jax.jit(lambda x: x + 1.0)
  x = jnp.ones(4)
  with pytest.raises(RuntimeError, match="no operation of the compiled step"):
    breakdown.jax_breakdown("", lambda: f(x).block_until_ready(), steps=1)


def _write_trace(folder: pathlib.Path, events: list) -> None:
  import gzip
  import json
  run = folder / "plugins" / "profile" / "2026_01_01_00_00_00"
  run.mkdir(parents=True)
  with gzip.open(run / "host.trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)


def test_top_operations_rank_self_time_and_prefer_the_devices(tmp_path):
  """What bench/gpu_check.sh prints from its trace: self time (an event less the events
  nested in it on its thread), per step, device processes over the host's."""
  meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
          {"ph": "M", "name": "process_name", "pid": 3,
           "args": {"name": "/device:CUSTOM:Megascale Trace"}},
          {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}}]
  x = lambda pid, tid, name, ts, dur: dict(ph="X", pid=pid, tid=tid, name=name, ts=ts, dur=dur)
  host = [x(1, 1, "PjitFunction(step)", 0, 100), x(1, 1, "dispatch", 10, 30),
          x(1, 1, "$python frame", 50, 40), x(3, 1, "megascale", 0, 1)]
  _write_trace(tmp_path / "host", meta[:2] + host)
  assert breakdown.top_operations(str(tmp_path / "host"), steps=2) == [
      ("/host:CPU", "PjitFunction(step)", 0.035), ("/host:CPU", "dispatch", 0.015),
      ("/device:CUSTOM:Megascale Trace", "megascale", 0.0005)]
  device = [x(2, 7, "fusion.1", 0, 400), x(2, 7, "gemm", 500, 1000), x(2, 7, "gemm", 2000, 1000)]
  _write_trace(tmp_path / "gpu", meta + host + device)
  assert breakdown.top_operations(str(tmp_path / "gpu"), steps=1, count=1) == [
      ("/device:GPU:0", "gemm", 2.0)]
