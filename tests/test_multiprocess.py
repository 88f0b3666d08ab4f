"""2 processes x 2 devices over jax.distributed on loopback == 1 process x 4 devices; the
step loop's host syncs; a SIGTERM to one of the processes."""

import json
import pathlib
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import rel_err
from moby_jax import checkpoint, parallel
from test_data import write_folder
from test_program import assert_states_identical

WORKER = pathlib.Path(__file__).resolve().parent / "multiprocess_worker.py"
EPOCHS = 2  # 24 images at batch 8: 6 steps


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(mode: str, nproc: int, devices: int, *args) -> list[subprocess.Popen]:
  port = _free_port()
  return [subprocess.Popen([sys.executable, str(WORKER), mode, str(pid), str(nproc), str(port),
                            str(devices), *map(str, args)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for pid in range(nproc)]


def _finish(procs) -> list[str]:
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return logs


def _launch(mode: str, nproc: int, devices: int, *args) -> list[str]:
  return _finish(_start(mode, nproc, devices, *args))


def _tagged(log: str, tag: str):
  return json.loads(next(line for line in log.splitlines() if line.startswith(tag + " "))
                    [len(tag) + 1:])


def _one_device():
  return parallel.make_mesh(jax.devices()[:1])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return write_folder(tmp_path_factory.mktemp("data") / "images", per_class=12)


@pytest.fixture(scope="module")
def two_processes(data, tmp_path_factory):
  """An uninterrupted 2-process x 2-device run of the training program."""
  workdir = tmp_path_factory.mktemp("multi")
  return workdir, _launch("program", 2, 2, data, workdir, EPOCHS)


def test_two_processes_equal_one(tmp_path):
  _launch("step", 1, 4, tmp_path / "single.npz")
  _launch("step", 2, 2, tmp_path / "multi.npz")
  single, multi = np.load(tmp_path / "single.npz"), np.load(tmp_path / "multi.npz")
  assert np.all(np.isfinite(single["losses"])) and single["losses"].shape == (3,)
  assert rel_err(multi["losses"], single["losses"]) < 1e-5
  for q in ("queue1", "queue2"):
    assert rel_err(multi[q], single[q]) < 1e-5
  assert int(multi["queue_ptr"]) == int(single["queue_ptr"]) == (3 * 8) % 16


def test_training_program_on_two_processes(data, two_processes, tmp_path):
  """The loop, the per-process data slices and the shared orbax checkpoints: 2 processes x
  2 devices give the final state of 1 process x 4 devices."""
  multi_dir, logs = two_processes
  _launch("program", 1, 4, data, tmp_path / "single", EPOCHS)
  single, _ = checkpoint.load_state(tmp_path / "single", mesh=_one_device())
  multi, _ = checkpoint.load_state(multi_dir, mesh=_one_device())
  assert int(multi.step) == int(single.step) == 6
  assert rel_err(multi.queue1, single.queue1) < 1e-5
  last = [json.loads(line) for line in (multi_dir / "metrics.jsonl").read_text().splitlines()]
  assert last[-1]["step"] == 6 and np.isfinite(last[-1]["loss"])
  for log in logs:
    assert _tagged(log, "summary")["step"] == 6


def test_step_loop_never_waits_for_the_devices_between_log_steps(two_processes):
  """No host sync (device_get, block_until_ready, process_allgather: the old per-step stop
  check) while steps 1..5 are dispatched: only before the first step and at the last
  (the only log step here), so the host keeps dispatching ahead of the devices."""
  _, logs = two_processes
  for log in logs:
    syncs = {int(k): v for k, v in _tagged(log, "syncs").items()}
    assert set(syncs) <= {0, 6}, syncs


def test_sigterm_to_one_process_stops_both_at_the_same_step_and_resumes_exactly(
    data, two_processes, tmp_path):
  uninterrupted, _ = two_processes
  workdir = tmp_path / "run"
  procs = _start("program", 2, 2, data, workdir, EPOCHS)
  output = []
  for line in procs[0].stdout:
    output.append(line)
    if line.startswith("dispatched 2"):
      procs[1].send_signal(signal.SIGTERM)  # process 1 only
      break
  rest = procs[0].communicate(timeout=600)[0]
  logs = ["".join(output) + rest, procs[1].communicate(timeout=600)[0]]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]  # a preemption is not a failure
  summaries = [_tagged(log, "summary") for log in logs]
  assert all(s["preempted"] for s in summaries)
  stopped = summaries[0]["step"]
  assert summaries[1]["step"] == stopped and 2 <= stopped < 6
  assert checkpoint.Checkpointer(workdir, None, 0, None).latest_step() == stopped

  logs = _launch("program", 2, 2, data, workdir, EPOCHS)
  assert all(not _tagged(log, "summary")["preempted"] for log in logs)
  resumed, _ = checkpoint.load_state(workdir, mesh=_one_device())
  expected, _ = checkpoint.load_state(uninterrupted, mesh=_one_device())
  assert_states_identical(resumed, expected)
