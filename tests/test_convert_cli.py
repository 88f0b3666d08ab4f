"""`python -m convert` (export / import / inspect): formats of SPEC §5, bit-exact round
trips, loader simulations, the OpenMMLab patch-merging order, safe reading of released
checkpoints, and failures that write nothing.

The Swin state is the golden fixture's state after 3 steps (released MoBY code, target !=
online, trained BatchNorm statistics), saved the way the released code saves it and
imported through the CLI; every export below reads that workdir.
"""

import contextlib
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import convert
from conftest import assert_trees_equal, nchw, rel_err
from convert import consumers, export, names, pth
from convert.__main__ import load_config, main
from moby_jax import checkpoint, encode, parallel
from moby_jax.models import build_encoder
from moby_jax.models.swin import PatchMerging
import torch_reference as ref

ROOT = pathlib.Path(__file__).resolve().parents[1]
SWIN_CONFIG = f"--config={ROOT}/configs/moby_swin_tiny.py:runlocal"
# The golden fixture's heads, queue and batch (SPEC §7), as command-line overrides;
# 40 examples / batch 4 = 10 steps per epoch.
SWIN_OVERRIDES = ["--config.moby.queue_size=16", "--config.moby.proj_hidden_dim=64",
                  "--config.moby.pred_hidden_dim=64", "--config.moby.proj_dim=32",
                  "--config.data.batch_size=4", "--config.data.num_train_examples=40"]
DEIT_CONFIG = [f"--config={ROOT}/configs/moby_deit_small.py:runlocal",
               "--config.data.batch_size=16", "--config.data.num_train_examples=1024"]
ONE_DEVICE = parallel.make_mesh(jax.devices()[:1])
SWIN_FORMATS = ("official", "backbone", "mmdet", "mmseg", "timm")
DEIT_FORMATS = ("official", "backbone", "timm")


# ------------------------------------------------------------------ released-file helpers


class CfgNode(dict):
  """Stands in for yacs.config.CfgNode, which the released code pickles into its files."""


class RunsCode:
  """Pickles as a call to exec: a reader that runs pickled code would create `marker`."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@contextlib.contextmanager
def importable_yacs():
  """`yacs.config.CfgNode` importable while saving only (so loading meets a foreign class)."""
  yacs, yacs_config = types.ModuleType("yacs"), types.ModuleType("yacs.config")
  CfgNode.__module__, yacs_config.CfgNode = "yacs.config", CfgNode
  sys.modules.update({"yacs": yacs, "yacs.config": yacs_config})
  try:
    yield
  finally:
    del sys.modules["yacs"], sys.modules["yacs.config"]


def save_released(path, state_dict, epoch, marker):
  """torch.save the way the released MoBY code does: model, optimizer, lr_scheduler,
  epoch, config (a yacs CfgNode), plus an entry that would run code if unpickled blindly."""
  with importable_yacs():
    torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
                "lr_scheduler": {"last_epoch": epoch}, "max_accuracy": 0.0, "epoch": epoch,
                "config": CfgNode(MODEL=CfgNode(TYPE="moby"), TRAIN=CfgNode(EPOCHS=300)),
                "amp": RunsCode(marker)}, path)


def run(capsys, *argv) -> tuple[int, str, str]:
  capsys.readouterr()
  code = main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def load(path):
  return torch.load(path, map_location="cpu", weights_only=True)


def arrays(state_dict):
  return {k: v.numpy() for k, v in state_dict.items()}


def export_all(workdir, out_dir, fmts):
  paths = {}
  for fmt in fmts:
    paths[fmt] = out_dir / f"{fmt}.pth"
    assert main(["export", str(workdir), "--format", fmt, "-o", str(paths[fmt])]) == 0, fmt
  paths["target"] = out_dir / "backbone_target.pth"
  assert main(["export", str(workdir), "--format", "backbone", "--branch", "target",
               "-o", str(paths["target"])]) == 0
  return paths


@pytest.fixture(scope="module")
def swin(tmp_path_factory, moby_fixture):
  tmp = tmp_path_factory.mktemp("swin")
  scalars = {"view1_nhwc", "view2_nhwc", "loss", "momentum", "k", "grad_norm_before_clip"}
  released = {k[len("step3/"):]: moby_fixture[k] for k in moby_fixture.files
              if k.startswith("step3/") and k[len("step3/"):] not in scalars}
  source, workdir, marker = tmp / "released.pth", tmp / "workdir", tmp / "PWNED"
  save_released(source, released, epoch=0, marker=marker)
  assert main(["import", str(source), SWIN_CONFIG, *SWIN_OVERRIDES,
               "--workdir", str(workdir)]) == 0
  state, config = checkpoint.load_state(workdir, mesh=ONE_DEVICE)
  paths = export_all(workdir, tmp, SWIN_FORMATS)
  return types.SimpleNamespace(tmp=tmp, source=source, released=released, marker=marker,
                               workdir=workdir, state=jax.device_get(state), config=config,
                               paths=paths, model=build_encoder(config.model))


@pytest.fixture(scope="module")
def deit(tmp_path_factory, vit_fixture):
  """A DeiT MoBY state: the ViT fixture's weights online, shifted copies as the target,
  random heads and queues, imported through the CLI."""
  tmp = tmp_path_factory.mktemp("deit")
  config = load_config(DEIT_CONFIG[0][len("--config="):], DEIT_CONFIG[1:])
  weights = {k[len("weights/"):]: vit_fixture[k] for k in vit_fixture.files
             if k.startswith("weights/")}
  rng = np.random.default_rng(0)
  released = {}
  for name, shape in convert.moby.expected_shapes(config).items():
    if name.startswith("encoder."):
      released[name] = weights[name[len("encoder."):]]
    elif name.startswith("encoder_k."):
      released[name] = weights[name[len("encoder_k."):]] + np.float32(0.01)
    elif name.endswith("num_batches_tracked"):
      released[name] = np.asarray(7, np.int64)
    elif name == "queue_ptr":
      released[name] = np.asarray([32], np.int64)
    else:
      released[name] = (rng.normal(size=shape) if not name.endswith("running_var")
                        else rng.uniform(0.5, 1.5, size=shape)).astype(np.float32)
  source, workdir = tmp / "released.pth", tmp / "workdir"
  save_released(source, released, epoch=1, marker=tmp / "PWNED")
  assert main(["import", str(source), *DEIT_CONFIG, "--workdir", str(workdir)]) == 0
  state, config = checkpoint.load_state(workdir, mesh=ONE_DEVICE)
  paths = export_all(workdir, tmp, DEIT_FORMATS)
  return types.SimpleNamespace(tmp=tmp, released=released, workdir=workdir, paths=paths,
                               state=jax.device_get(state), config=config,
                               model=build_encoder(config.model))


# ------------------------------------------------------------------- import -> export


def test_released_checkpoint_imports_and_exports_official_byte_identical(swin):
  assert not swin.marker.exists()  # the pickled exec in the file never ran
  assert int(swin.state.step) == 10  # epoch 0 done: (0 + 1) x 40 / 4 steps
  assert int(swin.state.queue_ptr) == 12
  out = load(swin.paths["official"])
  assert set(out) == {"model", "meta"}
  exported = arrays(out["model"])
  assert set(exported) == set(swin.released)
  for name, value in swin.released.items():
    got = exported[name]
    assert got.dtype == value.dtype and got.shape == value.shape, name
    assert got.tobytes() == np.ascontiguousarray(value).tobytes(), name


def test_deit_imports_with_the_epoch_step_and_exports_official_byte_identical(deit):
  assert int(deit.state.step) == 2 * 1024 // 16  # epoch 1 done
  exported = arrays(load(deit.paths["official"])["model"])
  assert set(exported) == set(deit.released)
  for name, value in deit.released.items():
    assert exported[name].dtype == value.dtype, name
    assert exported[name].tobytes() == np.ascontiguousarray(value).tobytes(), name


# ------------------------------------------------------------------ pinned key lists


def swin_mu_block(prefix, dim, heads, attn, fc1, fc2, index):
  """One swin_mu block (window 4, MLP ratio 4) under the given module names."""
  keys = {f"{prefix}norm1.weight": (dim,), f"{prefix}norm1.bias": (dim,),
          f"{prefix}{attn}relative_position_bias_table": (49, heads),
          f"{prefix}{attn}qkv.weight": (3 * dim, dim), f"{prefix}{attn}qkv.bias": (3 * dim,),
          f"{prefix}{attn}proj.weight": (dim, dim), f"{prefix}{attn}proj.bias": (dim,),
          f"{prefix}norm2.weight": (dim,), f"{prefix}norm2.bias": (dim,),
          f"{prefix}{fc1}weight": (4 * dim, dim), f"{prefix}{fc1}bias": (4 * dim,),
          f"{prefix}{fc2}weight": (dim, 4 * dim), f"{prefix}{fc2}bias": (dim,)}
  if index:
    keys[f"{prefix}{attn}relative_position_index"] = (16, 16)
  return keys


# swin_mu: embed 16, stages (dim, heads) = (16, 2), (32, 4), two blocks each, window 4.
SWIN_MU_STAGES = ((0, 16, 2), (1, 32, 4))

MMDET_SWIN_MU = {
    "backbone.patch_embed.projection.weight": (16, 3, 4, 4),
    "backbone.patch_embed.projection.bias": (16,),
    "backbone.patch_embed.norm.weight": (16,), "backbone.patch_embed.norm.bias": (16,),
    "backbone.stages.0.downsample.norm.weight": (64,),
    "backbone.stages.0.downsample.norm.bias": (64,),
    "backbone.stages.0.downsample.reduction.weight": (32, 64),
    "backbone.norm.weight": (32,), "backbone.norm.bias": (32,),
    **{k: v for i, dim, heads in SWIN_MU_STAGES for j in (0, 1)
       for k, v in swin_mu_block(f"backbone.stages.{i}.blocks.{j}.", dim, heads,
                                 "attn.w_msa.", "ffn.layers.0.0.", "ffn.layers.1.",
                                 index=True).items()},
}

TIMM_SWIN_MU = {
    "patch_embed.proj.weight": (16, 3, 4, 4), "patch_embed.proj.bias": (16,),
    "patch_embed.norm.weight": (16,), "patch_embed.norm.bias": (16,),
    "layers.1.downsample.norm.weight": (64,), "layers.1.downsample.norm.bias": (64,),
    "layers.1.downsample.reduction.weight": (32, 64),
    "norm.weight": (32,), "norm.bias": (32,),
    **{k: v for i, dim, heads in SWIN_MU_STAGES for j in (0, 1)
       for k, v in swin_mu_block(f"layers.{i}.blocks.{j}.", dim, heads, "attn.", "mlp.fc1.",
                                 "mlp.fc2.", index=False).items()},
}

ORIGINAL_SWIN_MU = {
    "patch_embed.proj.weight": (16, 3, 4, 4), "patch_embed.proj.bias": (16,),
    "patch_embed.norm.weight": (16,), "patch_embed.norm.bias": (16,),
    "layers.0.downsample.norm.weight": (64,), "layers.0.downsample.norm.bias": (64,),
    "layers.0.downsample.reduction.weight": (32, 64),
    "layers.0.blocks.1.attn_mask": (4, 16, 16),  # stage 0 is 8x8: 4 shifted windows
    "norm.weight": (32,), "norm.bias": (32,),
    **{k: v for i, dim, heads in SWIN_MU_STAGES for j in (0, 1)
       for k, v in swin_mu_block(f"layers.{i}.blocks.{j}.", dim, heads, "attn.", "mlp.fc1.",
                                 "mlp.fc2.", index=True).items()},
}


def shapes(state_dict):
  return {k: tuple(v.shape) for k, v in state_dict.items()}


def test_key_sets_and_shapes_per_format_are_the_published_ones(swin):
  assert len(MMDET_SWIN_MU) == 65 and len(TIMM_SWIN_MU) == 61
  files = {fmt: load(swin.paths[fmt]) for fmt in SWIN_FORMATS}
  assert shapes(files["mmdet"]["state_dict"]) == MMDET_SWIN_MU
  assert shapes(files["mmseg"]["state_dict"]) == {
      k[len("backbone."):]: v for k, v in MMDET_SWIN_MU.items()}
  assert shapes(files["timm"]["state_dict"]) == TIMM_SWIN_MU
  assert shapes(files["backbone"]["model"]) == ORIGINAL_SWIN_MU
  official = shapes(files["official"]["model"])
  assert {k[len("encoder."):]: v for k, v in official.items()
          if k.startswith("encoder.")} == ORIGINAL_SWIN_MU
  assert {k[len("encoder_k."):]: v for k, v in official.items()
          if k.startswith("encoder_k.")} == ORIGINAL_SWIN_MU
  assert official["queue1"] == official["queue2"] == (32, 16)
  assert official["queue_ptr"] == (1,)
  assert official["projector.linear_hidden.1.weight"] == (64, 32)
  assert official["predictor.linear_hidden.2.running_var"] == (64,)
  for fmt, f in files.items():
    entry = "state_dict" if fmt in ("mmdet", "mmseg", "timm") else "model"
    assert set(f) == {entry, "meta"}, fmt


def test_deit_key_sets_and_openmmlab_refusal(deit, capsys):
  vit = {"cls_token": (1, 1, 32), "pos_embed": (1, 17, 32),
         "patch_embed.proj.weight": (32, 3, 8, 8), "patch_embed.proj.bias": (32,),
         "norm.weight": (32,), "norm.bias": (32,)}
  for i in (0, 1):
    vit.update({f"blocks.{i}.norm1.weight": (32,), f"blocks.{i}.norm1.bias": (32,),
                f"blocks.{i}.attn.qkv.weight": (96, 32), f"blocks.{i}.attn.qkv.bias": (96,),
                f"blocks.{i}.attn.proj.weight": (32, 32), f"blocks.{i}.attn.proj.bias": (32,),
                f"blocks.{i}.norm2.weight": (32,), f"blocks.{i}.norm2.bias": (32,),
                f"blocks.{i}.mlp.fc1.weight": (128, 32), f"blocks.{i}.mlp.fc1.bias": (128,),
                f"blocks.{i}.mlp.fc2.weight": (32, 128), f"blocks.{i}.mlp.fc2.bias": (32,)})
  assert shapes(load(deit.paths["backbone"])["model"]) == vit
  assert shapes(load(deit.paths["timm"])["state_dict"]) == vit  # timm's ViT names
  for fmt in ("mmdet", "mmseg"):
    out = deit.tmp / f"{fmt}.pth"
    code, _, err = run(capsys, "export", deit.workdir, "--format", fmt, "-o", out)
    assert code == 1 and "Swin only" in err and "DeiT" in err and not out.exists()


@pytest.mark.parametrize("fields,fmt,message", [
    (dict(norm_before_mlp="bn"), "mmdet", "MoBY-BN"),
    (dict(norm_before_mlp="bn"), "timm", "MoBY-BN"),
    (dict(ape=True), "mmseg", "absolute_pos_embed"),
    (dict(patch_norm=False), "timm", "patch_norm"),
])
def test_variants_the_target_cannot_express_are_refused(fields, fmt, message):
  with pytest.raises(names.FormatError, match=message):
    names.check_supported(fmt, build_encoder(dict(name="swin_mu", **fields)))


# ------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("family", ["swin", "deit"])
def test_every_format_round_trips_to_flax_bit_exactly(family, request):
  run_ = request.getfixturevalue(family)
  state, model = run_.state, run_.model
  for fmt in ("backbone", "mmdet", "mmseg", "timm"):
    if fmt not in run_.paths:
      continue
    f = load(run_.paths[fmt])
    back = names.from_format(fmt, f[names.FORMATS[fmt].container], model)
    assert_trees_equal(convert.torch_to_flax(back, model), {"params": state.params["encoder"]})
  target = names.from_format("backbone", load(run_.paths["target"])["model"], model)
  assert_trees_equal(convert.torch_to_flax(target, model),
                     {"params": state.target_params["encoder"]})
  # The whole state through the official file (optimizer state, rng aside).
  back = convert.from_pytorch(load(run_.paths["official"]), run_.config, step=int(state.step),
                              mesh=ONE_DEVICE)
  for field in ("params", "target_params", "batch_stats", "target_batch_stats", "queue1",
                "queue2", "queue_ptr", "step"):
    assert_trees_equal(getattr(back, field), getattr(state, field))


# ------------------------------------------------- PyTorch references load the exports


@pytest.mark.parametrize("family", ["swin", "deit"])
def test_reference_backbones_load_exports_strictly_with_equal_features(family, request):
  run_ = request.getfixturevalue(family)
  x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
  official = load(run_.paths["official"])["model"]
  cases = [("online", load(run_.paths["backbone"])["model"]),
           ("target", load(run_.paths["target"])["model"]),
           # the det/seg repos' rule: keep encoder.*, prefix removed
           ("online", {k[len("encoder."):]: v for k, v in official.items()
                       if k.startswith("encoder.")})]
  if family == "deit":
    cases.append(("online", load(run_.paths["timm"])["state_dict"]))
  ours = {"online": encode(run_.state, x, run_.config, branch="online"),
          # the online module on the target weights: one compile less (eval mode, so the
          # branches' different drop-path rates do not matter)
          "target": encode(run_.state.replace(params=run_.state.target_params), x,
                           run_.config, branch="online")}
  for branch, state_dict in cases:
    net = ref.like(run_.model, drop_path_rate=0.0).eval()
    net.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
      want = net(nchw(x)).numpy()
    assert rel_err(ours[branch], want) < 1e-5


def test_deit_export_reproduces_the_timm_vit_golden_features(deit, vit_fixture):
  net = ref.like(deit.model, drop_path_rate=0.0).eval()
  net.load_state_dict(load(deit.paths["backbone"])["model"], strict=True)
  with torch.no_grad():
    got = net(nchw(vit_fixture["input_nhwc"])).numpy()
  assert rel_err(got, vit_fixture["features"]) < 1e-5


# ---------------------------------------------------- OpenMMLab patch merging, numerically


class UnfoldPatchMerging(torch.nn.Module):
  """Patch merging that gathers the 2x2 neighbours the OpenMMLab way: nn.Unfold (kernel 2,
  stride 2) on the (B, C, H, W) map, then LayerNorm(4C) and Linear(4C, 2C, bias=False)."""

  def __init__(self, dim):
    super().__init__()
    self.sampler = torch.nn.Unfold(kernel_size=2, stride=2)
    self.norm = torch.nn.LayerNorm(4 * dim)
    self.reduction = torch.nn.Linear(4 * dim, 2 * dim, bias=False)

  def forward(self, x, hw):
    b, _, c = x.shape
    x = x.view(b, *hw, c).permute(0, 3, 1, 2)
    return self.reduction(self.norm(self.sampler(x).transpose(1, 2)))


def test_openmmlab_reorder_matches_an_unfold_patch_merging(swin):
  mm = load(swin.paths["mmdet"])["state_dict"]
  orig = load(swin.paths["backbone"])["model"]
  x = torch.from_numpy(np.random.default_rng(2).normal(size=(2, 64, 16)).astype(np.float32))

  unfold = UnfoldPatchMerging(16)
  unfold.load_state_dict({k: mm[f"backbone.stages.0.downsample.{k}"]
                          for k in ("norm.weight", "norm.bias", "reduction.weight")})
  original = ref.PatchMerging((8, 8), 16)
  original.load_state_dict({k: orig[f"layers.0.downsample.{k}"]
                            for k in ("norm.weight", "norm.bias", "reduction.weight")})
  ours = PatchMerging(jnp.float32).apply(
      {"params": swin.state.params["encoder"]["layers_0"]["downsample"]},
      x.numpy().reshape(2, 8, 8, 16))
  with torch.no_grad():
    got, want = unfold(x, (8, 8)).numpy(), original(x).numpy()
    # The same weights without the reorder give a different function.
    unfold.load_state_dict({k: orig[f"layers.0.downsample.{k}"]
                            for k in ("norm.weight", "norm.bias", "reduction.weight")})
    unordered = unfold(x, (8, 8)).numpy()
  assert np.abs(got - want).max() < 1e-6
  assert np.abs(got - np.asarray(ours).reshape(2, 16, 32)).max() < 1e-6
  assert np.abs(unordered - want).max() > 1e-2


# --------------------------------------------------------------- downstream loaders


def test_loader_simulations(swin):
  model, official = swin.model, load(swin.paths["official"])
  mmdet_loader, = consumers.loaders("mmdet", model)
  # SPEC §5: a raw MoBY file loads zero weights into mmdet's Swin, silently.
  assert consumers.run_loader(mmdet_loader, official)[0] == 0
  assert consumers.run_loader(mmdet_loader, load(swin.paths["mmdet"])) == (63, [])
  # timm's pretrained-file filter converts original names; it would shift a headless
  # timm-named file a second time (it recognises timm names only by head.fc.weight).
  timm_checkpoint, = consumers.loaders("timm", model)
  timm_pretrained = consumers.loaders("backbone", model)[1]
  assert consumers.run_loader(timm_pretrained, load(swin.paths["backbone"])) == (61, [])
  shifted = consumers.Loader("filter", consumers.select_timm_pretrained_swin,
                             timm_pretrained.required)
  assert consumers.run_loader(shifted, load(swin.paths["timm"]))[0] < 61
  assert consumers.run_loader(timm_checkpoint, load(swin.paths["timm"])) == (61, [])
  # With a head (--num-classes) both timm readers take the timm file whole.
  content, _, _ = export.build(swin.state, swin.config, "timm", num_classes=5)
  for loader in consumers.loaders("timm", model, num_classes=5):
    assert consumers.run_loader(loader, content) == (63, []), loader.who


# ------------------------------------------------------------- export safety, meta


def is_plain(value) -> bool:
  if isinstance(value, dict):
    return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
  if isinstance(value, list):
    return all(is_plain(v) for v in value)
  return value is None or isinstance(value, (str, int, float, bool))


@pytest.mark.parametrize("family", ["swin", "deit"])
def test_the_cli_writes_exactly_what_to_pytorch_returns(family, request):
  run_ = request.getfixturevalue(family)
  fmts = SWIN_FORMATS if family == "swin" else DEIT_FORMATS
  files = {(fmt, "online"): run_.paths[fmt] for fmt in fmts}
  files["backbone", "target"] = run_.paths["target"]
  for fmt in fmts:
    if (fmt, "target") not in files and fmt != "official":  # official holds both branches
      files[fmt, "target"] = run_.tmp / f"{fmt}_target.pth"
      assert main(["export", str(run_.workdir), "--format", fmt, "--branch", "target", "-o",
                   str(files[fmt, "target"])]) == 0
  for (fmt, branch), path in files.items():
    written = load(path)
    want = convert.to_pytorch(run_.state, run_.config, fmt, branch=branch,
                              source=str(run_.workdir.absolute()))
    assert written["meta"] == want["meta"], (fmt, branch)
    assert set(written) == set(want), (fmt, branch)
    entry = names.FORMATS[fmt].container
    assert set(written[entry]) == set(want[entry]), (fmt, branch)
    for name, value in want[entry].items():
      got = written[entry][name].numpy()
      assert got.dtype == value.dtype and got.shape == value.shape, (fmt, branch, name)
      assert got.tobytes() == value.tobytes(), (fmt, branch, name)
  # Apart from where the state came from, a file's meta is the library's default.
  default = convert.to_pytorch(run_.state, run_.config, "official")["meta"]
  assert {**load(files["official", "online"])["meta"], "source": ""} == default


def test_meta_is_plain_and_describes_the_export(swin):
  for name, path in swin.paths.items():
    meta = load(path)["meta"]
    assert is_plain(meta), name
    assert meta["format"] == ("backbone" if name == "target" else name)
    assert meta["step"] == 10 and meta["source"] == str(swin.workdir.absolute())
    assert meta["moby_jax_version"] == "0.1.0"
    arch = meta["architecture"]
    assert (arch["variant"], arch["family"], arch["embed_dim"], arch["depths"],
            arch["num_heads"], arch["window_size"], arch["img_size"]) == (
                "swin_mu", "swin", 16, [2, 2], [2, 4], 4, 32)
    assert meta["config"]["moby"]["queue_size"] == 16
  assert load(swin.paths["target"])["meta"]["branch"] == "target"
  assert load(swin.paths["official"])["meta"]["branch"] == "online and target"


def test_export_refuses_to_overwrite_without_force(swin, capsys):
  path = swin.tmp / "overwrite.pth"
  path.write_bytes(b"keep me")
  code, _, err = run(capsys, "export", swin.workdir, "--format", "timm", "-o", path)
  assert code == 1 and "exists; pass --force" in err and path.read_bytes() == b"keep me"
  step_dir = swin.workdir / "checkpoints" / "10"  # one checkpoint step directory
  code, out, _ = run(capsys, "export", step_dir, "--format", "timm", "-o", path, "--force")
  assert code == 0 and "loads 61/61 tensors" in out
  written = load(path)
  assert shapes(written["state_dict"]) == TIMM_SWIN_MU
  assert written["meta"]["source"] == str(step_dir) and written["meta"]["step"] == 10


@pytest.mark.parametrize("fmt,table,entry,wrong,expect", [
    ("mmdet", "renames", 2, ("layers.{i}.blocks.{j}.mlp.fc1.",
                             "stages.{i}.blocks.{j}.ffn.layers.0."),
     "missing key: backbone.stages.0.blocks.0.ffn.layers.0.0.weight"),
    ("timm", "renames", 0, ("layers.{i}.downsample.", "layers.{i}.downsample."),
     "unexpected key: layers.0.downsample.reduction.weight"),
    ("mmseg", "layout", "downsample.reduction.weight",
     (lambda w: w, names.reduction_from_unfold),
     "round trip: layers.0.downsample.reduction.weight"),
])
def test_self_check_fails_loudly_on_a_broken_map(swin, capsys, monkeypatch, fmt, table, entry,
                                                 wrong, expect):
  spec = names.FORMATS[fmt]
  if table == "renames":
    broken = list(spec.renames["swin"])
    broken[entry] = wrong
    monkeypatch.setitem(spec.renames, "swin", tuple(broken))
  else:
    monkeypatch.setitem(spec.layout["swin"], entry, wrong)
  out_dir = swin.tmp / f"broken_{fmt}"
  out_dir.mkdir()
  code, _, err = run(capsys, "export", swin.workdir, "--format", fmt, "-o",
                     out_dir / "out.pth")
  assert code == 1 and "self-check" in err and expect in err
  if table == "renames":
    assert "would load" in err  # the downstream reader would come up short
  assert list(out_dir.iterdir()) == []  # neither the output nor a temporary file


# ---------------------------------------------------------------- import failures


def test_import_refuses_bad_inputs_and_writes_nothing(swin, capsys):
  tmp = swin.tmp
  truncated, text, listing, no_model, workdir = (
      tmp / "truncated.pth", tmp / "notes.pth", tmp / "list.pth", tmp / "nomodel.pth",
      tmp / "new_workdir")
  data = swin.source.read_bytes()
  truncated.write_bytes(data[:len(data) // 2])
  text.write_text("not a checkpoint\n")
  torch.save([torch.zeros(3)], listing)
  torch.save({"epoch": 3, "weights": [1, 2]}, no_model)
  cases = [
      (swin.source, SWIN_OVERRIDES + ["--config.model.window_size=2"],
       ["does not fit config", "window_size 4", "window_size 2",
        "shape mismatch: encoder.layers.0.blocks.0.attn.relative_position_bias_table is "
        "(49, 2), model needs (9, 2)"]),
      (swin.source, ["--config.data.num_train_examples=1024"],
       ["shape mismatch: projector.linear_hidden.1.weight is (64, 32), "
                         "model needs (128, 32)"]),
      (truncated, SWIN_OVERRIDES, ["not a readable PyTorch file", "truncated"]),
      (text, SWIN_OVERRIDES, ["not a readable PyTorch file"]),
      (listing, SWIN_OVERRIDES, ["holds a list, not a checkpoint dict"]),
      (no_model, SWIN_OVERRIDES, ["not a checkpoint: no 'model'"]),
      (swin.paths["backbone"], SWIN_OVERRIDES, ["is a backbone file", "needs an official"]),
      (swin.source, SWIN_OVERRIDES + ["--config.model.no_such_field=1"], ["no_such_field"]),
  ]
  for path, overrides, messages in cases:
    code, _, err = run(capsys, "import", path, SWIN_CONFIG, *overrides, "--workdir", workdir)
    assert code == 1 and err.startswith("error: "), (path, err)
    for message in messages:
      assert message in err, (path, message, err)
    assert not workdir.exists(), path
  before = sorted(p.relative_to(swin.workdir) for p in swin.workdir.rglob("*"))
  code, _, err = run(capsys, "import", swin.source, SWIN_CONFIG, *SWIN_OVERRIDES,
                     "--workdir", swin.workdir)
  assert code == 1 and "already holds checkpoints" in err
  assert sorted(p.relative_to(swin.workdir) for p in swin.workdir.rglob("*")) == before


def test_reader_replaces_foreign_objects_and_never_runs_pickled_code(swin):
  ckpt = pth.read_pth(swin.source)
  assert isinstance(ckpt["config"], pth.ForeignObject)
  assert ckpt["config"].foreign_name == "yacs.config.CfgNode"
  assert ckpt["config"]["TRAIN"]["EPOCHS"] == 300
  assert ckpt["amp"].foreign_name == "builtins.exec" and not swin.marker.exists()
  assert ckpt["epoch"] == 0 and set(ckpt["model"]) == set(swin.released)


# ------------------------------------------------------------------------------ inspect


@pytest.mark.parametrize("fmt,img", [("official", "img_size 32"), ("backbone", "img_size 32"),
                                     ("mmdet", "not inferable"), ("mmseg", "not inferable"),
                                     ("timm", "not inferable")])
def test_inspect_names_format_architecture_and_counts(swin, capsys, fmt, img):
  code, out, _ = run(capsys, "inspect", swin.paths[fmt])
  assert code == 0, out
  assert f"format:       {fmt} " in out
  assert "swin_mu (swin): embed_dim 16, patch_size 4, depths [2, 2], num_heads [2, 4], " \
         "window_size 4" in out
  assert img in out
  encoder = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(swin.state.params["encoder"]))
  assert f"{encoder:,}" in out
  assert f"exactly the {fmt} key list" in out
  assert '"format": "' + fmt + '"' in out  # the meta entry


def test_inspect_deit_and_lists_key_problems(deit, capsys):
  code, out, _ = run(capsys, "inspect", deit.paths["official"])
  assert code == 0 and "deit_mu (deit): embed_dim 32, patch_size 8, depth 2, img_size 32" in out
  assert "'proj_hidden_dim': 128" in out and "'queue_size': 256" in out
  f = load(deit.paths["backbone"])
  del f["model"]["blocks.1.norm2.bias"]
  f["model"]["blocks.0.extra"] = torch.zeros(2)
  f["model"]["norm.weight"] = torch.zeros(5)
  tampered = deit.tmp / "tampered.pth"
  torch.save(f, tampered)
  code, out, _ = run(capsys, "inspect", tampered)
  assert code == 1 and "3 problems against the backbone key list" in out
  assert "missing key: blocks.1.norm2.bias (32,)" in out
  assert "unexpected key: blocks.0.extra (2,)" in out
  assert "shape mismatch: norm.weight is (5,), expected (32,)" in out


# ------------------------------------------------------------------- the real entry point


def test_help_names_commands_formats_and_the_deit_refusal(capsys):
  with pytest.raises(SystemExit) as exit_:
    main(["--help"])
  out = capsys.readouterr().out
  assert exit_.value.code == 0
  for word in ("export", "import", "inspect", "official", "backbone", "mmdet", "mmseg",
               "timm", "a DeiT encoder is refused"):
    assert word in out, word


def test_python_dash_m_convert_exports(swin):
  out = swin.tmp / "subprocess_mmseg.pth"
  export = subprocess.run([sys.executable, "-m", "convert", "export", str(swin.workdir),
                           "--step", "10", "--format", "mmseg", "-o", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert export.returncode == 0, export.stderr
  assert "mmseg 1.x SwinTransformer" in export.stdout and "loads 63/63 tensors" in export.stdout
  got, want = load(out)["state_dict"], load(swin.paths["mmseg"])["state_dict"]
  assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
