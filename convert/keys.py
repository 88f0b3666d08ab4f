"""The key list of each file format: every key a file holds, with its shape.

The lists are enumerated from the architecture, independently of the name tables in
`names.py`, so a wrong table entry shows up as missing/unexpected keys when a file is
checked (`compare_keys`).
"""

import functools
from collections.abc import Mapping
from typing import Any

from convert import moby as moby_convert
from convert.backbone import expected_torch_shapes
from convert.names import FORMATS, family


def shape_of(value) -> tuple[int, ...]:
  return tuple(int(d) for d in value.shape)


def _head_keys(model, num_classes: int, prefix: str = "head.") -> dict[str, tuple]:
  n = num_classes or model.num_classes
  return {prefix + "weight": (n, model.num_features), prefix + "bias": (n,)} if n else {}


def _swin_stages(model):
  """(stage, dim, [(block, window, heads)], hidden, has_downsample) per stage."""
  geometry, last = model.block_geometry(), len(model.depths) - 1
  for i, geo in enumerate(geometry):
    dim = model.embed_dim * 2 ** i
    blocks = [(j, ws, model.num_heads[i]) for j, (ws, _) in enumerate(geo)]
    yield i, dim, blocks, int(dim * model.mlp_ratio), i < last


def _patch_embed_keys(model, conv: str) -> dict[str, tuple]:
  c, p = model.embed_dim, model.patch_size
  return {f"patch_embed.{conv}.weight": (c, 3, p, p), f"patch_embed.{conv}.bias": (c,),
          "patch_embed.norm.weight": (c,), "patch_embed.norm.bias": (c,)}


def _block_keys(prefix: str, dim: int, hidden: int, ws: int, heads: int, qkv_bias: bool,
                names: dict[str, str], index_buffer: bool) -> dict[str, tuple]:
  """One Swin block; `names` gives the attention, fc1 and fc2 module names."""
  attn, fc1, fc2 = (prefix + names[k] for k in ("attn", "fc1", "fc2"))
  keys = {prefix + "norm1.weight": (dim,), prefix + "norm1.bias": (dim,),
          attn + "relative_position_bias_table": ((2 * ws - 1) ** 2, heads),
          attn + "qkv.weight": (3 * dim, dim), attn + "proj.weight": (dim, dim),
          attn + "proj.bias": (dim,),
          prefix + "norm2.weight": (dim,), prefix + "norm2.bias": (dim,),
          fc1 + "weight": (hidden, dim), fc1 + "bias": (hidden,),
          fc2 + "weight": (dim, hidden), fc2 + "bias": (dim,)}
  if qkv_bias:
    keys[attn + "qkv.bias"] = (3 * dim,)
  if index_buffer:
    keys[attn + "relative_position_index"] = (ws * ws, ws * ws)
  return keys


def _merging_keys(prefix: str, dim: int) -> dict[str, tuple]:
  return {prefix + "norm.weight": (4 * dim,), prefix + "norm.bias": (4 * dim,),
          prefix + "reduction.weight": (2 * dim, 4 * dim)}


def openmmlab_swin_keys(model, final_norm: bool = True) -> dict[str, tuple]:
  """OpenMMLab native Swin keys (no prefix). Their model has its own per-output norms
  (`norm0..3`, not in a pretrained file); the original final `norm` is kept in exports
  (`final_norm`) although the native model does not read it."""
  names = {"attn": "attn.w_msa.", "fc1": "ffn.layers.0.0.", "fc2": "ffn.layers.1."}
  keys = _patch_embed_keys(model, "projection")
  for i, dim, blocks, hidden, down in _swin_stages(model):
    for j, ws, heads in blocks:
      keys.update(_block_keys(f"stages.{i}.blocks.{j}.", dim, hidden, ws, heads,
                              model.qkv_bias, names, index_buffer=True))
    if down:
      keys.update(_merging_keys(f"stages.{i}.downsample.", dim))
  if final_norm:
    keys.update({"norm.weight": (model.num_features,), "norm.bias": (model.num_features,)})
  return keys


def timm_swin_keys(model, num_classes: int = 0) -> dict[str, tuple]:
  """timm's SwinTransformer state_dict: merging at the start of stages 1.., no buffers
  (they are non-persistent there), `head.fc` when there is a head."""
  names = {"attn": "attn.", "fc1": "mlp.fc1.", "fc2": "mlp.fc2."}
  keys = _patch_embed_keys(model, "proj")
  for i, dim, blocks, hidden, down in _swin_stages(model):
    for j, ws, heads in blocks:
      keys.update(_block_keys(f"layers.{i}.blocks.{j}.", dim, hidden, ws, heads,
                              model.qkv_bias, names, index_buffer=False))
    if down:
      keys.update(_merging_keys(f"layers.{i + 1}.downsample.", dim))
  keys.update({"norm.weight": (model.num_features,), "norm.bias": (model.num_features,)})
  keys.update(_head_keys(model, num_classes, "head.fc."))
  return keys


@functools.lru_cache(maxsize=8)
def _original_shapes(model) -> dict[str, tuple]:
  # Traces the model's init; one export asks for it several times.
  return expected_torch_shapes(model)


def original_keys(model, num_classes: int = 0) -> dict[str, tuple]:
  """The original Swin/DeiT state_dict (buffers included), with a head if asked."""
  return {**_original_shapes(model), **_head_keys(model, num_classes)}


def expected_keys(fmt: str, model, config=None, num_classes: int = 0) -> dict[str, tuple]:
  """Every key a `fmt` file holds in its container, with its shape (`config` for official)."""
  fam = family(model)
  if fmt == "official":
    return moby_convert.expected_shapes(config)
  if fmt == "backbone" or (fmt == "timm" and fam == "deit"):
    return original_keys(model, num_classes)
  if fmt == "timm":
    return timm_swin_keys(model, num_classes)
  return {FORMATS[fmt].prefix + k: v for k, v in openmmlab_swin_keys(model).items()}


def compare_keys(given: Mapping[str, Any], expected: Mapping[str, tuple]) -> list[str]:
  """Missing, unexpected and mis-shaped keys of `given` against `expected`."""
  problems = [f"missing key: {k} {tuple(s)}" for k, s in expected.items() if k not in given]
  problems += [f"unexpected key: {k} {shape_of(given[k])}" for k in given if k not in expected]
  problems += [f"shape mismatch: {k} is {shape_of(given[k])}, expected {tuple(expected[k])}"
               for k in given if k in expected and shape_of(given[k]) != tuple(expected[k])]
  return problems
