"""The Python conversion API: backbone files of every format into a state's encoders
(bit-exact, with format detection), and `convert.save` (atomic, no overwrite without
force, no file after a failed self-check).

The Swin state is the golden fixture's state after 3 steps (target != online); the DeiT
state is a fresh one whose target is shifted away from the online encoder.
"""

import jax
import numpy as np
import pytest

import convert
from configs import moby_deit_small
from conftest import assert_trees_equal, fixture_config
from convert import consumers, inspection, pth
from moby_jax import create_train_state, parallel

ONE_DEVICE = parallel.make_mesh(jax.devices()[:1])
BACKBONE_FORMATS = {"swin": ("backbone", "mmdet", "mmseg", "timm"), "deit": ("backbone", "timm")}
BRANCH_FIELDS = {"online": ("params", "batch_stats"),
                 "target": ("target_params", "target_batch_stats")}


def shifted(tree, by):
  return jax.tree.map(lambda x: np.asarray(x) + np.asarray(by, np.asarray(x).dtype), tree)


@pytest.fixture(scope="module")
def swin(moby_fixture):
  config = fixture_config()
  skip = ("_nhwc", "/loss", "/momentum", "/k", "/grad_norm_before_clip")
  step3 = {k[len("step3/"):]: moby_fixture[k] for k in moby_fixture.files
           if k.startswith("step3/") and not k.endswith(skip)}
  return config, convert.from_pytorch(step3, config, mesh=ONE_DEVICE)


@pytest.fixture(scope="module")
def deit():
  config = moby_deit_small.get_config("runlocal")
  state = create_train_state(config, jax.random.key(1), ONE_DEVICE)
  target = {**state.target_params, "encoder": shifted(state.target_params["encoder"], 0.01)}
  return config, state.replace(target_params=target)


def encoder(state, branch):
  params, stats = BRANCH_FIELDS[branch]
  out = {"params": getattr(state, params)["encoder"]}
  if "encoder" in getattr(state, stats):
    out["batch_stats"] = getattr(state, stats)["encoder"]
  return out


# ---------------------------------------------------------------- backbone files -> encoders


@pytest.mark.parametrize("family", ["swin", "deit"])
def test_every_backbone_format_round_trips_into_an_encoder(family, request):
  config, state = request.getfixturevalue(family)
  for fmt in BACKBONE_FORMATS[family]:
    for branch in ("online", "target"):
      content = convert.to_pytorch(state, config, fmt, branch=branch)
      detected = inspection.detect(content["model" if fmt == "backbone" else "state_dict"])
      # timm's DeiT names are the original ViT names, so such a file reads as "backbone".
      assert detected == ("backbone" if family == "deit" else fmt)
      for given in ("auto", fmt):
        assert_trees_equal(convert.encoder_from_pytorch(content, config.model, fmt=given),
                           encoder(state, branch))
  official = convert.to_pytorch(state, config)
  for branch in ("online", "target"):
    assert_trees_equal(convert.encoder_from_pytorch(official, config.model, branch),
                       encoder(state, branch))


@pytest.mark.parametrize("family,fmt", [("swin", "mmdet"), ("deit", "timm")])
def test_a_backbone_file_starts_both_encoders_of_a_fresh_state(family, fmt, request, tmp_path):
  config, state = request.getfixturevalue(family)
  path = tmp_path / f"{fmt}.pth"
  convert.save(state, config, path, fmt, branch="target")
  started = convert.from_pytorch(str(path), config, step=7, mesh=ONE_DEVICE)
  want = encoder(state, "target")
  assert_trees_equal(encoder(started, "online"), want)
  assert_trees_equal(encoder(started, "target"), want)
  fresh = create_train_state(config, jax.random.key(config.train.seed), ONE_DEVICE)
  for field in ("queue1", "queue2", "queue_ptr"):
    assert_trees_equal(getattr(started, field), getattr(fresh, field))
  assert_trees_equal(started.params["projector"], fresh.params["projector"])
  assert_trees_equal(started.target_params["projector"], fresh.target_params["projector"])
  assert int(started.step) == 7
  for leaf in jax.tree.leaves(started):
    assert leaf.sharding.device_set == set(ONE_DEVICE.devices.flat)


def test_bn_variant_backbone_file_carries_the_running_statistics(tmp_path):
  config = fixture_config()
  config.model.norm_before_mlp = "bn"
  state = create_train_state(config, jax.random.key(2), ONE_DEVICE)
  state = state.replace(params={**state.params, "encoder": shifted(state.params["encoder"], 0.5)},
                        batch_stats={**state.batch_stats,
                                     "encoder": shifted(state.batch_stats["encoder"], 3)})
  path = tmp_path / "bn.pth"
  convert.save(state, config, path, "backbone")
  variables = convert.encoder_from_pytorch(path, config.model)
  assert set(variables) == {"params", "batch_stats"}
  assert_trees_equal(variables, encoder(state, "online"))
  started = convert.from_pytorch(path, config, mesh=ONE_DEVICE)
  assert_trees_equal(encoder(started, "target"), encoder(state, "online"))


def test_a_supervised_head_is_ignored_by_a_headless_encoder(swin):
  config, state = swin
  for fmt in ("backbone", "timm"):
    content = convert.to_pytorch(state, config, fmt, num_classes=10)
    head = "head.fc.weight" if fmt == "timm" else "head.weight"
    assert content["model" if fmt == "backbone" else "state_dict"][head].shape == (10, 32)
    assert_trees_equal(convert.encoder_from_pytorch(content, config.model),
                       encoder(state, "online"))
  with_head = {**config.model, "num_classes": 10}
  variables = convert.encoder_from_pytorch(content, with_head)
  assert variables["params"]["head"]["kernel"].shape == (32, 10)
  with pytest.raises(convert.FormatError, match="holds no classification head"):
    convert.encoder_from_pytorch(convert.to_pytorch(state, config, "mmseg"), with_head)


def test_buffers_a_format_drops_are_checked_when_a_file_holds_them(swin):
  """Older timm files keep relative_position_index/attn_mask; OpenMMLab's swin2mmseg keeps
  attn_mask. They load when they match the model geometry and are refused otherwise."""
  config, state = swin
  original = convert.to_pytorch(state, config, "backbone")["model"]
  for fmt, renamed in (("timm", "layers.0.blocks.1.attn_mask"),
                       ("mmseg", "stages.0.blocks.1.attn_mask")):
    sd = dict(convert.to_pytorch(state, config, fmt)["state_dict"])
    sd[renamed] = original["layers.0.blocks.1.attn_mask"]
    if fmt == "timm":
      sd["layers.1.blocks.0.attn.relative_position_index"] = \
          original["layers.1.blocks.0.attn.relative_position_index"]
    assert_trees_equal(convert.encoder_from_pytorch(sd, config.model, fmt=fmt),
                       encoder(state, "online"))
    sd[renamed] = np.zeros_like(sd[renamed])
    with pytest.raises(convert.StateDictMismatch,
                       match="wrong buffer: layers.0.blocks.1.attn_mask"):
      convert.encoder_from_pytorch(sd, config.model, fmt=fmt)
    sd[renamed] = sd[renamed][:2]
    with pytest.raises(convert.StateDictMismatch, match=f"shape mismatch: {renamed}"):
      convert.encoder_from_pytorch(sd, config.model, fmt=fmt)


def test_a_file_that_does_not_fit_lists_every_key_in_the_files_names(swin):
  config, state = swin
  sd = dict(convert.to_pytorch(state, config, "mmdet")["state_dict"])
  del sd["backbone.norm.weight"]
  sd["backbone.norm3.weight"] = np.zeros(32, np.float32)  # mmdet's per-output norm
  sd["neck.lateral_convs.0.conv.weight"] = np.zeros((8, 16, 1, 1), np.float32)
  sd["backbone.stages.1.blocks.0.ffn.layers.1.weight"] = np.zeros((32, 64), np.float32)
  with pytest.raises(convert.StateDictMismatch) as err:
    convert.encoder_from_pytorch({"state_dict": sd}, config.model)
  msg = str(err.value)
  assert "(mmdet format) does not fit SwinTransformer (4 problems)" in msg
  assert "missing key: backbone.norm.weight (32,)" in msg
  assert "unexpected key: backbone.norm3.weight (32,)" in msg
  assert "unexpected key: neck.lateral_convs.0.conv.weight (8, 16, 1, 1)" in msg
  assert ("shape mismatch: backbone.stages.1.blocks.0.ffn.layers.1.weight is (32, 64), "
          "expected (32, 128)") in msg
  # The architecture is part of the check: window 2 needs other tables and buffers.
  with pytest.raises(convert.StateDictMismatch, match="relative_position_bias_table"):
    convert.encoder_from_pytorch(convert.to_pytorch(state, config, "timm"),
                                 {**config.model, "window_size": 2})
  with pytest.raises(convert.StateDictMismatch, match="4 problems"):
    convert.from_pytorch({"state_dict": sd}, config, mesh=ONE_DEVICE)


def test_refusals_name_the_reason(swin, deit):
  config, state = swin
  timm = convert.to_pytorch(state, config, "timm")
  with pytest.raises(convert.FormatError, match="holds one encoder; branch='target'"):
    convert.encoder_from_pytorch(timm, config.model, branch="target")
  deit_config, deit_state = deit
  backbone = convert.to_pytorch(deit_state, deit_config, "backbone")
  with pytest.raises(convert.FormatError, match="supports Swin only"):
    convert.encoder_from_pytorch(backbone, deit_config.model, fmt="mmdet")
  with pytest.raises(convert.FormatError, match="unknown format 'onnx'"):
    convert.encoder_from_pytorch(backbone, deit_config.model, fmt="onnx")
  with pytest.raises(convert.FormatError, match="official holds both encoders"):
    convert.to_pytorch(state, config, "official", branch="target")
  with pytest.raises(convert.FormatError, match="num_classes applies to format backbone or timm"):
    convert.to_pytorch(state, config, "mmdet", num_classes=3)
  with pytest.raises(convert.PthError, match="no such file"):
    convert.encoder_from_pytorch("/nonexistent/x.pth", config.model)


# ---------------------------------------------------------------------------- convert.save


def test_save_writes_what_to_pytorch_returns(swin, tmp_path):
  config, state = swin  # a state on a device
  path = tmp_path / "swin_timm.pth"
  saved = convert.save(state, config, str(path), "timm", branch="target", source="run 3")
  assert list(tmp_path.iterdir()) == [path]  # no temporary file left
  assert str(saved.path) == str(path) and saved.tensors == 61 and saved.meta["source"] == "run 3"
  assert saved.loaders == ["timm.create_model(..., checkpoint_path=...) (load_checkpoint, "
                           "strict): loads 61/61 tensors"]
  written = pth.read_pth(path, trusted_only=True)
  want = convert.to_pytorch(state, config, "timm", branch="target", source="run 3")
  assert written["meta"] == want["meta"] == saved.meta
  assert set(written["state_dict"]) == set(want["state_dict"])
  for name, value in want["state_dict"].items():
    got = written["state_dict"][name].numpy()
    assert got.dtype == value.dtype and got.tobytes() == value.tobytes(), name


def test_save_refuses_to_overwrite_without_force(swin, tmp_path):
  config, state = swin
  path = tmp_path / "out.pth"
  path.write_bytes(b"keep me")
  with pytest.raises(FileExistsError, match="exists; pass --force"):
    convert.save(state, config, path, "mmseg")
  assert path.read_bytes() == b"keep me"
  convert.save(state, config, path, "mmseg", force=True)
  assert set(pth.read_pth(path, trusted_only=True)) == {"state_dict", "meta"}
  assert list(tmp_path.iterdir()) == [path]


def test_a_failed_self_check_leaves_no_file(swin, tmp_path, monkeypatch):
  config, state = swin
  # mmseg's reader finds nothing to load: the consumer simulation fails the check.
  monkeypatch.setattr(consumers, "select_mmseg", lambda ckpt: {})
  path = tmp_path / "out.pth"
  with pytest.raises(convert.FormatError, match="(?s)self-check of the mmseg file failed.*"
                                                "would load 0 of 63 tensors"):
    convert.save(state, config, path, "mmseg")
  assert list(tmp_path.iterdir()) == []
  path.write_bytes(b"old")
  with pytest.raises(convert.FormatError, match="self-check"):
    convert.save(state, config, path, "mmseg", force=True)
  assert list(tmp_path.iterdir()) == [path] and path.read_bytes() == b"old"


def test_save_writes_beside_the_output_and_a_crash_leaves_the_old_file(swin, tmp_path,
                                                                       monkeypatch):
  config, state = swin
  path = tmp_path / "out.pth"
  path.write_bytes(b"old")
  written = []
  real_write = pth.write_pth

  def write_then_crash(target, content):
    written.append(target)
    real_write(target, content)
    assert path.read_bytes() == b"old"  # the output is not touched while writing
    raise OSError("disk full")

  monkeypatch.setattr(pth, "write_pth", write_then_crash)
  with pytest.raises(OSError, match="disk full"):
    convert.save(state, config, path, "official", force=True)
  assert str(written[0].parent) == str(path.parent) and written[0].name != path.name
  assert list(tmp_path.iterdir()) == [path] and path.read_bytes() == b"old"
