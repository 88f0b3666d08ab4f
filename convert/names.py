"""Checkpoint file formats (SPEC §5) and their name/layout maps: what each format is, which
models it can carry, and how an original-name backbone state_dict maps into it and back.

  format    file content                              read by
  official  {"model": the whole MoBY state}           the released MoBY code; the Swin det/seg
                                                      repos (they keep `encoder.*`)
  backbone  {"model": one encoder, original names}    the original Swin/DeiT code; timm's
                                                      pretrained-file filter
  mmdet     {"state_dict": "backbone." + native}      mmdet 3.x SwinTransformer
  mmseg     {"state_dict": native}                    mmseg 1.x SwinTransformer
  timm      {"state_dict": timm names}                timm.create_model(checkpoint_path=...)

Every exported file also holds a top-level "meta" entry of plain Python types (`meta.py`).

Names are mapped by prefix tables of (original template, format template) pairs, read in
both directions: `{i}` matches a stage/block number and `{i+1}` the next one. The only
layout change is OpenMMLab's patch merging, which gathers the 2x2 neighbours with
nn.Unfold (channel-major, then kernel row, then column) instead of concatenating
x0, x1, x2, x3 (SPEC §1), so its `downsample` norm and reduction are reordered.
"""

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from convert.backbone import geometry_buffers
from moby_jax.models.swin import SwinTransformer


class FormatError(ValueError):
  """A format cannot carry this model, or a file does not match its format."""


# ---------------------------------------------------------------------------- name tables

Renames = tuple[tuple[str, str], ...]

# mmdet 3.x / mmseg 1.x native Swin names (their swin_converter / swin2mmseg rules).
OPENMMLAB_NAMES: Renames = (
    ("patch_embed.proj.", "patch_embed.projection."),
    ("layers.{i}.blocks.{j}.attn.", "stages.{i}.blocks.{j}.attn.w_msa."),
    ("layers.{i}.blocks.{j}.mlp.fc1.", "stages.{i}.blocks.{j}.ffn.layers.0.0."),
    ("layers.{i}.blocks.{j}.mlp.fc2.", "stages.{i}.blocks.{j}.ffn.layers.1."),
    ("layers.{i}.", "stages.{i}."),
)
# timm's Swin merges patches at the start of the next stage and wraps the head.
TIMM_SWIN_NAMES: Renames = (
    ("layers.{i}.downsample.", "layers.{i+1}.downsample."),
    ("head.", "head.fc."),
)

_TOKEN = re.compile(r"\{(\w)(?:\+(\d+))?\}")


def _match_prefix(template: str, name: str) -> tuple[dict[str, int], int] | None:
  """({variable: value}, end of the match) if `template` is a prefix of `name`."""
  pattern, offsets, pos = [], {}, 0
  for token in _TOKEN.finditer(template):
    pattern += [re.escape(template[pos:token.start()]), rf"(?P<{token.group(1)}>\d+)"]
    offsets[token.group(1)] = int(token.group(2) or 0)
    pos = token.end()
  pattern.append(re.escape(template[pos:]))
  hit = re.match("".join(pattern), name)
  if hit is None:
    return None
  return {k: int(v) - offsets[k] for k, v in hit.groupdict().items()}, hit.end()


def rename(name: str, table: Renames, inverse: bool = False) -> str:
  """`name` mapped by the first matching entry of `table` (format -> original if inverse)."""
  for original, target in table:
    source, dest = (target, original) if inverse else (original, target)
    hit = _match_prefix(source, name)
    if hit is not None:
      values, end = hit
      return _TOKEN.sub(lambda t: str(values[t.group(1)] + int(t.group(2) or 0)), dest) + name[end:]
  return name


# ------------------------------------------------------------------- patch-merging layout

# Unfold's kernel position k = 2 * dy + dx holds the original group UNFOLD[k]
# (x0 = (0, 0), x1 = (1, 0), x2 = (0, 1), x3 = (1, 1) as (dy, dx)). The permutation is
# its own inverse.
UNFOLD = [0, 2, 1, 3]


def reduction_to_unfold(w: np.ndarray) -> np.ndarray:
  """(out, 4C) with input channels group-major (x0..x3) -> channel-major, unfold order."""
  out, c4 = w.shape
  return w.reshape(out, 4, c4 // 4)[:, UNFOLD].transpose(0, 2, 1).reshape(out, c4)


def reduction_from_unfold(w: np.ndarray) -> np.ndarray:
  out, c4 = w.shape
  return w.reshape(out, c4 // 4, 4).transpose(0, 2, 1)[:, UNFOLD].reshape(out, c4)


def norm_to_unfold(v: np.ndarray) -> np.ndarray:
  """(4C,) group-major -> channel-major in unfold order."""
  return v.reshape(4, -1)[UNFOLD].T.reshape(-1)


def norm_from_unfold(v: np.ndarray) -> np.ndarray:
  return v.reshape(-1, 4).T[UNFOLD].reshape(-1)


# original-name suffix -> (to the format, back to the original)
OPENMMLAB_LAYOUT: dict[str, tuple[Callable, Callable]] = {
    "downsample.reduction.weight": (reduction_to_unfold, reduction_from_unfold),
    "downsample.norm.weight": (norm_to_unfold, norm_from_unfold),
    "downsample.norm.bias": (norm_to_unfold, norm_from_unfold),
}


# ------------------------------------------------------------------------------ formats


@dataclasses.dataclass(frozen=True)
class Format:
  """How one format stores a backbone. Per family ("swin"/"deit"): renames, the original
  keys it does not carry (regexes; buffers among them are recomputed on the way back) and
  layout changes. A family missing from `renames` cannot be written in this format."""
  container: str
  prefix: str
  renames: dict[str, Renames]
  dropped: dict[str, tuple[str, ...]]
  layout: dict[str, dict[str, tuple[Callable, Callable]]]
  summary: str


_OPENMMLAB_DROPPED = (r"^head\.", r"\.attn_mask$")  # no head; masks are built in forward
FORMATS: dict[str, Format] = {
    "official": Format("model", "", {"swin": (), "deit": ()}, {}, {},
                       "the whole MoBY state (encoder, encoder_k, projector, projector_k, "
                       "predictor, queue1, queue2, queue_ptr), original names"),
    "backbone": Format("model", "", {"swin": (), "deit": ()}, {}, {},
                       "one encoder, original Swin/DeiT names with buffers"),
    "mmdet": Format("state_dict", "backbone.", {"swin": OPENMMLAB_NAMES},
                    {"swin": _OPENMMLAB_DROPPED}, {"swin": OPENMMLAB_LAYOUT},
                    "Swin encoder, OpenMMLab native names prefixed with 'backbone.'"),
    "mmseg": Format("state_dict", "", {"swin": OPENMMLAB_NAMES},
                    {"swin": _OPENMMLAB_DROPPED}, {"swin": OPENMMLAB_LAYOUT},
                    "Swin encoder, OpenMMLab native names"),
    "timm": Format("state_dict", "", {"swin": TIMM_SWIN_NAMES, "deit": ()},
                   {"swin": (r"\.relative_position_index$", r"\.attn_mask$")}, {},
                   "one encoder, timm names (Swin: patch merging at the start of the next "
                   "stage, no buffers; DeiT: the original ViT names)"),
}
HEAD_FORMATS = ("backbone", "timm")  # formats that can carry a classification head


def family(model) -> str:
  return "swin" if isinstance(model, SwinTransformer) else "deit"


def check_supported(fmt: str, model) -> None:
  """Raises FormatError when `fmt` cannot faithfully carry `model`."""
  spec, fam = FORMATS[fmt], family(model)
  if fam not in spec.renames:
    raise FormatError(
        f"format {fmt} supports Swin only: OpenMMLab has no Swin-style mapping for DeiT and "
        f"this tool does not map its VisionTransformer naming; use format backbone "
        f"(the original timm ViT names) instead")
  if fam != "swin" or fmt in ("official", "backbone"):
    return
  where = "mmdet/mmseg's" if fmt in ("mmdet", "mmseg") else "timm's"
  if model.norm_before_mlp != "ln":
    raise FormatError(f"format {fmt}: the MoBY-BN variant (model.norm_before_mlp='bn') has a "
                      f"BatchNorm before the MLP that {where} Swin does not have; use format "
                      "backbone or official")
  if model.ape:
    raise FormatError(f"format {fmt}: model.ape=True (absolute_pos_embed) is not supported: "
                      "timm's Swin has no absolute position embedding and OpenMMLab's loader "
                      "reshapes it to 4-D, which its own 3-D parameter cannot take; use "
                      "format backbone or official")
  if not model.patch_norm:
    raise FormatError(f"format {fmt}: model.patch_norm=False is not supported: {where} Swin "
                      "ties the patch-merging norm to patch_norm, the original does not")


def format_name(fmt: str, name: str, fam: str) -> str:
  """The name an original-name key has in `fmt` (whether or not the format keeps it)."""
  spec = FORMATS[fmt]
  return spec.prefix + rename(name, spec.renames.get(fam, ()))


def is_dropped(fmt: str, name: str, fam: str) -> bool:
  """Whether `fmt` leaves the original-name key `name` out of its files."""
  return any(re.search(p, name) for p in FORMATS[fmt].dropped.get(fam, ()))


def to_format(fmt: str, state_dict: Mapping[str, np.ndarray], model) -> dict[str, np.ndarray]:
  """An original-name backbone state_dict in `fmt`'s names and layouts."""
  fam = family(model)
  layout = FORMATS[fmt].layout.get(fam, {})
  out = {}
  for name, value in state_dict.items():
    if is_dropped(fmt, name, fam):
      continue
    for suffix, (forward, _) in layout.items():
      if name.endswith(suffix):
        value = forward(value)
    out[format_name(fmt, name, fam)] = value
  return out


def to_original_names(fmt: str, state_dict: Mapping[str, Any], fam: str) -> dict[str, Any]:
  """A backbone in `fmt` back in original names and layouts (without dropped buffers).

  Keys without the format's prefix are kept as they are (so they show up as unexpected).
  """
  spec = FORMATS[fmt]
  layout = spec.layout.get(fam, {})
  out = {}
  for name, value in state_dict.items():
    if spec.prefix and name.startswith(spec.prefix):
      name = name[len(spec.prefix):]
    name = rename(name, spec.renames.get(fam, ()), inverse=True)
    for suffix, (_, backward) in layout.items():
      if name.endswith(suffix):
        value = backward(np.asarray(value))
    out[name] = value
  return out


def from_format(fmt: str, state_dict: Mapping[str, Any], model) -> dict[str, Any]:
  """Inverse of `to_format`: original names and layouts, with the buffers the format
  drops recomputed from the model geometry (ready for `convert.torch_to_flax`); buffers a
  file holds although the format drops them are kept (and checked there)."""
  fam = family(model)
  out = to_original_names(fmt, state_dict, fam)
  for name, buffer in geometry_buffers(model).items():
    if name not in out and is_dropped(fmt, name, fam):
      out[name] = buffer
  return out
