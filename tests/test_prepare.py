"""ImageNet from its tars to training, as a new user does it, following the README.

A miniature ILSVRC2012 in the real tar layout (tests/mini_imagenet.py) is prepared with
the README's own preparation commands, run in a fresh virtual environment that sees the
packages of the interpreter running the tests, whether that is the system Python, a venv
or a conda environment (so TensorFlow is installed there only, as the README says it is
needed for preparation only). Then, in this environment (no TensorFlow), MoBY pre-trains on it
with `data.dataset=imagenet2012` (worker processes reading the ArrayRecord files) and a
linear evaluation runs from that workdir. No example may be reported unreadable, and
every prepared label must be the one ImageNet gives the file.
"""

import json
import os
import pathlib
import re
import site
import subprocess
import sys

import pytest

import mini_imagenet
from moby_jax.data.sources import TfdsSource

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_prepare_commands() -> list[str]:
  """The lines of the README's fenced block that runs moby_jax.data.prepare."""
  readme = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
  block = next(b for b in blocks if "moby_jax.data.prepare" in b)
  return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def layered_venv(path: pathlib.Path) -> pathlib.Path:
  """A new virtual environment whose own packages come first, then this interpreter's.

  `venv --system-site-packages` would layer it on the base installation, which inside a
  venv or conda environment is not where this interpreter's packages are; a .pth file in
  the new environment's site-packages lists this interpreter's site directories instead.
  """
  subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
  purelib = subprocess.run(
      [str(path / "bin" / "python"), "-c",
       "import sysconfig; print(sysconfig.get_path('purelib'))"],
      check=True, capture_output=True, text=True).stdout.strip()
  outer = site.getsitepackages()
  if site.ENABLE_USER_SITE:
    outer.append(site.getusersitepackages())
  (pathlib.Path(purelib) / "outer_environment.pth").write_text(
      "".join(f"{directory}\n" for directory in outer if os.path.isdir(directory)))
  return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("imagenet")
  info = mini_imagenet.write(root / "manual")
  venv = layered_venv(root / "venv")
  env = dict(os.environ, PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}")
  for command in readme_prepare_commands():
    command = command.replace("MANUAL_DIR", str(root / "manual")).replace(
        "DATA_DIR", str(root / "tfds"))
    result = subprocess.run(command, shell=True, cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
  assert f"train {len(info['train'])}, validation {len(info['val'])}" in result.stdout
  return root / "tfds", info


def test_prepared_labels_are_imagenets(prepared):
  data_dir, info = prepared
  for split in ("train", "val"):
    source = TfdsSource("imagenet2012", split, str(data_dir))
    assert len(source) == len(info[split]) and source.num_classes == 1000
    for i in range(len(source)):
      file_name = re.search(r"\((.*)\)$", source.name(i)).group(1)
      assert info["synsets"][source[i]["label"]] == info[split][file_name], file_name


def train(*args, timeout=900):
  result = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout


def test_pretrain_and_linear_evaluation_on_the_prepared_imagenet(prepared, tmp_path):
  data_dir, info = prepared
  data = ["--config.data.dataset=imagenet2012", f"--config.data.data_dir={data_dir}"]
  pretrain_dir = tmp_path / "moby"
  train("--config", "configs/moby_swin_tiny.py:runlocal", "--workdir", str(pretrain_dir),
        *data, "--config.data.worker_mode=processes", "--config.train.epochs=2",
        "--config.train.log_every_steps=1")
  metrics = [json.loads(line) for line in (pretrain_dir / "metrics.jsonl").read_text().splitlines()]
  steps = [m for m in metrics if "loss" in m]
  assert len(steps) == 2 * (len(info["train"]) // 16)
  assert all(m["skipped_files"] == 0 for m in steps)

  linear_dir = tmp_path / "linear"
  out = train("--config", "configs/linear_swin_tiny.py:runlocal", "--workdir", str(linear_dir),
              *data, f"--config.linear.source={pretrain_dir}", "--config.train.epochs=1")
  results = json.loads((linear_dir / "results.json").read_text())
  assert results["val_examples"] == len(info["val"]) and results["unreadable_val"] == []
  assert results["skipped_files"] == 0 and 0 <= results["top1"] <= 100
  assert "left out unreadable" not in out and "skipped unreadable" not in out
