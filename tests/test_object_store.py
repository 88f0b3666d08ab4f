"""A workdir in a bucket: train.py with --workdir gs://... against a local GCS emulator.

The emulator (tests/gcs_emulator.py) serves Google Cloud Storage's JSON API on 127.0.0.1;
etils.epath reaches it through gcsfs (STORAGE_EMULATOR_HOST) and orbax's tensorstore
through TENSORSTORE_GCS_HTTP_URL, so every file of the run takes the path a real gs://
workdir takes: checkpoints, config, metrics, TensorBoard events, results and the export.
The run is stopped by SIGTERM, resumed, evaluated and exported.
"""

import io
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUCKET = "moby-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """Environment variables pointing GCS clients at a fresh emulator."""
  port = _free_port()
  server = subprocess.Popen(
      [sys.executable, str(ROOT / "tests" / "gcs_emulator.py"), str(port),
       str(tmp_path_factory.mktemp("gcs")), BUCKET],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 60
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      break
    except OSError:
      assert time.time() < deadline and server.poll() is None, "the GCS emulator did not start"
      time.sleep(0.2)
  url = f"http://127.0.0.1:{port}"
  yield {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}
  server.terminate()
  server.wait(timeout=30)


def test_a_bucket_workdir_trains_resumes_evaluates_and_exports(gcs, tmp_path, monkeypatch):
  from test_data import write_folder
  data = write_folder(tmp_path / "images", per_class=12)
  workdir = f"gs://{BUCKET}/runs/tiny"
  command = [sys.executable, "train.py", "--config", "configs/moby_swin_tiny.py:runlocal",
             "--workdir", workdir, "--config.data.dataset=folder", f"--config.data.path={data}",
             "--config.data.batch_size=8", "--config.moby.queue_size=32",
             "--config.train.epochs=2", "--config.train.log_every_steps=1",
             "--config.train.checkpoint_every_steps=2", "--config.eval.enabled=true",
             "--config.eval.linear.epochs=1", "--config.eval.linear.batch_size=8"]
  env = dict(os.environ, **gcs)
  proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  output = []
  for line in proc.stdout:
    output.append(line)
    if line.startswith("step 2/"):
      proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=600) == 0, "".join(output)[-3000:]
  assert "stop requested (SIGTERM)" in "".join(output)
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "resumed from" in result.stdout

  for name, value in gcs.items():
    monkeypatch.setenv(name, value)
  import torch
  from etils import epath
  run = epath.Path(workdir)
  results = json.loads((run / "results.json").read_text())
  assert results["pretrain_steps"] == 6 and 0 <= results["knn_top1"] <= 100
  assert results["pth"] == f"{workdir}/moby_official.pth"
  steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
           if "loss" in r]
  assert steps[0] == 1 and steps[-1] == 6 and set(range(1, 7)) <= set(steps)
  assert json.loads((run / "config.json").read_text())["data"]["batch_size"] == 8
  assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
  assert {p.name for p in (run / "checkpoints").iterdir()} >= {"6"}
  checkpoint = torch.load(io.BytesIO((run / "moby_official.pth").read_bytes()),
                          weights_only=True)
  assert "encoder.patch_embed.proj.weight" in checkpoint["model"]
  assert int(checkpoint["model"]["queue_ptr"][0]) == (6 * 8) % 32
