"""Shared by the benchmarks: import paths and the timing rule."""

import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The PyTorch references live with the tests (tests/torch_reference.py, ...).
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def median_seconds(fn, warmup: int, repeats: int) -> float:
  """Median wall time of `repeats` calls of `fn` after `warmup` untimed calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)
