"""2 processes x 2 devices over jax.distributed on loopback == 1 process x 4 devices."""

import pathlib
import socket
import subprocess
import sys

import numpy as np

from conftest import rel_err

WORKER = pathlib.Path(__file__).resolve().parent / "multiprocess_worker.py"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(nproc: int, devices: int, out: pathlib.Path) -> None:
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, str(WORKER), str(pid), str(nproc), str(port),
                             str(devices), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for pid in range(nproc)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]


def test_two_processes_equal_one(tmp_path):
  _launch(1, 4, tmp_path / "single.npz")
  _launch(2, 2, tmp_path / "multi.npz")
  single, multi = np.load(tmp_path / "single.npz"), np.load(tmp_path / "multi.npz")
  assert np.all(np.isfinite(single["losses"])) and single["losses"].shape == (3,)
  assert rel_err(multi["losses"], single["losses"]) < 1e-5
  for q in ("queue1", "queue2"):
    assert rel_err(multi[q], single[q]) < 1e-5
  assert int(multi["queue_ptr"]) == int(single["queue_ptr"]) == (3 * 8) % 16
