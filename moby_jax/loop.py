"""What the training programs share: the step loop with checkpoints, logging and
preemption, the count of unreadable files, and process-0 output.

`run_loop` drives a jitted step over a loader until the schedule ends or a stop is
requested; the programs (`moby_jax.pretrain`, `moby_jax.linear`) build their step, state
and loader and hand them to it.
"""

import collections
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from moby_jax import goodput, optim, parallel, preemption


def is_main() -> bool:
  return jax.process_index() == 0


def say(message: str) -> None:
  if is_main():
    print(message, flush=True)


def sync_num_examples(config, source) -> None:
  """data.num_train_examples (and with it the default steps_per_epoch) follows the data."""
  n = len(source)
  if config.data.num_train_examples != n:
    say(f"data: the training split has {n} examples (data.num_train_examples was "
        f"{config.data.num_train_examples}); using {n}")
    with config.unlocked():
      config.data.num_train_examples = n


class BadFiles:
  """Training files that could not be read, over all processes: those left out when the
  source was listed, plus those that failed to decode (by source index). Each is named
  once in the log; the count is the `skipped_files` metric."""

  def __init__(self, source):
    self.source = source
    self.indices: set[int] = set()
    self._new: set[int] = set()
    for entry in source.skipped:
      say(f"data: skipped {entry}")

  def add(self, bad: np.ndarray) -> None:
    """Notes this process's unreadable indices of a batch (-1: none)."""
    self._new.update(int(i) for i in np.asarray(bad).ravel() if i >= 0)

  def sync(self) -> int:
    """Shares what every process met since the last call (a collective: every process
    calls it at the same step) and returns the global count."""
    new = parallel.union_over_processes(self._new - self.indices) - self.indices
    self._new.clear()
    for index in sorted(new):
      say(f"data: skipped unreadable example {self.source.name(index)}")
    self.indices |= new
    return self.count

  @property
  def count(self) -> int:
    return len(self.source.skipped) + len(self.indices)


def name_unreadable(source, indices, what: str) -> list[str]:
  """Logs and returns the names of evaluation examples that could not be decoded (they
  are left out of the metric, never replaced)."""
  names = [source.name(i) for i in sorted(indices)]
  for name in names:
    say(f"{what}: left out unreadable example {name}")
  return names


class TrainingDiverged(RuntimeError):
  """train.max_consecutive_skipped_steps steps in a row had a non-finite loss or gradient."""


def run_loop(*, config, mesh, loader, state, step_fn, ckpt, logger, bad_files, unit_metrics,
              on_epoch_end=None, progress=None, session=None, profiler=None) -> tuple:
  """Steps until train.epochs are done or a stop is requested; returns (state, preempted).

  `on_epoch_end(state, epoch)` runs after the last step of each epoch; `progress()` gives
  JSON-able run state saved with every checkpoint next to the data position (restored
  with it). `session` (goodput.Session) has the loop's time charged to its parts (the
  first step, which compiles, to start-up) and is recorded at log steps and saves;
  `profiler` (monitor.Profiler) traces the steps it is asked to.

  Nothing here waits for the devices except at log steps (metrics are fetched then) and
  checkpoint steps: the stop check is local (preemption.requested), so the host keeps
  dispatching ahead of the running step, and the next data.device_prefetch batches are
  already on their way to the devices while a step runs.
  """
  total = optim.total_steps(config)
  steps_per_epoch = config.train.steps_per_epoch
  first = step = int(jax.device_get(state.step))
  limit = config.train.max_consecutive_skipped_steps
  # Steps skipped in a row, counted on the device (no host sync per step).
  consecutive = jax.device_put(np.int32(0), parallel.replicated(mesh))
  preempted = False
  # Batches taken from the loader and placed on the devices (asynchronously) before their
  # step: (unreadable indices, global batch, seconds waited for it).
  ahead = collections.deque()
  depth = max(1, config.data.device_prefetch)

  part = functools.partial(goodput.charged, session and session.clock)

  if session:
    session.begin(first)

  def position() -> dict:
    """Where the next start continues: the batches fetched ahead are not consumed yet."""
    return {**loader.get_state(rewind=len(ahead)), **(progress() if progress else {})}

  def fetch() -> None:
    start = time.perf_counter()
    with part("data"):
      batch = next(loader)
    waited = time.perf_counter() - start
    bad = batch.pop("bad")
    ahead.append((bad, parallel.to_global({k: batch[k] for k in unit_metrics}, mesh), waited))

  def save(force: bool = False) -> None:
    with part("checkpoint"):
      saved = ckpt.save(step, state, position(), force=force)
    if saved and session:
      session.stepped(step, saved=True)

  try:
    while step < total:
      if preemption.requested():
        if step > first:
          say(f"stop requested (SIGTERM): saving step {step} and exiting")
          save(force=True)
        else:
          say(f"stop requested (SIGTERM) before the first step: exiting at step {step}")
        preempted = True
        break
      while len(ahead) < min(depth, total - step):
        fetch()
      bad, batch, waited = ahead.popleft()
      bad_files.add(bad)
      if profiler:
        profiler.before_step(step + 1)
      state, metrics = step_fn(state, batch)
      if session and step == first:  # the first step compiled: start-up ends here
        session.clock.set_base("steps")
      consecutive = _count_skipped(consecutive, metrics["skipped"])
      step += 1
      if profiler:
        profiler.after_step(step, state)
      logger.record_step(waited)
      if step % config.train.log_every_steps == 0 or step == total:
        metrics, in_a_row = jax.device_get((metrics, consecutive))
        metrics["skipped_files"] = bad_files.sync()
        logger.log(step, metrics)
        if session:
          session.stepped(step)
        if profiler:
          profiler.at_log_step(step)
        if limit and in_a_row >= limit:
          save(force=True)
          raise TrainingDiverged(
              f"the last {int(in_a_row)} steps (up to step {step}) had a non-finite loss or "
              f"gradient and were skipped (train.max_consecutive_skipped_steps={limit}); "
              f"step {step} is saved: lower the learning rate or check the data")
      if on_epoch_end is not None and step % steps_per_epoch == 0:
        with part("evaluation"):
          on_epoch_end(state, step // steps_per_epoch)
      save()
    if profiler:
      profiler.close(state)
    if not preempted:
      save(force=True)
    bad_files.sync()
  finally:
    if profiler:
      profiler.close()  # after an error: stop tracing without waiting for the state
    loader.close()
    with part("checkpoint"):
      ckpt.wait()
    if session:
      session.stepped(step)
  return state, preempted


@jax.jit
def _count_skipped(consecutive, skipped):
  return jnp.where(skipped > 0, consecutive + 1, 0).astype(jnp.int32)


def end_session(session, logger, step: int, finished: bool) -> dict | None:
  """Records the session's end (goodput.finish), prints where the run's time went and
  writes it to the metrics at `step`; returns the summary (None off process 0)."""
  times = goodput.finish(session, finished)
  if times is not None:
    say(goodput.format_summary(times))
    logger.scalars(step, goodput.scalars(times))
  return times


def stop_summary(what: str) -> dict | None:
  """A summary for a stop requested before `what` (None: go on)."""
  if not preemption.requested():
    return None
  say(f"stop requested (SIGTERM) before {what}: exiting")
  return {"preempted": True}


def eval_batch(config, mesh) -> int:
  """A batch for feature extraction: data.batch_size rounded to a multiple of the devices."""
  return -(-config.data.batch_size // mesh.size) * mesh.size
