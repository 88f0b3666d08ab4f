"""What a run reports about itself, in parts: the peak table MFU divides by, the goodput
arithmetic over starts, memory metrics and the profiler's settings. The same features
in real runs are tested in test_program.py (in-process runs, a crash and a restart) and
test_quickstart.py (train.py stopped by SIGTERM and resumed)."""

import json

import jax
import pytest

from configs import moby_swin_tiny
from moby_jax import costs, goodput, monitor


@pytest.mark.parametrize("kind, dtype, tflops", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4),
    ("NVIDIA H100 80GB HBM3", "float32", 494.7),
    ("NVIDIA H100 PCIe", "bfloat16", 756.0),
    ("NVIDIA H200", "bfloat16", 989.4),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312.0),
    ("NVIDIA A100-SXM4-40GB", "float32", 156.0),
    ("TPU v4", "bfloat16", 275.0),
    ("TPU v5 lite", "bfloat16", 197.0),
    ("TPU v5", "bfloat16", 459.0),       # v5p devices call themselves "TPU v5"
    ("TPU v6 lite", "float32", 918.0),
    ("cpu", "bfloat16", None),
    ("NVIDIA GeForce RTX 4090", "bfloat16", None),
])
def test_peak_table_by_device_kind(kind, dtype, tflops):
  assert costs.peak_tflops(kind, dtype) == tflops


def test_planner_chips_take_their_peak_from_the_same_table():
  plan = pytest.importorskip("moby_jax.plan")
  assert plan.CHIPS["v5e"].peak_bf16_tflops == costs.peak_tflops("TPU v5 lite")
  assert plan.CHIPS["v5p"].peak_bf16_tflops == costs.peak_tflops("TPU v5")


def _session(started, first, last, saves, at_last, parts):
  return dict(started=started, wall=sum(parts.values()), parts=parts, first_step=first,
              last_step=last, at_saves={str(k): v for k, v in saves.items()},
              at_last_step=at_last, finished=False)


def _parts(**seconds):
  return {part: float(seconds.get(part, 0.0)) for part in goodput.PARTS}


def test_redone_steps_are_those_after_the_checkpoint_the_next_start_resumed_from():
  # Saved at steps 100 and 200 (step/data seconds so far), last counted step 250.
  session = _session(0.0, 0, 250, {100: [10.0, 1.0], 200: [20.0, 2.0]}, [25.0, 2.5],
                     _parts(startup=5, steps=25, data=2.5))
  assert goodput.redone_seconds(session, 250) == (0.0, 0.0)      # resumed where it ended
  assert goodput.redone_seconds(session, 200) == (5.0, 0.5)      # steps 201-250 again
  assert goodput.redone_seconds(session, 100) == (15.0, 1.5)     # an older checkpoint
  assert goodput.redone_seconds(session, 0) == (25.0, 2.5)       # from scratch


def test_summary_adds_the_starts_and_moves_redone_time(tmp_path):
  folder = tmp_path / goodput.FOLDER
  folder.mkdir()
  first = _session(1000.0, 0, 250, {200: [20.0, 2.0]}, [25.0, 2.5],
                   _parts(startup=5, steps=25, data=2.5, checkpoint=1))
  second = _session(2000.0, 200, 400, {400: [30.0, 1.0]}, [30.0, 1.0],
                    _parts(startup=4, steps=30, data=1, checkpoint=1, evaluation=3))
  # Written in the wrong order on purpose: starts are ordered by their start time.
  (folder / "session_000.json").write_text(json.dumps(second))
  (folder / "session_001.json").write_text(json.dumps(first))
  result = goodput.summary(tmp_path)
  assert result["sessions"] == 2
  assert result["wall"] == pytest.approx(33.5 + 39.0)
  assert result["redone"] == pytest.approx(5.5)
  assert result["steps"] == pytest.approx(25 - 5 + 30)
  assert result["data"] == pytest.approx(2.5 - 0.5 + 1)
  parts = sum(result[p] for p in (*goodput.PARTS, "redone"))
  assert parts == pytest.approx(result["wall"])
  assert result["goodput"] == pytest.approx(50 / 72.5)
  line = goodput.format_summary(result)
  assert "over 2 start(s)" in line and "redone 6 s" in line and "goodput 69.0%" in line
  assert goodput.scalars(result)["time/redone_s"] == pytest.approx(5.5)


def test_clock_charges_every_second_to_one_part():
  clock = goodput.Clock()
  with clock.part("checkpoint"):
    with clock.part("evaluation"):  # the innermost part is charged
      pass
  clock.set_base("steps")
  seconds = clock.snapshot()
  assert set(seconds) == set(goodput.PARTS)
  assert all(v >= 0 for v in seconds.values()) and seconds["startup"] > 0


def test_memory_metrics_report_the_host_and_devices_that_have_statistics():
  metrics = monitor.memory_metrics()
  assert 0 < metrics["host_rss_gib"] <= metrics["host_peak_rss_gib"] + 1e-3
  has_stats = bool(jax.local_devices()[0].memory_stats())
  assert ("device_peak_memory_gib" in metrics) == has_stats  # CPUs report none


@pytest.mark.parametrize("steps", [(0, 2), (3, -1)])
def test_bad_profile_steps_are_refused(tmp_path, steps):
  config = moby_swin_tiny.get_config("runlocal")
  config.train.profile_steps = steps
  with pytest.raises(ValueError, match="train.profile_steps"):
    monitor.Profiler(config, tmp_path)
