"""2 processes x 2 devices over jax.distributed on loopback == 1 process x 4 devices."""

import json
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


def _launch(mode: str, nproc: int, devices: int, *args) -> None:
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, str(WORKER), mode, str(pid), str(nproc), str(port),
                             str(devices), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for pid in range(nproc)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]


def test_two_processes_equal_one(tmp_path):
  _launch("step", 1, 4, tmp_path / "single.npz")
  _launch("step", 2, 2, tmp_path / "multi.npz")
  single, multi = np.load(tmp_path / "single.npz"), np.load(tmp_path / "multi.npz")
  assert np.all(np.isfinite(single["losses"])) and single["losses"].shape == (3,)
  assert rel_err(multi["losses"], single["losses"]) < 1e-5
  for q in ("queue1", "queue2"):
    assert rel_err(multi[q], single[q]) < 1e-5
  assert int(multi["queue_ptr"]) == int(single["queue_ptr"]) == (3 * 8) % 16


def test_training_program_on_two_processes(tmp_path):
  """The loop, the per-process data slices and the shared orbax checkpoints: 2 processes x
  2 devices give the losses and the final queues of 1 process x 4 devices."""
  from test_data import write_folder
  from moby_jax import checkpoint, parallel
  import jax
  data = write_folder(tmp_path / "images", per_class=12)
  _launch("program", 1, 4, data, tmp_path / "single")
  _launch("program", 2, 2, data, tmp_path / "multi")
  losses = {}
  for name in ("single", "multi"):
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    losses[name] = [r["loss"] for r in map(json.loads, lines) if "loss" in r]
  assert len(losses["single"]) == 3 and np.all(np.isfinite(losses["single"]))
  assert rel_err(losses["multi"], losses["single"]) < 1e-5
  mesh = parallel.make_mesh(jax.devices()[:1])
  single, _ = checkpoint.load_state(tmp_path / "single", mesh=mesh)
  multi, _ = checkpoint.load_state(tmp_path / "multi", mesh=mesh)
  assert int(multi.step) == int(single.step) == 3
  assert rel_err(multi.queue1, single.queue1) < 1e-5
