"""Where a run's wall time goes, over every start of the run (goodput).

Each start of a training program is a session. Its `Clock` charges every second, from the
process start (train.py calls `process_started()` before its slow imports) to the end, to
exactly one part:

  startup      imports, config and data checks, building the run, restoring a checkpoint,
               the FLOP count and compiling the first step
  steps        training steps: dispatching them, waiting for the devices at log steps,
               logging
  data         waiting for the input pipeline
  checkpoint   saving checkpoints (and waiting for asynchronous saves), the final export
  evaluation   the kNN monitor, the final kNN and linear probes
  profiling    starting and writing the profiler traces asked for (moby_jax.monitor)

Process 0 keeps the session's record in WORKDIR/goodput/session_NNN.json, rewritten at
every log step and checkpoint save, so a session killed without warning still counts up
to its last log step (the seconds after it, and the time between sessions, are not
known to the workdir and not counted). `summary(workdir)` adds the sessions up; when a
session resumed from step S, the steps an earlier session had run beyond S were redone:
their step and data time moves to one more part, `redone`. `goodput` is the share of the
wall time spent on steps that counted.
"""

import contextlib
import json
import time

from moby_jax import files

PARTS = ("startup", "steps", "data", "checkpoint", "evaluation", "profiling")
FOLDER = "goodput"
_process_start: list[float] = []


def process_started() -> None:
  """Marks now as the start of this process's session (train.py, before its imports)."""
  _process_start[:] = [time.time()]


class Clock:
  """The session's time by part. The part being charged is the innermost `part(...)`
  context, or the base part outside them (`startup` until `set_base`)."""

  def __init__(self):
    started = _process_start.pop() if _process_start else time.time()
    self.started = started
    self._last = time.perf_counter()
    self.wall_before = time.time() - started  # from the process start to this clock
    self.seconds = dict.fromkeys(PARTS, 0.0)
    self.seconds["startup"] = self.wall_before
    self._stack = ["startup"]

  def _charge(self) -> None:
    now = time.perf_counter()
    self.seconds[self._stack[-1]] += now - self._last
    self._last = now

  def set_base(self, part: str) -> None:
    """From now on, time outside any `part(...)` is charged to `part`."""
    self._charge()
    self._stack[0] = part

  @contextlib.contextmanager
  def part(self, part: str):
    self._charge()
    self._stack.append(part)
    try:
      yield
    finally:
      self._charge()
      self._stack.pop()

  def snapshot(self) -> dict:
    self._charge()
    return dict(self.seconds)


def charged(clock: Clock | None, part: str):
  """`clock.part(part)`, or a context that does nothing where there is no clock."""
  return clock.part(part) if clock else contextlib.nullcontext()


class Session:
  """This start's record in WORKDIR/goodput, timed by `clock` (process 0 writes it; the
  others keep their clock only). The step loop calls `begin` with the step it starts (or
  resumed) from, then `stepped` at log steps and checkpoint saves."""

  def __init__(self, clock: Clock, workdir, main: bool):
    self.clock = clock
    self.workdir = files.path(workdir)
    self.main = main
    self.first_step = self.last_step = None
    self._path = None
    # Step and data seconds so far, at each step a checkpoint was saved (a later session
    # resumes from one of them).
    self._at_saves: dict[int, list[float]] = {}
    if main:
      folder = self.workdir / FOLDER
      folder.mkdir(parents=True, exist_ok=True)
      self._path = folder / f"session_{len(list(folder.glob('session_*.json'))):03d}.json"

  def begin(self, first_step: int) -> None:
    self.first_step = self.last_step = first_step
    self.write()

  def _step_seconds(self) -> list[float]:
    seconds = self.clock.snapshot()
    return [seconds["steps"], seconds["data"]]

  def stepped(self, step: int, saved: bool = False) -> None:
    """Step `step` is done (at a log step or a checkpoint save: rewrites the record)."""
    self.last_step = step
    if saved:
      self._at_saves[step] = self._step_seconds()
    self.write()

  def write(self, finished: bool = False) -> None:
    if self._path is None or self.first_step is None:
      return
    seconds = self.clock.snapshot()
    record = dict(started=self.clock.started, wall=sum(seconds.values()), parts=seconds,
                  first_step=self.first_step, last_step=self.last_step,
                  at_saves={str(k): v for k, v in self._at_saves.items()},
                  at_last_step=[seconds["steps"], seconds["data"]], finished=finished)
    self._path.write_text(json.dumps(record) + "\n")


def redone_seconds(session: dict, resumed_from: int) -> tuple[float, float]:
  """(step, data) seconds `session` spent on the steps after `resumed_from`, the step the
  next session restarted from: its last checkpoint, or an earlier one (zeros when the
  next session did not start behind this one's last step)."""
  if resumed_from >= session["last_step"]:
    return 0.0, 0.0
  saves = {int(k): v for k, v in session["at_saves"].items() if int(k) <= resumed_from}
  base = saves[max(saves)] if saves else [0.0, 0.0]
  last = session["at_last_step"]
  return last[0] - base[0], last[1] - base[1]


def finish(session: Session, finished: bool) -> dict | None:
  """Writes the session's last record and returns the run's `summary` (None on processes
  other than 0, which keep no record)."""
  session.write(finished=finished)
  return summary(session.workdir) if session.main else None


def scalars(result: dict) -> dict[str, float]:
  """A summary as metrics: time/PART_s, time/wall_s and goodput."""
  return {**{f"time/{part}_s": result[part] for part in (*PARTS, "redone", "wall")},
          "goodput": result["goodput"]}


def summary(workdir) -> dict:
  """The whole run so far: {"wall", the parts and "redone" (seconds), "goodput" (share
  of the wall spent on steps that counted), "sessions"}."""
  folder = files.path(workdir) / FOLDER
  sessions = [json.loads(p.read_text()) for p in sorted(folder.glob("session_*.json"))]
  sessions.sort(key=lambda s: s["started"])
  totals = dict.fromkeys(PARTS, 0.0)
  totals["redone"] = 0.0
  for i, session in enumerate(sessions):
    steps, data = (redone_seconds(session, sessions[i + 1]["first_step"])
                   if i + 1 < len(sessions) else (0.0, 0.0))
    for part in PARTS:
      totals[part] += session["parts"][part]
    totals["steps"] -= steps
    totals["data"] -= data
    totals["redone"] += steps + data
  wall = sum(s["wall"] for s in sessions)
  return dict(wall=wall, **totals, goodput=totals["steps"] / wall if wall else 0.0,
              sessions=len(sessions))


def format_summary(result: dict) -> str:
  """One line: the wall time and each part's share of it."""
  wall = result["wall"] or 1.0
  parts = ", ".join(f"{part} {result[part]:.0f} s ({100 * result[part] / wall:.0f}%)"
                    for part in (*PARTS, "redone"))
  return (f"time: {result['wall']:.0f} s over {result['sessions']} start(s): {parts}; "
          f"goodput {100 * result['goodput']:.1f}%")
