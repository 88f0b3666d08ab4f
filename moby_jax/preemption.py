"""Stop requests (SIGTERM, how schedulers announce preemption) from process start to exit.

`install()` runs first thing in train.py, so a SIGTERM at any moment (imports, start-up,
compilation, training, evaluation, export) is a request to stop cleanly, never a kill.
The programs ask `requested()` at safe points: every training step, and between the
phases around the loop. A stop there saves what has to be saved and returns, and
train.py exits 0, which schedulers read as success; the next start resumes.

One process (no `jax.distributed`): the handler sets a flag and `requested()` reads it.

Several processes (`jax.distributed`): every process must stop at the same step, without
a collective per step (that would make the host wait for every step to finish before
dispatching the next). JAX's preemption service does this: `jax.distributed.initialize`
installs the coordination service's SIGTERM notifier, and after a SIGTERM on any process
`multihost_utils.reached_preemption_sync_point(n)` becomes True on every process at the
same call n (a local check until a notice arrives). All processes call `requested()` at
the same points of the same program, so a counter of calls is that shared n. A SIGTERM
that came before `jax.distributed.initialize` (when our handler still owned the signal)
is shared once, with one collective, at the first call.
"""

import contextlib
import signal
import threading

import numpy as np

_stop = threading.Event()
_installed = False
_calls = 0
_early_shared = False


def _handle(signum, frame) -> None:
  del signum, frame
  _stop.set()


def install() -> None:
  """Turns SIGTERM into a stop request for the rest of the process (idempotent)."""
  global _installed
  if not _installed:
    signal.signal(signal.SIGTERM, _handle)
    _installed = True


@contextlib.contextmanager
def handling():
  """SIGTERM is a stop request inside the block. If `install()` did not already make it
  so for the whole process (train.py does), the previous handler comes back afterwards
  and a request made inside is forgotten: a library caller (a test, a notebook) can run
  a program again in the same process."""
  global _installed
  if _installed:
    yield
    return
  previous = signal.signal(signal.SIGTERM, _handle)
  _installed = True
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)
    _installed = False
    _stop.clear()


def requested() -> bool:
  """Whether the run should stop here. Under jax.distributed, a collective decision that
  every process reaches at the same call (so call it at the same points on all)."""
  global _calls, _early_shared
  import jax
  if not jax.distributed.is_initialized():
    return _stop.is_set()
  from jax.experimental import multihost_utils
  if not _early_shared:
    _early_shared = True
    if bool(np.any(multihost_utils.process_allgather(np.asarray(_stop.is_set())))):
      _stop.set()
  if not _stop.is_set():
    _calls += 1
    if multihost_utils.reached_preemption_sync_point(_calls):
      _stop.set()
  return _stop.is_set()
