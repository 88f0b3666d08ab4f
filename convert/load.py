"""`.pth` content in any format -> Flax: a whole train state (`from_pytorch`) or one
encoder's variables (`encoder_from_pytorch`), validated key by key against the model.

What each format cannot hold comes from the model: timm files drop Swin's
`relative_position_index`/`attn_mask` buffers and mmdet/mmseg files drop `attn_mask`, so
they are recomputed from the model geometry (and checked where a file does hold them);
mmdet/mmseg files hold no classification head; the heads, queues and optimizer state of a
MoBY run exist only in official files.
"""

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import torch
from flax import linen as nn

from convert import moby as moby_convert
from convert import pth
from convert.backbone import StateDictMismatch, geometry_buffers, torch_to_flax
from convert.inspection import container_of, detect
from convert.keys import compare_keys, expected_keys, shape_of
from convert.names import (FORMATS, HEAD_FORMATS, FormatError, check_supported, family,
                           format_name, from_format, is_dropped)
from moby_jax import parallel
from moby_jax.models import build_encoder
from moby_jax.state import TrainState
from moby_jax.run import Pretraining

def state_dict_of(content: Any, what: str = "checkpoint") -> tuple[str | None, dict]:
  """(entry name, {name: numpy array}) of a loaded file: its "state_dict" or "model" entry,
  or the content itself when it is a bare state_dict (entry None). PthError otherwise."""
  if not isinstance(content, Mapping):
    raise pth.PthError(f"{what} holds a {type(content).__name__}, not a checkpoint dict")
  entry, sd = container_of(content)
  if entry is None and not any(isinstance(v, (torch.Tensor, np.ndarray))
                               for v in content.values()):
    raise pth.PthError(f"{what} is not a checkpoint: no 'model' or 'state_dict' entry "
                       f"(top-level entries: {', '.join(map(str, list(content)[:6]))})")
  return entry, pth.state_dict_arrays(sd, f"{what} ({entry or 'top level'})")


def _read(checkpoint) -> tuple[dict, str]:
  """(state_dict, a name for messages) of a path or of an already loaded checkpoint."""
  if isinstance(checkpoint, Mapping):
    return state_dict_of(checkpoint)[1], "checkpoint"
  return state_dict_of(pth.read_pth(checkpoint), str(checkpoint))[1], str(checkpoint)


def _format(sd: Mapping[str, Any], fmt: str) -> str:
  if fmt == "auto":
    return detect(sd)
  if fmt not in FORMATS:
    raise FormatError(f"unknown format {fmt!r}; known: auto, {', '.join(FORMATS)}")
  return fmt


def _key_problems(sd: Mapping[str, Any], fmt: str, model, prefix: str) -> list[str]:
  """Missing, unexpected and mis-shaped keys of one encoder in a `fmt` file, in the file's
  names. Buffers the format drops are optional (checked when present), and so is a
  classification head when the model has none (a supervised checkpoint's head)."""
  fam = family(model)
  if fmt == "official":
    expected = {prefix + k: v for k, v in expected_keys("backbone", model).items()}
    sd = {k: v for k, v in sd.items() if k.startswith(prefix)}
  else:
    expected = expected_keys(fmt, model)
  optional = {format_name(fmt, name, fam): value.shape
              for name, value in geometry_buffers(model).items() if is_dropped(fmt, name, fam)}
  head = format_name(fmt, "head.", fam)
  ignored = [k for k in sd if not model.num_classes and k.startswith(head)]
  problems = compare_keys({k: v for k, v in sd.items() if k not in optional
                           and k not in ignored}, expected)
  problems += [f"shape mismatch: {k} is {shape_of(sd[k])}, expected {tuple(shape)}"
               for k, shape in optional.items() if k in sd and shape_of(sd[k]) != shape]
  return problems


def _encoder(sd: Mapping[str, Any], fmt: str, model, branch: str, what: str) -> dict:
  """The variables of one encoder held by a state_dict in format `fmt`."""
  if branch not in moby_convert.BRANCHES:
    raise ValueError(f"branch must be online or target, got {branch!r}")
  if fmt != "official" and branch != "online":
    raise FormatError(f"{what} is a {fmt} file: it holds one encoder; branch='target' "
                      "applies to official MoBY files")
  check_supported(fmt, model)
  if model.num_classes and fmt not in HEAD_FORMATS:
    raise FormatError(f"a {fmt} file holds no classification head; build the encoder with "
                      f"num_classes=0 (it has {model.num_classes})")
  prefix = moby_convert.BRANCHES[branch][0] if fmt == "official" else ""
  problems = _key_problems(sd, fmt, model, prefix)
  if problems:
    raise StateDictMismatch(
        f"{what} ({fmt} format) does not fit {type(model).__name__} ({len(problems)} "
        "problems):\n  " + "\n  ".join(problems))
  if fmt == "official":
    sd, fmt = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, "backbone"
  original = from_format(fmt, sd, model)
  if not model.num_classes:
    original = {k: v for k, v in original.items() if not k.startswith("head.")}
  return torch_to_flax(original, model)


def encoder_from_pytorch(checkpoint, model, branch: str = "online", fmt: str = "auto") -> dict:
  """One encoder's variables ({"params"(, "batch_stats")}, numpy) from a PyTorch checkpoint.

  `checkpoint`: a `.pth` path (local or bucket; read without running code), a loaded file
  (`{"model"|"state_dict": ...}`) or a bare state_dict. `model`: the encoder module or its
  config (`config.model`). `fmt`: "auto" (detected from the key names) or one of official,
  backbone, mmdet, mmseg, timm. From an official MoBY file, `branch` picks the online
  (`encoder.`) or target (`encoder_k.`) encoder; the other formats hold one encoder.
  Buffers a format drops are recomputed from the model geometry; a classification head in
  the file is ignored when the model has none. Raises StateDictMismatch listing every
  missing, unexpected and mis-shaped key (in the file's names) and every buffer that does
  not match the model geometry.
  """
  if not isinstance(model, nn.Module):
    model = build_encoder(model)
  sd, what = _read(checkpoint)
  return _encoder(sd, _format(sd, fmt), model, branch, what)


def from_pytorch(checkpoint, config, fmt: str = "auto", step: int = 0,
                 mesh=None) -> TrainState:
  """A train state for `config` from a PyTorch checkpoint (path, loaded file or state_dict).

  An official MoBY file gives the whole state: both encoders, projectors, predictor, BN
  statistics, queues and pointer (`convert.moby.to_state`). A backbone file in any other
  format (backbone, timm, mmdet, mmseg; `fmt="auto"` detects it) gives the online and the
  target encoder of a fresh state, whose heads and queues come from config.train.seed.
  The optimizer state is fresh either way, `step` is the number of steps already done
  (drives the LR and momentum schedules) and the state is placed on `mesh` (default: all
  devices) with the shardings of `moby_jax.run.Pretraining`. Raises StateDictMismatch listing
  every key that does not fit the config.
  """
  sd, what = _read(checkpoint)
  fmt = _format(sd, fmt)
  if fmt == "official":
    return moby_convert.to_state(sd, config, step, mesh)
  variables = _encoder(sd, fmt, build_encoder(config.model), "online", what)
  mesh = parallel.mesh_for(config) if mesh is None else mesh
  run = Pretraining(config, mesh)
  state = run.init_state(jax.random.key(config.train.seed))
  state = moby_convert.with_encoder(state, variables).replace(step=np.asarray(step, np.int32))
  return jax.device_put(state, run.state_shardings)
