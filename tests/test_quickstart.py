"""The README's quick-start command runs and reports what it says."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_command(tmp_path):
  result = subprocess.run(
      [sys.executable, "train.py", "--config", "configs/quickstart.py", "--workdir",
       str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  assert "swin_mu: 35,612 parameters; features (8, 32)" in result.stdout
  summary = json.loads((tmp_path / "forward_check.json").read_text())
  assert summary["feature_shape"] == [8, 32] and summary["params"] == 35_612


def test_bad_config_field_fails_with_a_clear_message(tmp_path):
  result = subprocess.run(
      [sys.executable, "train.py", "--config", "configs/quickstart.py", "--workdir",
       str(tmp_path), "--config.model.img_size=36"], cwd=ROOT, capture_output=True,
      text=True, timeout=600)
  assert result.returncode != 0
  assert "model.img_size" in result.stderr and "36x36" in result.stderr
