"""Checkpoint file formats (SPEC §5): name/layout maps, expected key lists, format
detection, downstream-loader simulations and the `meta` entry.

  format    file content                              read by
  official  {"model": the whole MoBY state}           the released MoBY code; the Swin det/seg
                                                      repos (they keep `encoder.*`)
  backbone  {"model": one encoder, original names}    the original Swin/DeiT code; timm's
                                                      pretrained-file filter
  mmdet     {"state_dict": "backbone." + native}      mmdet 3.x SwinTransformer
  mmseg     {"state_dict": native}                    mmseg 1.x SwinTransformer
  timm      {"state_dict": timm names}                timm.create_model(checkpoint_path=...)

Every file also holds a top-level "meta" entry of plain Python types.

Names are mapped by prefix tables of (original template, format template) pairs, read in
both directions: `{i}` matches a stage/block number and `{i+1}` the next one. The only
layout change is OpenMMLab's patch merging, which gathers the 2x2 neighbours with
nn.Unfold (channel-major, then kernel row, then column) instead of concatenating
x0, x1, x2, x3 (SPEC §1), so its `downsample` norm and reduction are reordered.

The expected key list of each format is enumerated from the architecture, independently
of the tables, so a wrong table entry shows up as missing/unexpected keys when a file is
checked. The loader simulations reproduce how each downstream reader filters a file's
keys before `load_state_dict` (most load non-strictly, where a wrong name is silently
ignored).
"""

import dataclasses
import functools
import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from convert import moby as moby_convert
from convert.backbone import _buffers, expected_torch_shapes, flax_to_torch
from convert.pth import state_dict_arrays
from moby_jax import moby
from moby_jax.models import VARIANTS
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
        f"--format {fmt} supports Swin only: OpenMMLab has no Swin-style mapping for DeiT and "
        f"this tool does not write its VisionTransformer naming; use --format backbone "
        f"(the original timm ViT names) instead")
  if fam != "swin" or fmt in ("official", "backbone"):
    return
  where = "mmdet/mmseg's" if fmt in ("mmdet", "mmseg") else "timm's"
  if model.norm_before_mlp != "ln":
    raise FormatError(f"--format {fmt}: the MoBY-BN variant (model.norm_before_mlp='bn') has a "
                      f"BatchNorm before the MLP that {where} Swin does not have; use --format "
                      "backbone or official")
  if model.ape:
    raise FormatError(f"--format {fmt}: model.ape=True (absolute_pos_embed) is not supported: "
                      "timm's Swin has no absolute position embedding and OpenMMLab's loader "
                      "reshapes it to 4-D, which its own 3-D parameter cannot take; use "
                      "--format backbone or official")
  if not model.patch_norm:
    raise FormatError(f"--format {fmt}: model.patch_norm=False is not supported: {where} Swin "
                      "ties the patch-merging norm to patch_norm, the original does not")


def to_format(fmt: str, state_dict: Mapping[str, np.ndarray], model) -> dict[str, np.ndarray]:
  """An original-name backbone state_dict in `fmt`'s names and layouts."""
  spec, fam = FORMATS[fmt], family(model)
  dropped, layout = spec.dropped.get(fam, ()), spec.layout.get(fam, {})
  out = {}
  for name, value in state_dict.items():
    if any(re.search(p, name) for p in dropped):
      continue
    for suffix, (forward, _) in layout.items():
      if name.endswith(suffix):
        value = forward(value)
    out[spec.prefix + rename(name, spec.renames[fam])] = value
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
  drops recomputed from the model geometry (ready for `convert.torch_to_flax`)."""
  fam = family(model)
  out = to_original_names(fmt, state_dict, fam)
  dropped = FORMATS[fmt].dropped.get(fam, ())
  for name, buffer in _buffers(model).items():
    if name not in out and any(re.search(p, name) for p in dropped):
      out[name] = buffer
  return out


# ----------------------------------------------------------------- what an export holds


def encoder_of(state, config, branch: str):
  """(variables, module) of the online or target encoder of a train state."""
  if branch not in ("online", "target"):
    raise FormatError(f"--branch must be online or target, got {branch!r}")
  online, target = moby.build_branches(config)
  params, stats = ((state.params, state.batch_stats) if branch == "online"
                   else (state.target_params, state.target_batch_stats))
  variables = {"params": params["encoder"]}
  if "encoder" in stats:
    variables["batch_stats"] = stats["encoder"]
  return variables, (online if branch == "online" else target).encoder


def build(state, config, fmt: str, branch: str = "online", num_classes: int = 0):
  """(file content without meta, encoder module, the original-name arrays it came from).

  `num_classes` > 0 appends a zero-initialised classification head (backbone and timm
  formats): the Swin classification code's pretrained loader reads `head.bias`
  unconditionally, and timm's pretrained-file filter tells timm-named files apart by
  `head.fc.weight`.
  """
  if fmt not in FORMATS:
    raise FormatError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
  state = jax.device_get(state)
  variables, model = encoder_of(state, config, branch)
  check_supported(fmt, model)
  if num_classes and fmt not in HEAD_FORMATS:
    raise FormatError(f"--num-classes applies to --format {' or '.join(HEAD_FORMATS)}, "
                      f"not {fmt}")
  if fmt == "official":
    source = moby_convert.to_pytorch(state, config)["model"]
    return {"model": source}, model, source
  source = flax_to_torch(variables, model)
  if num_classes:
    if model.num_classes:
      raise FormatError(f"the encoder already has a {model.num_classes}-class head; "
                        "drop --num-classes")
    source["head.weight"] = np.zeros((num_classes, model.num_features), np.float32)
    source["head.bias"] = np.zeros((num_classes,), np.float32)
  return {FORMATS[fmt].container: to_format(fmt, source, model)}, model, source


# ----------------------------------------------------------------- expected key lists


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


# -------------------------------------------------------------------- loader simulations


@dataclasses.dataclass(frozen=True)
class Loader:
  """A downstream reader: what it hands to load_state_dict, and what its model takes."""
  who: str
  select: Callable[[Mapping[str, Any]], Mapping[str, Any]]
  required: dict[str, tuple]
  strict: bool = False


def _strip_module_by_first_key(sd):
  """OpenMMLab strips `module.` when the first key has it."""
  first = next(iter(sd), "")
  return {k[7:]: v for k, v in sd.items()} if first.startswith("module.") else dict(sd)


def _openmmlab_entry(ckpt):
  return ckpt.get("state_dict", ckpt.get("model", ckpt))


def select_swin_det_seg(ckpt):
  """Swin det/seg repos (SPEC §5): `state_dict` or `model`, strip `module.`, and when the
  sorted first key starts with `encoder` keep only `encoder.*`, prefix removed."""
  sd = {(k[7:] if k.startswith("module.") else k): v for k, v in _openmmlab_entry(ckpt).items()}
  if sorted(sd) and sorted(sd)[0].startswith("encoder"):
    sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
  return sd


def select_moby_linear(ckpt):
  """The released MoBY linear evaluation: keys containing `encoder.`, that part removed."""
  return {k.replace("encoder.", ""): v for k, v in ckpt["model"].items() if "encoder." in k}


def select_model_entry(ckpt):
  return ckpt["model"]


def select_mmdet(ckpt):
  """mmdet 3.x Swin init_weights (convert_weights=False): keep `backbone.*`, prefix removed."""
  sd = {k[9:]: v for k, v in _openmmlab_entry(ckpt).items() if k.startswith("backbone.")}
  return _strip_module_by_first_key(sd)


def select_mmseg(ckpt):
  """mmseg 1.x Swin init_weights: strip an optional `backbone.`."""
  sd = {(k[9:] if k.startswith("backbone.") else k): v for k, v in _openmmlab_entry(ckpt).items()}
  return _strip_module_by_first_key(sd)


def select_timm_checkpoint(ckpt):
  """timm's load_state_dict: the first of state_dict_ema, model_ema, state_dict, model
  (or the file itself), `module.` stripped from every key."""
  for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
    if ckpt.get(key) is not None:
      ckpt = ckpt[key]
      break
  return {(k[7:] if k.startswith("module.") else k): v for k, v in ckpt.items()}


def timm_swin_filter(sd):
  """timm's Swin checkpoint_filter_fn (key handling): drop the buffers and, unless the
  file has `head.fc.weight`, move `layers.{i}.downsample` to `layers.{i+1}` and rename
  `head.` to `head.fc.`."""
  old_names = "head.fc.weight" not in sd
  out = {}
  for k, v in sd.items():
    if "relative_position_index" in k or "attn_mask" in k:
      continue
    if old_names:
      k = re.sub(r"layers.(\d+).downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample",
                 k)
      k = k.replace("head.", "head.fc.")
    out[k] = v
  return out


def select_timm_pretrained_swin(ckpt):
  return timm_swin_filter(select_timm_checkpoint(ckpt))


def select_swin_classification_pretrained(ckpt):
  """The Swin classification repo's MODEL.PRETRAINED loader: `model`, buffers deleted,
  `head.bias` read unconditionally (a file without it raises KeyError there)."""
  sd = ckpt["model"]
  if "head.bias" not in sd:
    return {}
  return {k: v for k, v in sd.items()
          if "relative_position_index" not in k and "attn_mask" not in k}


def _without(keys: Mapping[str, tuple], pattern: str) -> dict[str, tuple]:
  return {k: v for k, v in keys.items() if not re.search(pattern, k)}


def loaders(fmt: str, model, expected: Mapping[str, tuple] | None = None,
            num_classes: int = 0) -> list[Loader]:
  """The downstream readers of a `fmt` file this tool vouches for. `expected`: the
  format's key list (`expected_keys`), needed for official."""
  fam, n = family(model), num_classes or model.num_classes
  original = original_keys(model, num_classes)
  if fmt == "official":
    out = [Loader("released MoBY code (resume): load_state_dict(checkpoint['model'])",
                  select_model_entry, dict(expected), strict=True),
           Loader("released MoBY linear evaluation: keys with 'encoder.', that part removed",
                  select_moby_linear, original, strict=True)]
    if fam == "swin":  # their backbone has per-output norms and builds masks in forward
      out.append(Loader("Swin det/seg repos (mmdet 2.x / mmseg 0.x): encoder.* kept, prefix "
                        "removed", select_swin_det_seg,
                        _without(original, r"attn_mask$|^norm\.|^head\.")))
    return out
  if fmt == "backbone":
    out = [Loader("original Swin/DeiT model: load_state_dict(checkpoint['model'])",
                  select_model_entry, original, strict=True)]
    if fam == "swin":
      out.append(Loader("timm pretrained file (pretrained_cfg_overlay=dict(file=...)): timm's "
                        "Swin checkpoint filter", select_timm_pretrained_swin,
                        timm_swin_keys(model, num_classes)))
      if n:
        out.append(Loader("Swin classification repo MODEL.PRETRAINED",
                          select_swin_classification_pretrained,
                          _without(original, r"relative_position_index$|attn_mask$")))
    else:
      out.append(Loader("timm pretrained file (pretrained_cfg_overlay=dict(file=...))",
                        select_timm_checkpoint, original))
    return out
  if fmt in ("mmdet", "mmseg"):
    native = openmmlab_swin_keys(model, final_norm=False)
    if fmt == "mmdet":
      return [Loader("mmdet 3.x SwinTransformer, init_cfg=dict(type='Pretrained', "
                     "checkpoint=...), convert_weights=False", select_mmdet, native)]
    return [Loader("mmseg 1.x SwinTransformer, init_cfg=dict(type='Pretrained', checkpoint=...)",
                   select_mmseg, native)]
  timm_keys = expected_keys("timm", model, num_classes=num_classes)
  out = [Loader("timm.create_model(..., checkpoint_path=...) (load_checkpoint, strict)",
                select_timm_checkpoint, timm_keys, strict=True)]
  if n:  # a headless timm-named Swin file would be shifted again by the filter
    out.append(Loader("timm pretrained file (pretrained_cfg_overlay=dict(file=...))",
                      select_timm_pretrained_swin if fam == "swin" else select_timm_checkpoint,
                      timm_keys))
  return out


def shape_of(value) -> tuple[int, ...]:
  return tuple(int(d) for d in value.shape)


def run_loader(loader: Loader, ckpt: Mapping[str, Any]) -> tuple[int, list[str]]:
  """(number of required tensors the reader would load, problems)."""
  given = loader.select(ckpt)
  taken = [k for k, shape in loader.required.items()
           if k in given and shape_of(given[k]) == tuple(shape)]
  problems = []
  if len(taken) < len(loader.required):
    missed = [k for k in loader.required if k not in set(taken)]
    problems.append(f"{loader.who}: would load {len(taken)} of {len(loader.required)} tensors "
                    f"(not loaded: {', '.join(missed[:4])}"
                    + (f" and {len(missed) - 4} more" if len(missed) > 4 else "") + ")")
  if loader.strict:
    extra = sorted(set(given) - set(loader.required))
    if extra:
      problems.append(f"{loader.who}: strict load would fail on unexpected keys "
                      f"{', '.join(extra[:4])}")
  return len(taken), problems


# ------------------------------------------------------------------------ check a file


def compare_keys(given: Mapping[str, Any], expected: Mapping[str, tuple]) -> list[str]:
  """Missing, unexpected and mis-shaped keys of `given` against `expected`."""
  problems = [f"missing key: {k} {tuple(s)}" for k, s in expected.items() if k not in given]
  problems += [f"unexpected key: {k} {shape_of(given[k])}" for k in given if k not in expected]
  problems += [f"shape mismatch: {k} is {shape_of(given[k])}, expected {tuple(expected[k])}"
               for k in given if k in expected and shape_of(given[k]) != tuple(expected[k])]
  return problems


def verify(ckpt: Mapping[str, Any], fmt: str, model, source: Mapping[str, np.ndarray],
           meta: Mapping[str, Any], config=None, num_classes: int = 0) -> list[str]:
  """Checks a file's content (as torch.load returns it) against what was exported.

  Exact top-level entries, meta, key set and shapes, dtypes, finite values, the inverse
  map giving back `source` bit for bit, and every downstream loader taking all the
  tensors its model needs. Returns report lines; raises FormatError listing every problem.
  """
  spec = FORMATS[fmt]
  problems = []
  if set(ckpt) != {spec.container, "meta"}:
    problems.append(f"top-level entries are {sorted(ckpt)}, expected "
                    f"{sorted([spec.container, 'meta'])}")
  if ckpt.get("meta") != meta:
    problems.append("the meta entry read back differs from the one written")
  sd = state_dict_arrays(ckpt.get(spec.container, {}), f"the {spec.container!r} entry")
  expected = expected_keys(fmt, model, config, num_classes)
  problems += compare_keys(sd, expected)
  for name, value in sd.items():
    if value.dtype.kind == "f" and value.dtype != np.float32:
      problems.append(f"dtype: {name} is {value.dtype}, expected float32")
    if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
      problems.append(f"non-finite values in {name}")
  back = sd if fmt == "official" else from_format(fmt, sd, model)
  for name, value in source.items():
    if fmt != "official" and any(re.search(p, name)
                                 for p in spec.dropped.get(family(model), ())):
      continue
    if name not in back:
      continue  # already reported as a missing key
    got = np.asarray(back[name])
    if got.dtype != value.dtype or got.shape != value.shape or not np.array_equal(got, value):
      problems.append(f"round trip: {name} read back through the inverse map differs from "
                      "the exported array")
  report = []
  for loader in loaders(fmt, model, expected, num_classes):
    taken, loader_problems = run_loader(loader, ckpt)
    problems += loader_problems
    report.append(f"{loader.who}: loads {taken}/{len(loader.required)} tensors")
  if problems:
    raise FormatError(f"self-check of the {fmt} file failed ({len(problems)} problems):\n  "
                      + "\n  ".join(problems))
  return report


# -------------------------------------------------------------------------------- meta


def _plain(value):
  """JSON types only (tuples -> lists, other objects -> str)."""
  return json.loads(json.dumps(value, default=str))


def architecture(model, variant: str | None) -> dict[str, Any]:
  """The encoder's resolved fields (what `build_encoder` needs), plain types."""
  fields = {f: getattr(model, f) for f in model.__dataclass_fields__
            if f not in ("parent", "name", "dtype")}
  return _plain({"variant": variant, "family": family(model), **fields,
                 "dtype": jnp.dtype(model.dtype).name})


def make_meta(fmt: str, model, config, step: int, source: str, branch: str | None,
              num_classes: int, version: str) -> dict[str, Any]:
  """The `meta` entry of an export (plain Python types)."""
  return _plain({
      "format": fmt, "content": FORMATS[fmt].summary,
      "architecture": architecture(model, config.model.get("name")),
      "config": json.loads(config.to_json_best_effort()),
      "step": int(step), "source": source,
      "branch": branch if fmt != "official" else "online and target",
      "head": (f"{num_classes} classes, zero-initialised (--num-classes)" if num_classes
               else None),
      "moby_jax_version": version, "written_by": "python -m convert export",
  })


# ------------------------------------------------------------ detection and inference


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

  if has(r"^encoder\.") and has(r"^encoder_k\.") and "queue1" in keys:
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
