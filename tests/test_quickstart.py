"""The README's quick-start command: pre-training on the embedded data, evaluation, export."""

import json
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMAND = [sys.executable, "train.py", "--config", "configs/quickstart.py"]
# A shortened quick start: the same program and outputs in a fraction of the time.
SHORT = ["--config.train.epochs=2", "--config.train.warmup_epochs=1",
         "--config.eval.knn_every_epochs=1", "--config.eval.linear.epochs=1",
         "--config.train.log_every_steps=1"]


def run(workdir, *extra, timeout=900):
  return subprocess.run([*COMMAND, "--workdir", str(workdir), *extra], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def test_short_quickstart_writes_results_and_resumes_after_sigterm(tmp_path):
  workdir = tmp_path / "run"
  started = time.time()
  proc = subprocess.Popen([*COMMAND, "--workdir", str(workdir), *SHORT], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  output = []
  for line in proc.stdout:
    output.append(line)
    if line.startswith("step 2/"):
      proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=900) == 0, "".join(output)  # preemption is not a failure
  wall = time.time() - started
  assert "stop requested (SIGTERM)" in "".join(output)
  assert "time: " in "".join(output) and "over 1 start(s)" in "".join(output)
  assert not (workdir / "results.json").exists()

  started = time.time()
  result = run(workdir, *SHORT)
  wall += time.time() - started
  assert result.returncode == 0, result.stdout + result.stderr
  assert "resumed from" in result.stdout
  results = json.loads((workdir / "results.json").read_text())
  for key in ("knn_top1", "knn_top1_init", "linear_top1", "linear_top1_init",
              "pretrain_steps", "seconds"):
    assert key in results
  for key in ("knn_top1", "knn_top1_init", "linear_top1", "linear_top1_init"):
    assert 0 <= results[key] <= 100
  steps_per_epoch = json.loads((workdir / "config.json").read_text())["train"][
      "steps_per_epoch"]
  assert results["pretrain_steps"] == 2 * steps_per_epoch
  assert "kNN (pre-trained encoder)" in result.stdout
  assert (workdir / "moby_official.pth").is_file()
  assert list((workdir / "tensorboard").iterdir())
  assert (workdir / "config.json").is_file()
  # Where the time of both processes went, from the moment train.py started: the parts
  # add up to the wall time measured here within 5%.
  times = results["goodput"]
  assert times["sessions"] == 2 and "over 2 start(s)" in result.stdout
  parts = sum(times[p] for p in ("startup", "steps", "data", "checkpoint", "evaluation",
                                 "profiling", "redone"))
  assert parts == pytest.approx(times["wall"], rel=1e-6)
  assert times["wall"] == pytest.approx(wall, rel=0.05), (times, wall)
  assert times["evaluation"] > 0 and times["redone"] == 0  # SIGTERM saved its last step


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_quickstart_beats_the_random_encoder(tmp_path, seed):
  result = run(tmp_path, f"--config.train.seed={seed}", timeout=1200)
  assert result.returncode == 0, result.stdout + result.stderr
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["knn_top1"] >= results["knn_top1_init"] + 10, results
  assert results["seconds"] < 600, results


@pytest.mark.slow
def test_bfloat16_quickstart_learns_as_well_as_float32(tmp_path):
  """Mixed precision (bf16 matmuls; float32 residual stream, norms, softmax and loss) on
  the full quick start, seed 0: the last kNN monitor within 2 points of float32's."""
  top1 = {}
  for dtype in ("float32", "bfloat16"):
    result = run(tmp_path / dtype, "--config.train.seed=0", f"--config.model.dtype={dtype}",
                 "--config.eval.enabled=False", timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr
    monitors = re.findall(r"epoch (\d+): kNN top-1 ([\d.]+)%", result.stdout)
    assert monitors, result.stdout
    top1[dtype] = float(monitors[-1][1])
  print(f"kNN top-1 after the quick start, seed 0: {top1}")
  assert abs(top1["bfloat16"] - top1["float32"]) <= 2.0, top1


def test_bad_config_field_fails_with_a_clear_message(tmp_path):
  result = run(tmp_path, "--config.model.img_size=36", timeout=300)
  assert result.returncode != 0
  assert "model.img_size" in result.stderr and "36x36" in result.stderr
