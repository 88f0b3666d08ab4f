"""Simulations of the downstream readers of each format (SPEC §5): how each one filters a
file's keys before `load_state_dict`, and which tensors its model needs. Most load
non-strictly, where a wrong name is silently ignored, so an export is only vouched for when
every reader would take every tensor it needs (`run_loader`).
"""

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

from convert.keys import (expected_keys, openmmlab_swin_keys, original_keys, shape_of,
                          timm_swin_keys)
from convert.names import family


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

