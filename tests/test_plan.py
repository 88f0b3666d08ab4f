"""The pod planner: the real step compiled for a TPU slice that is only described.

The compiling tests need libtpu (requirements-plan.txt, installed by .ci/run) and skip,
saying so, where it is not installed. The rest (topology names, the HLO collective
count, the bisection, the errors) runs everywhere.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from configs import quickstart
from moby_jax import costs, plan

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason="libtpu is not installed (python3 -m pip install -r "
                           "requirements-plan.txt): no TPU topology to compile for")
QUICKSTART = "configs/quickstart.py"


@pytest.mark.parametrize("name, generation, dims", [
    ("v5e:2x2", "v5e", (2, 2)), ("v5p:4x4x4", "v5p", (4, 4, 4)), ("v4:2x2x1", "v4", (2, 2, 1)),
    ("v5p-128", "v5p", (4, 4, 4)),       # v5p counts TensorCores: 64 chips
    ("v4-32", "v4", (2, 2, 4)),          # 16 chips
    ("v5litepod-16", "v5e", (4, 4)), ("v5litepod-64", "v5e", (8, 8)),
    ("v5e-256", "v5e", (16, 16)), ("v6e-256", "v6e", (16, 16)), ("v5p-8", "v5p", (2, 2, 1)),
    ("v5litepod-1", "v5e", (1, 1)), ("V5E:8x8", "v5e", (8, 8))])
def test_topology_names(name, generation, dims):
  topology = plan.parse_topology(name)
  assert (topology.generation, topology.dims) == (generation, dims)


@pytest.mark.parametrize("name, match", [
    ("v5p-127", "2 per chip"), ("v5p-12", "not a slice size"), ("v7x-8", "unknown topology"),
    ("v5e:2x2x2", "unknown topology"), ("tpu", "accepted: v5e:2x2")])
def test_unknown_topologies_say_what_is_accepted(name, match):
  with pytest.raises(ValueError, match=match):
    plan.parse_topology(name)


HLO = """\
HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]) parameter(0)
  %limit = s32[]{:T(128)} constant(2)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %limit), direction=LT
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %x = f32[8] get-tuple-element(%p), index=1
  %r = f32[8]{0} all-reduce(%x), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %t = (s32[], f32[8]) tuple(%i, %r)
}

ENTRY %main (x: f32[8], y: bf16[4,2]) -> f32[8] {
  %x = f32[8] parameter(0)
  %y = bf16[4,2] parameter(1)
  %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body
  %g = bf16[16,2]{1,0} all-gather(%y), channel_id=2, replica_groups=[1,4]<=[4], dimensions={0}
  %s = ((bf16[4,2]), bf16[16,2]) all-gather-start(%y), replica_groups=mesh['data'=4] {'data'}
  %d = bf16[16,2] all-gather-done(%s)
  ROOT %o = f32[8] get-tuple-element(%w), index=1
}
"""


def test_collectives_count_loop_trips_and_bytes():
  found, notes = costs.collectives(HLO, num_devices=4)
  assert notes == []
  reduce, gather = found["all-reduce"], found["all-gather"]
  assert (reduce.count, reduce.bytes) == (2, 2 * 32)          # in a 2-trip loop
  assert reduce.wire_bytes == pytest.approx(2 * 2 * 0.75 * 32)  # ring: 2 (n-1)/n
  assert (gather.count, gather.bytes) == (2, 2 * 64)          # sync + async start
  assert gather.wire_bytes == pytest.approx(2 * 0.75 * 64)


def test_collectives_name_loops_of_unknown_trip_count():
  found, notes = costs.collectives(HLO.replace("direction=LT", "direction=NE"), 4)
  assert found["all-reduce"].count == 1 and "unknown trip count" in notes[0]


def test_largest_fitting_bisects():
  tried = []

  def fits(batch):
    tried.append(batch)
    return batch <= 96

  candidates = [8, 16, 32, 64, 128, 256, 512]
  assert plan.largest_fitting(candidates, fits) == 64
  assert len(tried) <= 3
  assert plan.largest_fitting(candidates, lambda b: False) is None
  assert plan.largest_fitting(candidates, lambda b: True) == 512


def test_compiler_memory_refusal_is_read():
  err = plan.DoesNotFit("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. the total "
                        "memory required for HLO temporaries (35.09G) exceeds available HBM "
                        "(15.75G)")
  assert err.required == pytest.approx(35.09 * 2 ** 30)
  assert err.available == pytest.approx(15.75 * 2 ** 30)


def test_missing_libtpu_gives_the_install_command(monkeypatch, capsys):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "libtpu" else real(name, *a))
  assert plan.main(["--config", QUICKSTART, "--topology", "v5e:2x2"]) == 1
  assert "python3 -m pip install -r requirements-plan.txt" in capsys.readouterr().err


def test_bad_topology_and_config_fail_clearly(capsys):
  assert plan.main(["--config", QUICKSTART, "--topology", "v5e-3"]) == 1
  assert "not a slice size" in capsys.readouterr().err
  assert plan.main(["--config", QUICKSTART, "--topology", "v5e:2x2",
                    "--config.model.nmae=x"]) == 1
  assert "nmae" in capsys.readouterr().err


@needs_libtpu
def test_batch_the_slice_does_not_divide_gets_trains_message(capsys):
  assert plan.main(["--config", QUICKSTART, "--topology", "v5e:2x4",
                    "--config.data.batch_size=12", "--config.moby.queue_size=1200"]) == 1
  assert ("data.batch_size (12, the global batch) must be divisible by the number of "
          "devices (8)") in capsys.readouterr().err


def _quickstart(**overrides):
  config = quickstart.get_config()
  for field, value in overrides.items():
    section, name = field.split("__")
    setattr(config[section], name, value)
  return config


@needs_libtpu
def test_quickstart_on_a_v5e_slice(tmp_path, capsys):
  """Data parallel on 4 chips: fits, FLOPs within 25% of MoBY's 8 passes per pair, the
  gradients all-reduced, the queue keys all-gathered, and the linear probe compiled."""
  out = tmp_path / "plan.json"
  assert plan.main(["--config", QUICKSTART, "--topology", "v5litepod-4",
                    "--json", str(out)]) == 0
  text = capsys.readouterr().out
  report = json.loads(out.read_text())
  assert "FITS" in text and "DOES NOT FIT" not in text
  assert (report["chips"], report["devices"], report["per_device_batch"]) == (4, 4, 32)
  assert report["mesh"] == {"data": 4} and "mesh data 4," in text
  step = report["programs"]["train_step"]
  memory = step["memory"]
  assert memory["fits"] and 0 < memory["total_bytes"] < memory["hbm_bytes"] == 16 * 2 ** 30
  assert memory["arguments"]["params"] > 0 and memory["arguments"]["queues"] == 2 * 1024 * 64 * 4
  flops = report["flops"]
  assert 0.75 < flops["per_step"] / flops["analytic_per_step"] < 1.25, flops
  # XLA's own count of the scanned step sees one of the two online views.
  assert 0.55 < step["xla_flops_vs_true"] < 0.75
  # The online gradients once (plus BatchNorm statistics per view), the two key sets.
  reduce, gather = step["collectives"]["all-reduce"], step["collectives"]["all-gather"]
  assert gather["count"] == 2 and gather["bytes"] == 2 * 128 * 64 * 4
  assert reduce["bytes"] >= costs.per_device_bytes(_params_shapes())
  assert "linear_probe_step" in report["programs"] and report["probe_classes"] == 10


def _params_shapes(config=None):
  from moby_jax.train_step import abstract_state
  return abstract_state(config or quickstart.get_config()).params


@needs_libtpu
def test_fsdp_gathers_once_per_use_and_reduce_scatters():
  """FSDP on 4 chips (a 256-wide swin_mu, so that the compiler reduce-scatters rather
  than all-reducing tiny leaves): each view's gradient is reduce-scattered into the
  shards (twice the shard bytes), nothing of gradient size is all-reduced, and the
  networks are gathered once per use: 4x the params' bytes (target, online forward and
  backward), where sharding propagation alone gathered 8.7x."""
  config = _quickstart(parallel__fsdp=True, eval__enabled=False, model__embed_dim=256)
  report = plan.plan(config, "v5e:2x2")
  step = report["programs"]["train_step"]
  shard = step["memory"]["arguments"]["params"]
  whole = costs.per_device_bytes(_params_shapes(config))
  assert report["fsdp"] and step["memory"]["fits"] and shard < whole / 3
  found = step["collectives"]
  assert found["reduce-scatter"]["bytes"] >= 1.9 * shard
  assert found["all-reduce"]["bytes"] < 0.05 * whole
  assert found["all-gather"]["bytes"] < 4.5 * whole


@needs_libtpu
def test_reduce_scatter_probe():
  """bench/reduce_scatter.py: on 4 chips the step's gradient constraint, an explicit
  psum_scatter and one psum_scatter per torus axis all compile to reduce-scatters
  sending (n-1)/n of the leaf; on 16 chips (where the compiler all-reduces the first
  two, README) one psum_scatter per torus axis still sends only that."""
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
  import reduce_scatter
  rows = reduce_scatter.probe("v5e:2x2", 8 * 2 ** 20)
  assert [way for way, *_ in rows] == ["constraint", "psum_scatter",
                                       "one psum_scatter per torus axis (2 x 2)"]
  for _, emitted, sent, ideal in rows:
    assert "reduce-scatter" in emitted and "all-reduce" not in emitted
    assert ideal == pytest.approx(6.0) and sent / 2 ** 20 == pytest.approx(ideal, rel=0.05)
  *_, (way, emitted, sent, ideal) = reduce_scatter.probe("v5e:4x4", 8 * 2 ** 20)
  assert way == "one psum_scatter per torus axis (4 x 4)"
  assert "reduce-scatter x2" in emitted and "all-reduce" not in emitted
  assert ideal == pytest.approx(7.5) and sent / 2 ** 20 == pytest.approx(ideal, rel=0.05)


@needs_libtpu
def test_a_single_chip_has_no_collectives():
  single = plan.plan(_quickstart(eval__enabled=False), "v5e-1")
  assert single["devices"] == 1 and single["programs"]["train_step"]["collectives"] == {}


@needs_libtpu
def test_a_run_that_does_not_fit_exits_non_zero(capsys):
  assert plan.main(["--config", QUICKSTART, "--topology", "v5e:2x2",
                    "--config.data.batch_size=131072", "--config.moby.queue_size=131072",
                    "--config.data.num_train_examples=1281167",
                    "--config.eval.enabled=False"]) == 1
  text = capsys.readouterr().out
  assert "train_step: DOES NOT FIT" in text and "exceeds available HBM" in text


def _fake_gcloud(folder: pathlib.Path) -> dict:
  """A `gcloud` on PATH that describes the slice as $FAKE_TPU_TYPE and records every other
  call (the ssh commands that would start work on the TPU VMs) in $FAKE_GCLOUD_CALLS."""
  gcloud = folder / "gcloud"
  gcloud.write_text('#!/bin/bash\nif [ "$4" = describe ]; then echo "$FAKE_TPU_TYPE"; '
                    'else printf "%s\\n----\\n" "$*" >> "$FAKE_GCLOUD_CALLS"; fi\n')
  gcloud.chmod(0o755)
  return dict(os.environ, PATH=f"{folder}{os.pathsep}{pathlib.Path(sys.executable).parent}"
              f"{os.pathsep}{os.environ['PATH']}", TPU_NAME="my-slice", ZONE="us-east5-a",
              BUCKET="gs://my-bucket", CONFIG=QUICKSTART,
              FAKE_GCLOUD_CALLS=str(folder / "calls"))


@needs_libtpu
def test_tpu_pod_launch_plans_the_slice_before_it_starts_anything(tmp_path):
  """launch/tpu_pod.sh with a fake gcloud: a batch the slice's 8 chips do not divide stops
  the launch with train.py's message before any TPU VM is touched; a config that fits
  goes on to install and start the run on every host with the same overrides."""
  root = pathlib.Path(__file__).resolve().parents[1]
  env = _fake_gcloud(tmp_path)
  calls = tmp_path / "calls"
  refused = subprocess.run(
      ["bash", "launch/tpu_pod.sh", "--config.data.batch_size=12",
       "--config.moby.queue_size=1200"], cwd=root, capture_output=True, text=True,
      env=dict(env, FAKE_TPU_TYPE="v5litepod-8"), timeout=600)
  assert refused.returncode == 1, refused.stdout + refused.stderr
  assert "pre-flight: planning configs/quickstart.py for v5litepod-8" in refused.stdout
  assert "must be divisible by the number of devices (8)" in refused.stderr
  assert "pre-flight failed: not launching" in refused.stdout and not calls.exists()

  launched = subprocess.run(
      ["bash", "launch/tpu_pod.sh", "--config.eval.enabled=False"], cwd=root,
      capture_output=True, text=True, env=dict(env, FAKE_TPU_TYPE="v5litepod-4"),
      timeout=900)
  assert launched.returncode == 0, launched.stdout + launched.stderr
  assert "FITS" in launched.stdout
  install, run = (" ".join(call.split()) for call in calls.read_text().split("\n----\n")[:2])
  assert install.startswith("compute tpus tpu-vm ssh my-slice --zone=us-east5-a --worker=all")
  assert "requirements-tpu.txt" in install
  assert "--worker=all" in run and "MOBY_DISTRIBUTED=1" in run
  assert ("train.py --config configs/quickstart.py --workdir gs://my-bucket/runs/moby_swin_t "
          "--config.data.data_dir=gs://my-bucket/tfds --config.eval.enabled=False") in run


@needs_libtpu
def test_fsdp_says_which_leaves_a_slice_leaves_whole():
  """Swin's widths are 96 * 2^k (x3 for qkv, x4 for the MLP): 64 chips divide nearly all
  of them, 256 chips few. The run's construction lists what FSDP had to leave whole and
  the trainer and the planner say it (built for described devices: nothing compiles)."""
  from configs import moby_swin_tiny
  from moby_jax import parallel
  from moby_jax.run import Pretraining

  config = moby_swin_tiny.get_config()
  config.data.batch_size, config.parallel.fsdp, config.eval.enabled = 2048, True, False
  left = {}
  for topology in ("v5e:8x8", "v5e:16x16"):
    mesh = parallel.mesh_for(config, plan.topology_devices(plan.parse_topology(topology)))
    left[topology] = Pretraining(config, mesh).fsdp_left_whole
  small, large = (sum(b for _, b in left[t]) for t in ("v5e:8x8", "v5e:16x16"))
  assert small < 2 * 2 ** 20 < 50 * 2 ** 20 < large
  path, size = left["v5e:16x16"][0]
  assert path == "params/encoder/layers_2/blocks_0/attn/qkv/kernel" and size == 384 * 1152 * 4
  text = parallel.describe_left_whole(left["v5e:16x16"], mesh)
  assert text.startswith(f"FSDP leaves {len(left['v5e:16x16'])} leaves") and "256 divides" in text
  config.parallel.fsdp = False
  assert Pretraining(config, mesh).fsdp_left_whole == []
