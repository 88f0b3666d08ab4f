"""2 processes x 2 devices over jax.distributed on loopback == 1 process x 4 devices; the
step loop's host syncs; a SIGTERM to one of the processes."""

import json
import os
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

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multiprocess_worker.py"
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
  return workdir, _launch("program", 2, 2, data, workdir, EPOCHS, 1)


def test_two_processes_equal_one(tmp_path):
  _launch("step", 1, 4, tmp_path / "single.npz")
  _launch("step", 2, 2, tmp_path / "multi.npz")
  single, multi = np.load(tmp_path / "single.npz"), np.load(tmp_path / "multi.npz")
  assert np.all(np.isfinite(single["losses"])) and single["losses"].shape == (3,)
  assert rel_err(multi["losses"], single["losses"]) < 1e-5
  for q in ("queue1", "queue2"):
    assert rel_err(multi[q], single[q]) < 1e-5
  assert int(multi["queue_ptr"]) == int(single["queue_ptr"]) == (3 * 8) % 16


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
  """The same run in 1 process x 4 devices."""
  workdir = tmp_path_factory.mktemp("single")
  _launch("program", 1, 4, data, workdir, EPOCHS, 1)
  return workdir


def test_training_program_on_two_processes(two_processes, one_process):
  """The loop, the per-process data slices and the shared orbax checkpoints: 2 processes x
  2 devices give the final state of 1 process x 4 devices."""
  multi_dir, logs = two_processes
  single, _ = checkpoint.load_state(one_process, mesh=_one_device())
  multi, _ = checkpoint.load_state(multi_dir, mesh=_one_device())
  assert int(multi.step) == int(single.step) == 6
  assert rel_err(multi.queue1, single.queue1) < 1e-5
  lines = [json.loads(line) for line in (multi_dir / "metrics.jsonl").read_text().splitlines()]
  last = [r for r in lines if "loss" in r]
  assert last[-1]["step"] == 6 and np.isfinite(last[-1]["loss"])
  assert lines[-1]["step"] == 6 and 0 < lines[-1]["goodput"] < 1  # process 0's summary
  for log in logs:
    assert _tagged(log, "summary")["step"] == 6


def test_evaluation_and_export_on_two_processes_equal_one_process(two_processes, one_process):
  """eval.enabled: kNN and linear probe with every process decoding its slices, then
  results.json and the .pth written once, by process 0, from the in-memory state."""
  multi_dir, logs = two_processes
  multi = json.loads((multi_dir / "results.json").read_text())
  single = json.loads((one_process / "results.json").read_text())
  for key in ("knn_top1", "knn_top5", "linear_top1", "linear_top5", "knn_top1_init",
              "linear_top1_init", "val_examples", "pretrain_steps"):
    assert multi[key] == pytest.approx(single[key]), key
  assert multi["pth"] == str(multi_dir / "moby_official.pth")
  import torch
  exported = [torch.load(d / "moby_official.pth", weights_only=True)["model"]
              for d in (multi_dir, one_process)]
  assert exported[0].keys() == exported[1].keys()
  assert rel_err(exported[0]["queue1"].numpy(), exported[1]["queue1"].numpy()) < 1e-5
  assert all("summary" in log for log in logs)


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
  procs = _start("program", 2, 2, data, workdir, EPOCHS, 0)
  output = []
  for line in procs[0].stdout:
    output.append(line)
    # While step 1 compiles (seconds): the notice reaches the coordination service
    # (whose SIGTERM notifier polls once a second) before the 6 quick steps are over.
    if line.startswith("dispatched 1"):
      procs[1].send_signal(signal.SIGTERM)  # process 1 only
      break
  rest = procs[0].communicate(timeout=600)[0]
  logs = ["".join(output) + rest, procs[1].communicate(timeout=600)[0]]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]  # a preemption is not a failure
  summaries = [_tagged(log, "summary") for log in logs]
  assert all(s["preempted"] for s in summaries)
  stopped = summaries[0]["step"]
  assert summaries[1]["step"] == stopped and 1 <= stopped < 6
  assert checkpoint.Checkpointer(workdir, None, 0, None).latest_step() == stopped

  logs = _launch("program", 2, 2, data, workdir, EPOCHS, 0)
  assert all(not _tagged(log, "summary")["preempted"] for log in logs)
  resumed, _ = checkpoint.load_state(workdir, mesh=_one_device())
  expected, _ = checkpoint.load_state(uninterrupted, mesh=_one_device())
  assert_states_identical(resumed, expected)


def slurm_command() -> str:
  """The command launch/slurm.sbatch runs in every task (what follows `srun [options]`)."""
  script = (ROOT / "launch" / "slurm.sbatch").read_text().replace("\\\n", " ")
  line = next(line for line in script.splitlines() if line.startswith("srun "))
  return "python3 " + line.split(" python3 ", 1)[1]


def test_the_slurm_script_runs_two_tasks_like_one_process(data, one_process, tmp_path):
  """launch/slurm.sbatch's own command in 2 tasks of a faked srun step on 127.0.0.1 (the
  SLURM variables srun sets; JAX finds the coordinator, count and ranks in them)."""
  workdir = tmp_path / "slurm"
  overrides = ["--config.moby.queue_size=32", "--config.moby.proj_hidden_dim=32",
               "--config.moby.pred_hidden_dim=32", "--config.moby.proj_dim=16",
               "--config.data.dataset=folder", f"--config.data.path={data}",
               "--config.data.batch_size=8", "--config.data.num_workers=2",
               f"--config.train.epochs={EPOCHS}", "--config.train.warmup_epochs=1",
               "--config.train.checkpoint_every_steps=100"]
  env = dict(os.environ, CONFIG="configs/moby_swin_tiny.py:runlocal", WORKDIR=str(workdir),
             DATA_DIR=str(tmp_path / "unused"), SLURM_JOB_ID="4242",
             SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2",
             JAX_COORDINATOR_PORT=str(_free_port()), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
             XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PATH=f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
  procs = [subprocess.Popen(["bash", "-c", slurm_command(), "bash", *overrides], cwd=ROOT,
                            env=dict(env, SLURM_PROCID=str(i), SLURM_LOCALID=str(i)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = _finish(procs)
  assert "4 device(s), 2 process(es)" in logs[0]
  slurm, _ = checkpoint.load_state(workdir, mesh=_one_device())
  single, _ = checkpoint.load_state(one_process, mesh=_one_device())
  assert int(slurm.step) == int(single.step) == 6
  # The keys of the last steps (the queues) carry the whole computation; parameters with
  # an exactly-zero gradient differ by Adam-amplified rounding noise (README, Tests).
  for queue in ("queue1", "queue2"):
    assert rel_err(getattr(slurm, queue), getattr(single, queue)) < 1e-5


@pytest.mark.parametrize("env,expected", [
    ({}, None),
    ({"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "16",
      "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}, "slurm"),
    ({"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1",
      "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, None),  # one task: a single process
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:4000", "OMPI_COMM_WORLD_SIZE": "4"},
     "openmpi"),
    ({"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "t-0"}, None),
])
def test_cluster_environments_are_recognised(monkeypatch, env, expected):
  for name in list(os.environ):
    if name.startswith(("SLURM_", "OMPI_", "TPU_", "KUBERNETES_", "JOB_COMPLETION")):
      monkeypatch.delenv(name)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert parallel.cluster_environment() == expected
