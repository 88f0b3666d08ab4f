"""The training program: determinism, exact resume after SIGTERM, damaged checkpoints,
skipped files, early errors, and linear evaluation from a workdir or a .pth."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from configs import linear_swin_tiny, moby_swin_tiny
from moby_jax import checkpoint, costs, goodput, linear, logger, loop, parallel, pretrain, run
from test_data import write_folder

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  # 2 classes x 12 images: 24 training examples, 3 steps per epoch at batch 8.
  return write_folder(tmp_path_factory.mktemp("data") / "images", per_class=12)


def tiny_config(folder, **train):
  c = moby_swin_tiny.get_config("runlocal")
  c.moby.update(queue_size=32, proj_hidden_dim=32, pred_hidden_dim=32, proj_dim=16)
  c.data.update(dataset="folder", path=str(folder), batch_size=8, num_workers=2)
  c.train.update(dict(dict(epochs=3, warmup_epochs=1, log_every_steps=1,
                           checkpoint_every_steps=100), **train))
  return c


def losses(workdir):
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def one_device():
  return parallel.make_mesh(jax.devices()[:1])


def assert_states_identical(a, b):
  leaves_a, tree_a = jax.tree.flatten(jax.device_get(a))
  leaves_b, tree_b = jax.tree.flatten(jax.device_get(b))
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference_run(folder, tmp_path_factory):
  """An uninterrupted 9-step run (3 epochs) on one device."""
  workdir = tmp_path_factory.mktemp("reference")
  summary = pretrain.pretrain(tiny_config(folder), workdir, mesh=one_device())
  return workdir, summary


def test_same_seed_same_losses_and_device_count_does_not_matter(folder, reference_run,
                                                                 tmp_path):
  workdir, summary = reference_run
  assert summary["step"] == 9 and not summary["preempted"]
  first = losses(workdir)
  assert sorted(first) == list(range(1, 10))
  # The same config and seed again: the losses repeat bit for bit.
  again = pretrain.pretrain(tiny_config(folder), tmp_path / "again", mesh=one_device())
  assert again["step"] == 9
  assert losses(tmp_path / "again") == first
  # Batches placed on the devices 1 or (the default) 2 steps ahead: the same losses.
  ahead = tiny_config(folder)
  ahead.data.device_prefetch = 1
  pretrain.pretrain(ahead, tmp_path / "ahead", mesh=one_device())
  assert losses(tmp_path / "ahead") == first
  # On 4 devices: the same losses within float32 reduction-order noise.
  pretrain.pretrain(tiny_config(folder), tmp_path / "four",
                   mesh=parallel.make_mesh(jax.devices()[:4]))
  on_four = losses(tmp_path / "four")
  np.testing.assert_allclose([on_four[s] for s in range(1, 6)],
                             [first[s] for s in range(1, 6)], rtol=1e-5)


def metric_lines(workdir) -> list[dict]:
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if "loss" in r]


def assert_goodput_adds_up(times: dict, wall: float) -> None:
  """The parts add up to the run's wall time, which is the `wall` measured outside
  within 5%."""
  parts = sum(times[p] for p in (*goodput.PARTS, "redone"))
  assert parts == pytest.approx(times["wall"], rel=1e-6)
  assert times["wall"] == pytest.approx(wall, rel=0.05), (times, wall)
  assert times["startup"] > 0 and times["steps"] > 0
  assert times["goodput"] == pytest.approx(times["steps"] / times["wall"])


def test_profiled_run_leaves_traces_and_logs_the_same_losses_with_mfu_and_goodput(
    folder, reference_run, tmp_path):
  """train.profile_steps, and a PROFILE file found in the workdir at a log step, each
  leave a trace of their steps under WORKDIR/profile; tracing changes no loss. With
  train.peak_tflops each log line has MFU: the step's FLOPs (the planner's count) at the
  measured rate over the peak. Host memory is in every line; results.json has where the
  time went."""
  reference_dir, _ = reference_run
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "PROFILE").touch()  # found at the first log step: traces steps 2 and 3
  config = tiny_config(folder, profile_steps=(6, 2), profile_on_demand_steps=2,
                       peak_tflops=2.0)
  started = time.time()
  summary = pretrain.pretrain(config, workdir, mesh=one_device())
  wall = time.time() - started
  assert losses(workdir) == losses(reference_dir)
  assert not (workdir / "PROFILE").exists()
  traces = sorted((workdir / "profile").glob("*/plugins/profile/*/*.trace.json.gz"))
  assert [t.parts[-5] for t in traces] == ["steps_2-3", "steps_6-7"]
  import gzip
  for trace in traces:
    events = json.load(gzip.open(trace))["traceEvents"]
    assert any(e.get("name") == "PjitFunction(train_step)" for e in events)
    assert sum(e.get("ph") == "X" for e in events) > 100  # the step's XLA operations

  flops = costs.step_flops(config) / 1  # per device of the one-device mesh
  lines = metric_lines(workdir)
  assert [r["step"] for r in lines] == list(range(1, 10))
  for r in lines:
    rate = r["pairs_per_s"] / config.data.batch_size  # steps per second
    assert r["tflops_per_device"] == pytest.approx(flops * rate / 1e12, rel=1e-6)
    assert r["mfu"] == pytest.approx(r["tflops_per_device"] / 2.0, rel=1e-6)
    assert 0 < r["mfu"] < 1
    assert r["host_rss_gib"] > 0.1
  # Untraced, on CPUs (no known peak): the rate in FLOPs, no MFU.
  reference = metric_lines(reference_dir)
  assert all("tflops_per_device" in r and "mfu" not in r for r in reference)

  results = json.loads((workdir / "results.json").read_text())
  assert results["goodput"] == summary["goodput"]
  assert_goodput_adds_up(results["goodput"], wall)
  assert results["goodput"]["profiling"] > 0 and results["goodput"]["sessions"] == 1
  final = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
  assert final["step"] == 9 and final["goodput"] == pytest.approx(results["goodput"]["goodput"])


def test_goodput_counts_the_steps_redone_after_a_crash(folder, tmp_path, monkeypatch):
  """A start that dies at step 5 (an error, after its checkpoint at step 3) is resumed
  at step 3: the time it spent on steps 4 and 5 is counted as redone, and the parts of
  both starts still add up to their wall time."""
  workdir = tmp_path / "run"
  log = logger.MetricLogger.log

  def crash_at_step_5(self, step, metrics):
    log(self, step, metrics)
    if step == 5:
      raise RuntimeError("simulated crash")

  monkeypatch.setattr(logger.MetricLogger, "log", crash_at_step_5)
  started = time.time()
  with pytest.raises(RuntimeError, match="simulated crash"):
    pretrain.pretrain(tiny_config(folder, checkpoint_every_steps=3), workdir,
                      mesh=one_device())
  monkeypatch.undo()
  first = json.loads((workdir / goodput.FOLDER / "session_000.json").read_text())
  assert (first["first_step"], first["last_step"], list(first["at_saves"])) == (0, 5, ["3"])
  summary = pretrain.pretrain(tiny_config(folder, checkpoint_every_steps=3), workdir,
                              mesh=one_device())
  wall = time.time() - started
  assert summary["step"] == 9
  times = summary["goodput"]
  assert times["sessions"] == 2
  redone = sum(first["at_last_step"]) - sum(first["at_saves"]["3"])
  assert redone > 0 and times["redone"] == pytest.approx(redone)
  assert_goodput_adds_up(times, wall)


def _sigterm_after(workdir: pathlib.Path, step: int) -> threading.Thread:
  """Sends this process a real SIGTERM once `step` appears in WORKDIR/metrics.jsonl."""
  def watch():
    deadline = time.time() + 600
    while time.time() < deadline:
      if step in losses(workdir) if (workdir / "metrics.jsonl").exists() else False:
        os.kill(os.getpid(), signal.SIGTERM)
        return
      time.sleep(0.01)
  thread = threading.Thread(target=watch, daemon=True)
  thread.start()
  return thread


def test_sigterm_then_resume_is_bit_identical(folder, reference_run, tmp_path):
  """A run stopped by SIGTERM inside epoch 1 and restarted crosses the epoch boundaries
  and ends bit-identical to the uninterrupted run (params, target, BN, queues, pointer,
  optimizer state, step, rng)."""
  reference_dir, _ = reference_run
  workdir = tmp_path / "run"
  watcher = _sigterm_after(workdir, 1)
  first = pretrain.pretrain(tiny_config(folder), workdir, mesh=one_device())
  watcher.join()
  assert first["preempted"] and 1 <= first["step"] < 3, first  # inside the first epoch
  assert checkpoint.Checkpointer(workdir, None, 0, None).latest_step() == first["step"]
  second = pretrain.pretrain(tiny_config(folder), workdir, mesh=one_device())
  assert second["step"] == 9 and not second["preempted"]
  state, _ = checkpoint.load_state(workdir, mesh=one_device())
  expected, _ = checkpoint.load_state(reference_dir, mesh=one_device())
  assert_states_identical(state, expected)
  assert losses(workdir) == losses(reference_dir)


def test_sigterm_during_start_up_and_compilation_exits_0_and_the_next_start_trains(
    folder, tmp_path):
  command = [sys.executable, "train.py", "--config", "configs/moby_swin_tiny.py:runlocal",
             "--workdir", str(tmp_path / "run"), "--config.data.dataset=folder",
             f"--config.data.path={folder}", "--config.data.batch_size=8",
             "--config.moby.queue_size=32", "--config.train.epochs=1"]
  proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  output = []
  for line in proc.stdout:
    output.append(line)
    if line.startswith("MoBY pre-training:"):  # next: build the state, compile
      proc.send_signal(signal.SIGTERM)
      break
  output.append(proc.communicate(timeout=600)[0])
  assert proc.returncode == 0, "".join(output)[-3000:]
  assert "stop requested (SIGTERM) before the first step" in "".join(output)
  assert not list((tmp_path / "run" / "checkpoints").glob("[0-9]*"))
  # (With train.deterministic, which sets XLA's deterministic-ops flag before JAX starts.)
  result = subprocess.run(command + ["--config.train.deterministic=true"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert checkpoint.Checkpointer(tmp_path / "run", None, 0, None).latest_step() == 3


def test_half_written_checkpoint_is_never_restored(folder, tmp_path):
  config = tiny_config(folder, epochs=2, checkpoint_every_steps=2, keep_checkpoints=2)
  workdir = tmp_path / "run"
  pretrain.pretrain(config, workdir, mesh=one_device())
  ckpt_dir = workdir / "checkpoints"
  assert sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) == [4, 6]
  complete_6, _ = checkpoint.load_state(workdir, mesh=one_device())

  # 1) A save killed mid-way leaves orbax's temporary directory: never listed as a step.
  partial = ckpt_dir / "8.orbax-checkpoint-tmp-1234567"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "half_written").write_bytes(b"\0" * 10)
  state, _ = checkpoint.load_state(workdir, mesh=one_device())
  assert int(state.step) == 6
  assert_states_identical(state, complete_6)

  # 2) A damaged latest checkpoint: the previous complete one is restored instead.
  for path in (ckpt_dir / "6" / "state").rglob("*"):
    if path.is_file():
      path.write_bytes(b"")
  state, _ = checkpoint.load_state(workdir, mesh=one_device())
  assert int(state.step) == 4


def test_corrupt_files_are_skipped_and_reported(folder, tmp_path):
  import shutil
  data = tmp_path / "images"
  shutil.copytree(folder, data)
  (data / "train" / "cat" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
  (data / "train" / "dog" / "readme.txt").write_text("not an image")
  config = tiny_config(data, epochs=2)
  config.data.batch_size = 25  # 25 images: every file is read in every epoch
  config.moby.queue_size = 50
  summary = pretrain.pretrain(config, tmp_path / "run", mesh=one_device())
  assert summary["step"] == 2 and summary["skipped_files"] == 2
  last = metric_lines(tmp_path / "run")[-1]
  assert last["skipped_files"] == 2 and np.isfinite(last["loss"])


def _no_compilation(monkeypatch):
  def forbidden(*args, **kwargs):
    raise AssertionError("compiled before checking the input")
  monkeypatch.setattr(run.Pretraining, "init_state", forbidden)


@pytest.mark.parametrize("case", ["missing_folder", "empty_class", "model_name", "queue",
                                  "probe_batch", "probe_epochs", "probe_smoothing",
                                  "worker_mode"])
def test_bad_input_fails_before_compiling(folder, tmp_path, monkeypatch, case):
  _no_compilation(monkeypatch)
  config = tiny_config(folder)
  if case == "missing_folder":
    config.data.path = str(tmp_path / "nowhere")
    error, match = FileNotFoundError, "data.path"
  elif case == "empty_class":
    (tmp_path / "d" / "train" / "empty").mkdir(parents=True)
    config.data.path = str(tmp_path / "d")
    error, match = ValueError, "no class folders|has no images"
  elif case == "model_name":
    config.model.name = "swin_gigantic"
    error, match = ValueError, "unknown model.name"
  elif case == "queue":
    config.moby.queue_size = 30
    error, match = ValueError, "moby.queue_size"
  elif case == "worker_mode":
    config.data.worker_mode = "fibers"
    error, match = ValueError, "data.worker_mode"
  else:  # the probe of eval.enabled runs after pre-training: checked before it
    config.eval.enabled = True
    config.eval.linear.batch_size = 8
    field, value = {"probe_batch": ("batch_size", 100), "probe_epochs": ("epochs", 0),
                    "probe_smoothing": ("label_smoothing", 1.0)}[case]
    config.eval.linear[field] = value
    error, match = ValueError, f"eval.linear.{field}"
  with pytest.raises(error, match=match):
    pretrain.pretrain(config, tmp_path / "run", mesh=one_device())
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_config_field_is_an_error(tmp_path):
  result = subprocess.run(
      [sys.executable, "train.py", "--config", "configs/quickstart.py", "--workdir",
       str(tmp_path), "--config.train.epoch=3"], cwd=ROOT, capture_output=True, text=True,
      timeout=120)
  assert result.returncode != 0
  assert "epoch" in result.stderr and not (tmp_path / "checkpoints").exists()


def test_linear_eval_from_workdir_and_from_pth_files_agree(folder, reference_run, tmp_path):
  """linear.source: the workdir, its official export and its mmseg export (a backbone
  format, auto-detected) give the same encoder, hence the same probe and accuracy."""
  import convert
  reference_dir, _ = reference_run
  state, pretrain_config = checkpoint.load_state(reference_dir, mesh=one_device())
  sources = [reference_dir]
  for fmt in ("official", "mmseg"):
    sources.append(convert.save(state, pretrain_config, tmp_path / f"{fmt}.pth", fmt).path)
  results = []
  for source in sources:
    config = linear_swin_tiny.get_config("runlocal")
    config.model = tiny_config(folder).model
    config.data.update(dataset="folder", path=str(folder), batch_size=8)
    config.train.update(epochs=2, log_every_steps=3)
    config.linear.source = str(source)
    results.append(linear.linear_eval(config, tmp_path / f"linear_{source.name}",
                                       mesh=one_device()))
  assert results[0]["step"] == 6
  for other in results[1:]:
    assert (other["top1"], other["top5"]) == (results[0]["top1"], results[0]["top5"])
  assert 0 <= results[0]["top1"] <= 100
  saved = json.loads((tmp_path / "linear_mmseg.pth" / "results.json").read_text())
  assert saved["top1"] == results[2]["top1"]
  # Validated after every epoch (eval.every_epochs=1), as the released code: the last and
  # the best accuracy are reported, and the history survives a restart.
  lines = (tmp_path / "linear_mmseg.pth" / "metrics.jsonl").read_text().splitlines()
  validated = [r for r in map(json.loads, lines) if "val/top1" in r]
  assert [r["step"] for r in validated] == [3, 6]
  assert saved["best_top1"] == max(r["val/top1"] for r in validated)
  assert saved["best_epoch"] in (1, 2) and saved["top1"] == validated[-1]["val/top1"]
  config.linear.source = str(sources[2])
  again = linear.linear_eval(config, tmp_path / "linear_mmseg.pth", mesh=one_device())
  assert {k: again[k] for k in ("top1", "best_top1", "best_epoch")} == {
      k: saved[k] for k in ("top1", "best_top1", "best_epoch")}


def test_pretraining_starts_from_a_backbone_file(folder, reference_run, tmp_path):
  """moby.init_from: a timm-format backbone becomes the online and the target encoder of
  step 0 (heads and queues fresh from the seed), and the program trains from there."""
  import convert
  reference_dir, _ = reference_run
  trained, pretrain_config = checkpoint.load_state(reference_dir, mesh=one_device())
  path = convert.save(trained, pretrain_config, tmp_path / "swin_timm.pth", "timm").path
  config = tiny_config(folder, epochs=1)
  config.moby.init_from = str(path)
  start = pretrain.initial_state(run.Pretraining(config, one_device()))
  fresh = run.create_train_state(config, jax.random.key(config.train.seed), one_device())
  assert int(start.step) == 0
  assert_states_identical(start.encoder("online"), trained.encoder("online"))
  assert_states_identical(start.encoder("target"), trained.encoder("online"))
  assert_states_identical(start.params["projector"], fresh.params["projector"])
  summary = pretrain.pretrain(config, tmp_path / "run", mesh=one_device())
  assert summary["step"] == 3 and not summary["preempted"]


def test_evaluation_leaves_an_unreadable_val_file_out_and_names_it(folder, reference_run,
                                                                  tmp_path):
  """A corrupt val file is excluded from kNN and linear accuracy (never replaced by
  another example with its label): the metrics equal those of the same set without
  it, and the file is named and counted."""
  import shutil
  from moby_jax import evaluate
  from moby_jax.data.sources import build_source
  reference_dir, _ = reference_run
  data = tmp_path / "images"
  shutil.copytree(folder, data)
  broken = data / "val" / "cat" / "0_broken.jpg"  # sorts first: row 0 of the val split
  broken.write_bytes(b"\xff\xd8\xff garbage")
  config = linear_swin_tiny.get_config("runlocal")
  config.model = tiny_config(folder).model
  config.data.update(dataset="folder", path=str(data), batch_size=8)
  config.train.update(epochs=1, log_every_steps=3)
  config.linear.source = str(reference_dir)
  result = linear.linear_eval(config, tmp_path / "linear", mesh=one_device())
  clean_val = build_source(tiny_config(folder).data, "val")
  assert result["val_examples"] == len(clean_val) == 24
  assert result["unreadable_val"] == [str(broken)]
  saved = json.loads((tmp_path / "linear" / "results.json").read_text())
  assert saved["unreadable_val"] == [str(broken)] and saved["val_examples"] == 24

  # The same probe on the val split without the broken file: the same accuracy.
  mesh = one_device()
  probe, _ = checkpoint.load_state(tmp_path / "linear", mesh=mesh)
  eval_fn = evaluate.make_linear_eval(config, mesh)
  clean = linear._linear_accuracy(config, mesh, probe, eval_fn, clean_val)
  assert (clean["top1"], clean["top5"]) == (result["top1"], result["top5"])

  # kNN: with and without the broken file, the same accuracy over the same 24 images.
  pretrain_config = tiny_config(data)
  state, _ = checkpoint.load_state(reference_dir, mesh=mesh)
  encoder = state.encoder()
  train = build_source(pretrain_config.data, "train")
  with_broken = pretrain.KnnMonitor(pretrain_config, mesh, train,
                                   build_source(pretrain_config.data, "val"))(encoder)
  without = pretrain.KnnMonitor(pretrain_config, mesh, train, clean_val)(encoder)
  assert (with_broken["top1"], with_broken["top5"]) == (without["top1"], without["top5"])
  assert with_broken["val_examples"] == 24 and with_broken["unreadable"] == [str(broken)]


def test_a_run_that_only_skips_steps_saves_and_stops_with_an_error(folder, tmp_path):
  # An absurd learning rate: step 1 is finite and blows the weights up, every later step
  # has a non-finite loss and is skipped.
  config = tiny_config(folder, warmup_epochs=0, max_consecutive_skipped_steps=3)
  config.optim.update(base_lr=1e30, min_lr=1e30)
  with pytest.raises(loop.TrainingDiverged, match=r"up to step 4\b.*step 4 is saved"):
    pretrain.pretrain(config, tmp_path / "run", mesh=one_device())
  assert checkpoint.Checkpointer(tmp_path / "run", None, 0, None).latest_step() == 4
  skipped = [r["skipped"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl")
                                       .read_text().splitlines())]
  assert skipped == [0, 1, 1, 1]
