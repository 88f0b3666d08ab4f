"""Backbone conversion: golden fixtures, strict loading, key sets from SPEC §5, round trips."""

import re

import jax
import numpy as np
import pytest
import torch

import convert
from conftest import assert_trees_equal, load_torch, nchw, rel_err, torch_state
from moby_jax.models import build_encoder, init_encoder
import torch_reference as ref


# ---------------------------------------------------------------- SPEC §5 key lists


def spec_swin_keys(depths, windows_shifted, ape=False, norm2="ln", head=False):
  """Every key the original Swin state_dict holds, written out from SPEC §5."""
  keys = ["patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight",
          "patch_embed.norm.bias", "norm.weight", "norm.bias"]
  if ape:
    keys.append("absolute_pos_embed")
  if head:
    keys += ["head.weight", "head.bias"]
  norm2_leaves = ["weight", "bias"] + (
      ["running_mean", "running_var", "num_batches_tracked"] if norm2 == "bn" else [])
  for i, depth in enumerate(depths):
    for j in range(depth):
      p = f"layers.{i}.blocks.{j}."
      keys += [p + "norm1.weight", p + "norm1.bias",
               p + "attn.relative_position_bias_table", p + "attn.relative_position_index",
               p + "attn.qkv.weight", p + "attn.qkv.bias", p + "attn.proj.weight",
               p + "attn.proj.bias", p + "mlp.fc1.weight", p + "mlp.fc1.bias",
               p + "mlp.fc2.weight", p + "mlp.fc2.bias"]
      keys += [p + "norm2." + leaf for leaf in norm2_leaves]
      if windows_shifted[i] and j % 2 == 1:
        keys.append(p + "attn_mask")
    if i < len(depths) - 1:
      keys += [f"layers.{i}.downsample.reduction.weight", f"layers.{i}.downsample.norm.weight",
               f"layers.{i}.downsample.norm.bias"]
  return set(keys)


def spec_deit_keys(depth, head=False):
  keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
          "norm.weight", "norm.bias"] + (["head.weight", "head.bias"] if head else [])
  for i in range(depth):
    keys += [f"blocks.{i}.{m}.{leaf}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2",
                                                "mlp.fc1", "mlp.fc2")
             for leaf in ("weight", "bias")]
  return set(keys)


def torch_params(net) -> int:
  return sum(p.numel() for p in net.parameters())


SWIN_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
SWIN_S = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
SWIN_B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))


@pytest.mark.parametrize("name,kwargs,head,count", [
    ("swin_tiny", SWIN_T, 0, 27_519_354),
    ("swin_tiny", SWIN_T, 1000, 28_288_354),
    ("swin_small", SWIN_S, 0, 48_837_258),
    ("swin_base", SWIN_B, 0, 86_743_224),
])
def test_swin_key_sets_shapes_and_param_counts(name, kwargs, head, count):
  net = ref.SwinTransformer(num_classes=head, **kwargs)
  assert torch_params(net) == count
  shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
  # 224 px, window 7: stages 56, 28, 14 shift; the 7x7 last stage does not.
  assert set(shapes) == spec_swin_keys(kwargs["depths"], [True, True, True, False],
                                       head=bool(head))
  model = build_encoder(dict(name=name, num_classes=head))
  assert convert.expected_torch_shapes(model) == shapes
  assert shapes["layers.0.blocks.1.attn_mask"] == (64, 49, 49)
  assert shapes["layers.0.downsample.reduction.weight"] == (2 * kwargs["embed_dim"],
                                                            4 * kwargs["embed_dim"])
  flax_count = sum(int(np.prod(s)) for k, s in convert.expected_torch_shapes(model).items()
                   if not re.search(r"relative_position_index|attn_mask|running_|num_batches",
                                    k))
  assert flax_count == count


def test_deit_small_key_set_shapes_and_param_count():
  net = ref.VisionTransformer()
  assert torch_params(net) == 21_665_664
  shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
  assert set(shapes) == spec_deit_keys(12)
  assert shapes["pos_embed"] == (1, 197, 384) and shapes["cls_token"] == (1, 1, 384)
  assert convert.expected_torch_shapes(build_encoder(dict(name="deit_small"))) == shapes


@pytest.mark.parametrize("fields", [
    dict(name="swin_mu", ape=True, norm_before_mlp="bn", num_classes=5),
    dict(name="swin_tiny", img_size=64, window_size=4),
])
def test_bn_ape_key_sets(fields):
  model = build_encoder(fields)
  net = ref.like(model)
  shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
  shifted = [geo[-1][1] > 0 for geo in model.block_geometry()]
  assert set(shapes) == spec_swin_keys(model.depths, shifted, ape=model.ape,
                                       norm2=model.norm_before_mlp, head=model.num_classes > 0)
  assert convert.expected_torch_shapes(model) == shapes


# ------------------------------------------------------------ golden fixture (released code)


def test_golden_fixture_swin_features_and_bit_exact_export(moby_fixture):
  model = build_encoder(dict(name="swin_mu"))
  init = {k[len("init/"):]: moby_fixture[k] for k in moby_fixture.files
          if k.startswith("init/encoder.")}
  variables = convert.torch_to_flax(init, model, prefix="encoder.")
  out = model.apply(variables, moby_fixture["features/input_nhwc"])
  assert rel_err(out, moby_fixture["features/online_encoder"]) < 1e-5

  back = convert.flax_to_torch(variables, model, prefix="encoder.")
  assert set(back) == set(init)  # buffers included, attn_mask only on shifted blocks
  for key, value in init.items():
    assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
    assert np.array_equal(back[key], value), key


# ------------------------------------------------------------------ strict load, round trip


@pytest.mark.parametrize("fields", [
    dict(name="swin_mu", img_size=64, ape=True, norm_before_mlp="bn", num_classes=3),
    dict(name="swin_tiny", img_size=64, window_size=4),
    dict(name="deit_mu", num_classes=4),
])
def test_pytorch_loads_export_strictly_and_round_trip_is_bit_exact(fields):
  model = build_encoder(fields)
  variables = init_encoder(model, jax.random.key(0))
  exported = convert.flax_to_torch(variables, model)

  net = ref.like(model)
  load_torch(net, exported)  # strict=True: exact key set and shapes
  x = np.random.default_rng(0).normal(size=(2, model.img_size, model.img_size, 3))
  x = x.astype(np.float32)
  with torch.no_grad():
    want = net.eval()(nchw(x)).numpy()
  assert rel_err(jax.jit(model.apply)(variables, x), want) < 1e-5

  # Flax -> PyTorch (through real torch tensors) -> Flax is bit-exact.
  assert_trees_equal(variables, convert.torch_to_flax(net.state_dict(), model))


# ------------------------------------------------------------------------- bad state_dicts


def test_import_lists_every_offending_key(moby_fixture):
  model = build_encoder(dict(name="swin_mu"))
  state = {k[len("init/encoder."):]: moby_fixture[k] for k in moby_fixture.files
           if k.startswith("init/encoder.")}
  state.pop("norm.weight")
  state.pop("layers.1.blocks.0.mlp.fc1.bias")
  state["head.weight"] = np.zeros((10, 32), np.float32)
  state["layers.0.blocks.0.attn.qkv.weight"] = np.zeros((16, 48), np.float32)
  state["layers.0.blocks.1.attn_mask"] = np.zeros((4, 16, 16), np.float32)
  state["layers.1.blocks.1.attn.relative_position_index"] = np.zeros((9, 9), np.int64)
  with pytest.raises(convert.StateDictMismatch) as err:
    convert.torch_to_flax(state, model)
  msg = str(err.value)
  assert "6 problems" in msg
  assert "missing key: norm.weight" in msg
  assert "missing key: layers.1.blocks.0.mlp.fc1.bias" in msg
  assert "unexpected key: head.weight (10, 32)" in msg
  assert "shape mismatch: layers.0.blocks.0.attn.qkv.weight is (16, 48), model needs (48, 16)" in msg
  assert "wrong buffer: layers.0.blocks.1.attn_mask" in msg
  assert "shape mismatch: layers.1.blocks.1.attn.relative_position_index" in msg


def test_import_rejects_a_different_architecture(moby_fixture):
  """The fixture's window-4 weights do not fit a window-2 model (table and buffers)."""
  model = build_encoder(dict(name="swin_mu", window_size=2))
  state = {k[len("init/"):]: moby_fixture[k] for k in moby_fixture.files
           if k.startswith("init/encoder.")}
  with pytest.raises(convert.StateDictMismatch, match="relative_position_bias_table"):
    convert.torch_to_flax(state, model, prefix="encoder.")
