"""Shared by the benchmarks: import paths and the timing rule."""

import pathlib
import resource
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The PyTorch references live with the tests (tests/torch_reference.py, ...).
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def median_seconds(fn, warmup: int, repeats: int) -> float:
  """Median wall time of `repeats` calls of `fn` after `warmup` untimed calls."""
  return timed_steps(fn, warmup, repeats)["seconds"]


def timed_steps(fn, warmup: int, repeats: int) -> dict:
  """The median wall time of `repeats` calls of `fn` after `warmup` untimed calls, and
  what the process used over the timed calls: CPU cores busy on average (user + system
  time over wall time), system seconds and minor page faults per call (fresh memory the
  allocator took from the kernel)."""
  for _ in range(warmup):
    fn()
  times = []
  before = resource.getrusage(resource.RUSAGE_SELF)
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  after = resource.getrusage(resource.RUSAGE_SELF)
  system = after.ru_stime - before.ru_stime
  return dict(seconds=statistics.median(times),
              cores_busy=(after.ru_utime - before.ru_utime + system) / sum(times),
              system_s_per_step=system / repeats,
              page_faults_per_step=(after.ru_minflt - before.ru_minflt) / repeats)
