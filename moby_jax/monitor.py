"""What a run reports about its machine at log steps: device and host memory, and
profiler traces of chosen steps or, on demand, of a running job.

- `memory_metrics()`: this process's devices' memory in use, its peak and its limit
  (where the platform reports them: GPUs and TPUs, not CPUs), and the host's resident
  memory, in GiB.
- `Profiler`: a `jax.profiler` trace of the steps `train.profile_steps = (first, count)`
  names, and of the next `train.profile_on_demand_steps` steps whenever a file named
  PROFILE appears in the workdir (looked for at log steps only; removed when seen), on
  process 0 (`train.profile_all_processes` for all). Each trace goes to
  WORKDIR/profile/steps_FIRST-LAST/plugins/profile/TIME/ (`HOST.xplane.pb`, which
  TensorBoard's profile plugin reads from WORKDIR/profile, and `HOST.trace.json.gz`, which
  ui.perfetto.dev opens). Tracing does not change the computation.
"""

import os
import resource
import shutil
import sys
import tempfile

import jax

from moby_jax import files, goodput

GiB = 2 ** 30
TRIGGER = "PROFILE"   # touch WORKDIR/PROFILE to trace a running job
FOLDER = "profile"


def memory_metrics() -> dict[str, float]:
  """{"device_memory_gib", "device_peak_memory_gib", "device_memory_limit_gib"} (the
  largest over this process's devices; absent where the platform gives no statistics)
  and {"host_rss_gib", "host_peak_rss_gib"}."""
  out = {}
  stats = [s for s in (d.memory_stats() for d in jax.local_devices()) if s]
  for key, name in (("bytes_in_use", "device_memory_gib"),
                    ("peak_bytes_in_use", "device_peak_memory_gib"),
                    ("bytes_limit", "device_memory_limit_gib")):
    values = [s[key] for s in stats if key in s]
    if values:
      out[name] = max(values) / GiB
  rss = _current_rss_bytes()
  if rss is not None:
    out["host_rss_gib"] = rss / GiB
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
  out["host_peak_rss_gib"] = peak / GiB * (1 if sys.platform == "darwin" else 1024)
  return out


def _current_rss_bytes() -> int | None:
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):
    return None


class Profiler:
  """Starts and stops `jax.profiler` traces around steps. Step numbers are those of the
  log (step k is the k-th step of the run, 1-based). Per step it compares integers
  only; the workdir is looked at in `at_log_step`."""

  def __init__(self, config, workdir, say=print, clock=None):
    first, count = (tuple(config.train.profile_steps) + (0, 0))[:2]
    if count < 0 or (count and first < 1):
      raise ValueError(f"train.profile_steps must be (first step >= 1, count >= 0), got "
                       f"{tuple(config.train.profile_steps)}")
    self.window = (first, first + count) if count else None  # steps [first, end)
    self.on_demand = config.train.profile_on_demand_steps
    self.enabled = (jax.process_index() == 0 or config.train.profile_all_processes)
    self.workdir = files.path(workdir)
    self.say = say
    self.clock = clock    # goodput.Clock: starting and stopping traces is charged to profiling
    self._end = None      # the step after the last traced one, while tracing
    self._target = None   # the trace's folder under WORKDIR/profile
    self._local = None    # where the trace is written (a local folder)

  @property
  def tracing(self) -> bool:
    return self._end is not None

  def before_step(self, step: int) -> None:
    """Step `step` is about to be dispatched."""
    if self.window and step == self.window[0] and not self.tracing:
      self._start(step, self.window[1], "train.profile_steps")

  def after_step(self, step: int, state) -> None:
    """Step `step` was dispatched (its results, `state`, may still be computing)."""
    if self.tracing and step + 1 >= self._end:
      jax.block_until_ready(state)  # the trace holds the traced steps' device work
      self._stop()

  def at_log_step(self, step: int) -> None:
    """Looks for WORKDIR/PROFILE; when there, removes it and traces the next steps."""
    trigger = self.workdir / TRIGGER
    if not self.enabled or self.tracing or not trigger.exists():
      return
    trigger.unlink()
    self._start(step + 1, step + 1 + self.on_demand, f"{trigger} found")

  def close(self, state=None) -> None:
    """Stops a trace still running (the run ended or stopped inside the window)."""
    if self.tracing:
      if state is not None:
        jax.block_until_ready(state)
      self._stop()

  def _part(self):
    return goodput.charged(self.clock, "profiling")

  def _start(self, first: int, end: int, why: str) -> None:
    if not self.enabled:
      return
    with self._part():
      self._start_trace(first, end, why)

  def _start_trace(self, first: int, end: int, why: str) -> None:
    self._target = self.workdir / FOLDER / f"steps_{first}-{end - 1}"
    self._local = (str(self._target) if files.is_local(self._target)
                   else tempfile.mkdtemp(prefix="moby_jax_profile_"))
    jax.profiler.start_trace(self._local)
    self._end = end
    self.say(f"profile: tracing steps {first} to {end - 1} ({why})")

  def _stop(self) -> None:
    with self._part():
      self._stop_trace()

  def _stop_trace(self) -> None:
    jax.profiler.stop_trace()
    self._end = None
    target = self._target
    if not files.is_local(target):  # copy the local trace into the bucket
      for path in sorted(_walk(self._local)):
        relative = os.path.relpath(path, self._local)
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        (target / relative).write_bytes(open(path, "rb").read())
      shutil.rmtree(self._local, ignore_errors=True)
    self.say(f"profile: trace written to {target} (view: tensorboard --logdir "
             f"{self.workdir / FOLDER}, or its .trace.json.gz in ui.perfetto.dev)")


def _walk(folder: str):
  for root, _, names in os.walk(folder):
    for name in names:
      yield os.path.join(root, name)
