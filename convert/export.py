"""Train states -> `.pth` content in every format of `names.FORMATS` (SPEC §5), and
`.pth` files written atomically and checked after writing (`save`).

The CLI's `export` command and the trainer call these functions; what they write is exactly
what `to_pytorch` returns.
"""

import dataclasses
import uuid
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from etils import epath

from convert import moby as moby_convert
from convert import pth
from convert.backbone import flax_to_torch
from convert.consumers import loaders, run_loader
from convert.keys import compare_keys, expected_keys
from convert.meta import make_meta
from convert.names import (FORMATS, HEAD_FORMATS, FormatError, check_supported, family,
                           from_format, is_dropped, to_format)


def _host_state(state):
  """The state's arrays on the host, without the optimizer state (no format holds it)."""
  return jax.device_get(state.replace(opt_state=None))


def build(state, config, fmt: str = "official", branch: str = "online", num_classes: int = 0,
          meta: bool = True, source: str = ""):
  """(file content, encoder module, the original-name arrays it came from) for `state`.

  `num_classes` > 0 appends a zero-initialised classification head (backbone and timm
  formats): the Swin classification code's pretrained loader reads `head.bias`
  unconditionally, and timm's pretrained-file filter tells timm-named files apart by
  `head.fc.weight`. `meta`: add the `meta` entry, with `source` in it.
  """
  if fmt not in FORMATS:
    raise FormatError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
  if fmt == "official" and branch != "online":
    raise FormatError("branch applies to the backbone formats; official holds both encoders")
  state = _host_state(state)
  variables, model = moby_convert.encoder_variables(state, config, branch)
  check_supported(fmt, model)
  if num_classes and fmt not in HEAD_FORMATS:
    raise FormatError(f"num_classes applies to format {' or '.join(HEAD_FORMATS)}, not {fmt}")
  if fmt == "official":
    arrays = moby_convert.to_state_dict(state, config)
    content = {"model": arrays}
  else:
    arrays = flax_to_torch(variables, model)
    if num_classes:
      if model.num_classes:
        raise FormatError(f"the encoder already has a {model.num_classes}-class head; "
                          "drop num_classes")
      arrays["head.weight"] = np.zeros((num_classes, model.num_features), np.float32)
      arrays["head.bias"] = np.zeros((num_classes,), np.float32)
    content = {FORMATS[fmt].container: to_format(fmt, arrays, model)}
  if meta:
    content["meta"] = make_meta(fmt, model, config, int(state.step), source, branch,
                                num_classes)
  return content, model, arrays


def to_pytorch(state, config, fmt: str = "official", branch: str = "online",
               num_classes: int = 0, meta: bool = True, source: str = "") -> dict[str, Any]:
  """The content of a `fmt` file for a train state (on devices or on the host).

  `{"model" or "state_dict": {name: numpy array in PyTorch layout}, "meta": {...}}`:
  official holds the whole MoBY state (both branches), the other formats one encoder
  (`branch` "online" or "target"); `num_classes` adds a zero-initialised head (backbone
  and timm). `meta=False` leaves the `meta` entry out; `source` (free text, e.g. the
  workdir) goes into it. Raises FormatError for a format that cannot carry the encoder.
  """
  return build(state, config, fmt, branch, num_classes, meta, source)[0]


def verify(ckpt: Mapping[str, Any], fmt: str, model, arrays: Mapping[str, np.ndarray],
           meta: Mapping[str, Any], config=None, num_classes: int = 0) -> list[str]:
  """Checks a file's content (as torch.load returns it) against what was exported.

  Exact top-level entries, meta, key set and shapes, dtypes, finite values, the inverse
  map giving back `arrays` (original names) bit for bit, and every downstream loader taking
  all the tensors its model needs. Returns report lines; raises FormatError listing every
  problem.
  """
  spec = FORMATS[fmt]
  problems = []
  if set(ckpt) != {spec.container, "meta"}:
    problems.append(f"top-level entries are {sorted(ckpt)}, expected "
                    f"{sorted([spec.container, 'meta'])}")
  if ckpt.get("meta") != meta:
    problems.append("the meta entry read back differs from the one written")
  sd = pth.state_dict_arrays(ckpt.get(spec.container, {}), f"the {spec.container!r} entry")
  expected = expected_keys(fmt, model, config, num_classes)
  problems += compare_keys(sd, expected)
  for name, value in sd.items():
    if value.dtype.kind == "f" and value.dtype != np.float32:
      problems.append(f"dtype: {name} is {value.dtype}, expected float32")
    if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
      problems.append(f"non-finite values in {name}")
  back = sd if fmt == "official" else from_format(fmt, sd, model)
  for name, value in arrays.items():
    if is_dropped(fmt, name, family(model)) or name not in back:
      continue  # not in this format, or already reported as a missing key
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


@dataclasses.dataclass(frozen=True)
class Saved:
  """What `save` wrote: the file, its `meta` entry, how many tensors its state_dict holds,
  and one line per simulated downstream reader (how many tensors it loads)."""
  path: epath.Path
  meta: dict[str, Any]
  tensors: int
  loaders: list[str]


def save(state, config, path, fmt: str = "official", branch: str = "online",
         num_classes: int = 0, source: str = "", force: bool = False) -> Saved:
  """Writes `to_pytorch(state, config, fmt, ...)` as a `.pth` file and checks it.

  `path` is anything `etils.epath` opens (a local path or a bucket). The file is written
  beside `path` under a temporary name, read back with `torch.load(weights_only=True)`
  and checked (`verify`: exact keys and shapes of the format, float32 and finite values,
  the inverse map bit-exact, the downstream-reader simulations) before it takes `path`'s
  name, so a failed check raises and leaves no file. An existing `path` is replaced only
  with `force`.
  """
  path = epath.Path(path)
  if path.exists() and not force:
    raise FileExistsError(f"{path} exists; pass --force (force=True) to overwrite it")
  if not path.parent.is_dir():
    raise FileNotFoundError(f"{path.parent} is not a directory")
  content, model, arrays = build(state, config, fmt, branch, num_classes, True, source)
  tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
  try:
    pth.write_pth(tmp, content)
    report = verify(pth.read_pth(tmp, trusted_only=True), fmt, model, arrays,
                    content["meta"], config, num_classes)
    if path.exists() and not force:
      raise FileExistsError(f"{path} appeared while exporting; pass --force (force=True) to "
                            "overwrite it")
    tmp.replace(path)
  finally:
    tmp.unlink(missing_ok=True)
  entry = FORMATS[fmt].container
  return Saved(path, content["meta"], len(content[entry]), report)
