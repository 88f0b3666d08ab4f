"""What a `.pth` file is, read from its keys and shapes alone: the entry that holds its
state_dict, its format (`detect`), the encoder architecture and MoBY heads its shapes imply,
and parameter counts. Used by `python -m convert inspect` and for import error messages.
"""

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from convert.keys import shape_of
from convert.names import FormatError
from moby_jax.models import VARIANTS
from moby_jax.models.swin import SwinTransformer


def container_of(ckpt: Mapping[str, Any]) -> tuple[str | None, Mapping[str, Any]]:
  """(entry name or None for a bare state_dict, the state_dict) of a loaded file."""
  for key in ("state_dict", "model"):
    if isinstance(ckpt.get(key), Mapping):
      return key, ckpt[key]
  return None, ckpt


def detect(keys) -> str:
  """The format of a state_dict from its key names; FormatError if none fits."""
  keys = set(keys)

  def has(pattern):
    return any(re.search(pattern, k) for k in keys)

  if has(r"^encoder\.") and has(r"^encoder_k\."):
    return "official"
  if has(r"^backbone\.stages\.\d+\.blocks\."):
    return "mmdet"
  if has(r"^stages\.\d+\.blocks\.\d+\.attn\.w_msa\."):
    return "mmseg"
  if has(r"^layers\.\d+\.blocks\.\d+\.attn\.qkv\.weight$"):
    if has(r"^layers\.0\.downsample\.") or has(r"relative_position_index$|attn_mask$"):
      return "backbone"
    return "timm"
  if has(r"^blocks\.\d+\.attn\.qkv\.weight$") and "cls_token" in keys:
    return "backbone"  # DeiT: the original and timm names are the same
  sample = ", ".join(sorted(keys)[:5])
  raise FormatError(f"not a checkpoint format this tool knows (first keys: {sample})")


def _isqrt_exact(n: int) -> int | None:
  r = math.isqrt(n)
  return r if r * r == n else None


def infer_architecture(sd: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
  """Encoder fields from the shapes of an original-name backbone state_dict, and notes on
  what the shapes do not say. Square images are assumed."""
  notes = []
  if "cls_token" in sd:
    embed = shape_of(sd["cls_token"])[-1]
    patch = shape_of(sd["patch_embed.proj.weight"])[-1]
    depth = 1 + max(int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m)
    tokens = shape_of(sd["pos_embed"])[1] - 1
    side = _isqrt_exact(tokens)
    fields = dict(embed_dim=embed, patch_size=patch, depth=depth,
                  img_size=side * patch if side else None,
                  mlp_ratio=shape_of(sd["blocks.0.mlp.fc1.weight"])[0] / embed,
                  qkv_bias="blocks.0.attn.qkv.bias" in sd,
                  num_classes=shape_of(sd["head.weight"])[0] if "head.weight" in sd else 0)
    notes.append("num_heads: not stored in the weights (the fused qkv hides it)")
    return fields, notes
  proj = shape_of(sd["patch_embed.proj.weight"])
  embed, patch = proj[0], proj[-1]
  blocks = {}
  for k in sd:
    m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", k)
    if m:
      blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
  stages = sorted(blocks)
  depths = [len(blocks[i]) for i in stages]
  tables = [shape_of(sd[f"layers.{i}.blocks.0.attn.relative_position_bias_table"])
            for i in stages]
  heads = [t[1] for t in tables]
  windows = [(_isqrt_exact(t[0]) + 1) // 2 for t in tables]
  window, img = windows[0], None
  masks = sorted(k for k in sd if k.endswith("attn_mask"))
  if "absolute_pos_embed" in sd:
    img = _isqrt_exact(shape_of(sd["absolute_pos_embed"])[1]) * patch
  elif masks:
    i = int(re.match(r"layers\.(\d+)\.", masks[0]).group(1))
    nw, n, _ = shape_of(sd[masks[0]])
    img = _isqrt_exact(n) * _isqrt_exact(nw) * 2 ** i * patch
  elif any(w < window for w in windows):
    i = next(i for i, w in enumerate(windows) if w < window)
    img = windows[i] * 2 ** i * patch  # a stage smaller than the window uses its own size
  else:
    notes.append("image size: not inferable (no attn_mask, absolute_pos_embed or "
                 "window-capped stage in these keys)")
  norm2 = "layers.0.blocks.0.norm2.running_mean"
  fields = dict(embed_dim=embed, patch_size=patch, depths=depths, num_heads=heads,
                window_size=window, img_size=img,
                mlp_ratio=shape_of(sd["layers.0.blocks.0.mlp.fc1.weight"])[0] / embed,
                qkv_bias="layers.0.blocks.0.attn.qkv.bias" in sd,
                ape="absolute_pos_embed" in sd, patch_norm="patch_embed.norm.weight" in sd,
                norm_before_mlp="bn" if norm2 in sd else "ln",
                num_classes=shape_of(sd["head.weight"])[0] if "head.weight" in sd else 0)
  return fields, notes


def match_variant(fields: Mapping[str, Any]) -> str | None:
  """The registry variant with these widths, depths (and heads, for Swin), if any."""
  swin = "depths" in fields
  keys = ("embed_dim", "depths", "num_heads") if swin else ("embed_dim", "depth", "patch_size")
  for name, (cls, defaults) in VARIANTS.items():
    if (cls is SwinTransformer) == swin and all(
        tuple(np.atleast_1d(defaults.get(k))) == tuple(np.atleast_1d(fields[k])) for k in keys):
      return name
  return None


def model_config(fields: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
  """A `build_encoder` config for inferred fields (unknown values filled in), and notes."""
  variant = match_variant(fields)
  swin = "depths" in fields
  config = {"name": variant or ("swin_tiny" if swin else "deit_small"), **fields}
  notes = []
  if swin and config["img_size"] is None:  # any size with no capped stage has these keys
    config["img_size"] = (config["patch_size"] * config["window_size"]
                          * 2 ** len(config["depths"]))
  if not swin:
    if config["img_size"] is None:
      raise FormatError("pos_embed does not hold a square token grid plus a cls token")
    defaults = VARIANTS[variant][1] if variant else {}
    config["num_heads"] = defaults.get("num_heads", max(1, config["embed_dim"] // 64))
    notes.append(f"num_heads {config['num_heads']} assumed"
                 + (f" (variant {variant})" if variant else " (embed_dim / 64)"))
  return config, notes


def infer_moby_heads(sd: Mapping[str, Any]) -> dict[str, int]:
  """`config.moby` head and queue fields from an official state_dict's shapes."""
  out = {}
  for part, prefix in (("proj", "projector."), ("pred", "predictor.")):
    linears = sorted(int(m.group(1)) for k in sd
                     for m in [re.match(re.escape(prefix) + r"linear_hidden\.(\d+)\.weight$", k)]
                     if m and len(shape_of(sd[k])) == 2)  # the BatchNorm weights are 1-D
    out[f"{part}_layers"] = len(linears) + 1
    if linears:
      out[f"{part}_hidden_dim"] = shape_of(sd[f"{prefix}linear_hidden.{linears[0]}.weight"])[0]
    out["proj_dim"] = shape_of(sd[f"{prefix}linear_out.weight"])[0]
  out["queue_size"] = shape_of(sd["queue1"])[1]
  return out


def parameter_count(sd: Mapping[str, Any]) -> int:
  """Learned values (buffers, running statistics and queues excluded)."""
  skip = re.compile(r"relative_position_index$|attn_mask$|running_mean$|running_var$|"
                    r"num_batches_tracked$|^queue")
  return sum(int(np.prod(shape_of(v))) for k, v in sd.items() if not skip.search(k))
