"""Run logging: console progress lines and TensorBoard event files (process 0 only)."""

import json
import math
import time

import jax

from moby_jax import files, monitor

# Parts of a session's clock (moby_jax.goodput) that are not training: left out of the
# window a log line's rates are measured over.
_NOT_TRAINING = ("startup", "checkpoint", "evaluation", "profiling")


class MetricLogger:
  """Prints `step/total epoch loss lr ... pairs/s data% MFU memory ETA` lines and writes
  every scalar to TensorBoard (`WORKDIR/tensorboard`) and, one JSON object per line, to
  `WORKDIR/metrics.jsonl`.

  Rates are over the training time since the last log line: with a `clock`
  (goodput.Clock), the seconds it charged to start-up (the first step's compile),
  checkpoints, evaluation and profiling are left out. With `flops_per_device_step`
  (costs.step_flops over the mesh's devices) each line has `tflops_per_device` and,
  with `peak_tflops` (per device), `mfu`. Device and host memory
  (monitor.memory_metrics) are in every line's metrics.
  """

  def __init__(self, workdir, total_steps: int, steps_per_epoch: int, batch_size: int,
               unit: str = "pairs", *, clock=None,
               flops_per_device_step: float | None = None,
               peak_tflops: float | None = None):
    self.total_steps = total_steps
    self.steps_per_epoch = steps_per_epoch
    self.batch_size = batch_size
    self.unit = unit
    self.clock = clock
    self.flops_per_device_step = flops_per_device_step
    self.peak_tflops = peak_tflops
    self.main = jax.process_index() == 0
    self.writer = self.jsonl = None
    if self.main:
      self.writer = files.tensorboard_writer(files.path(workdir) / "tensorboard")
      self.jsonl = files.AppendFile(files.path(workdir) / "metrics.jsonl")
    self._reset(time.perf_counter())

  def _not_training(self) -> float:
    if self.clock is None:
      return 0.0
    seconds = self.clock.snapshot()
    return sum(seconds[part] for part in _NOT_TRAINING)

  def _reset(self, now: float) -> None:
    self._window_start, self._window_steps, self._data_seconds = now, 0, 0.0
    self._window_other = self._not_training()

  def record_step(self, data_seconds: float) -> None:
    """Counts one step and the seconds it waited for its batch."""
    self._window_steps += 1
    self._data_seconds += data_seconds

  def scalars(self, step: int, values: dict) -> None:
    if self.writer is not None:
      values = {name: float(value) for name, value in values.items()}
      for name, value in values.items():
        self.writer.add_scalar(name, value, step)
      self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
      self.jsonl.flush()

  def log(self, step: int, metrics: dict) -> None:
    """Prints a progress line for the steps since the last call and writes the scalars."""
    now = time.perf_counter()
    other = self._not_training() - self._window_other
    elapsed = max(now - self._window_start - other, 1e-9)
    steps_per_s = self._window_steps / elapsed
    extra = {f"{self.unit}_per_s": steps_per_s * self.batch_size,
             "data_wait": self._data_seconds / elapsed}
    if self.flops_per_device_step is not None:
      extra["tflops_per_device"] = self.flops_per_device_step * steps_per_s / 1e12
      if self.peak_tflops:
        extra["mfu"] = extra["tflops_per_device"] / self.peak_tflops
    memory = monitor.memory_metrics()
    self.scalars(step, {**metrics, **extra, **memory})
    if self.main:
      eta = (self.total_steps - step) / steps_per_s if steps_per_s > 0 else math.inf
      parts = [f"step {step}/{self.total_steps}", f"epoch {step / self.steps_per_epoch:.2f}"]
      parts += [f"{k} {_fmt(v)}" for k, v in metrics.items()]
      parts += [f"{self.unit}/s {extra[f'{self.unit}_per_s']:.1f}",
                f"data {100 * extra['data_wait']:.0f}%"]
      if "mfu" in extra:
        parts.append(f"MFU {100 * extra['mfu']:.1f}%")
      elif "tflops_per_device" in extra:
        parts.append(f"TFLOP/s per device {extra['tflops_per_device']:.3g}")
      if "device_peak_memory_gib" in memory:
        limit = memory.get("device_memory_limit_gib")
        parts.append(f"memory {memory['device_peak_memory_gib']:.1f}"
                     + (f"/{limit:.1f}" if limit else "") + " GiB")
      parts.append(f"ETA {_duration(eta)}")
      print(" | ".join(parts), flush=True)
    self._reset(now)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
      self.jsonl.close()


def _fmt(value) -> str:
  value = float(value)
  if not math.isfinite(value):
    return str(value)
  if value == int(value) and abs(value) < 1e6:
    return str(int(value))
  return f"{value:.4g}"


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
