"""Backbone weights: Flax variables <-> original PyTorch state_dict (SPEC §5).

Table-driven and numpy-only on the array side. A Flax path maps to a PyTorch name by
turning each `name_N` module into `name.N` (`layers_0/blocks_1/attn/qkv` ->
`layers.0.blocks.1.attn.qkv`) and renaming the leaf with `LEAF_TABLE`, which also says
how the layout changes (Linear (in, out) <-> (out, in); Conv HWIO <-> OIHW). Swin's
non-learned buffers (`relative_position_index`, and `attn_mask` on shifted blocks) are
computed from the model geometry on export and validated, not trusted, on import.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from moby_jax.models import abstract_variables, layers
from moby_jax.models.swin import SwinTransformer, relative_position_index, shifted_window_mask

# (collection, flax leaf name, ndim or None for any) -> (torch leaf name, axes to torch)
LEAF_TABLE: dict[tuple[str, str, int | None], tuple[str, tuple[int, ...] | None]] = {
    ("params", "kernel", 2): ("weight", (1, 0)),           # Linear (in, out) -> (out, in)
    ("params", "kernel", 4): ("weight", (3, 2, 0, 1)),     # Conv HWIO -> OIHW
    ("params", "scale", None): ("weight", None),           # LayerNorm / BatchNorm
    ("params", "bias", None): ("bias", None),
    ("batch_stats", "mean", None): ("running_mean", None),
    ("batch_stats", "var", None): ("running_var", None),
    ("batch_stats", "num_batches_tracked", None): ("num_batches_tracked", None),
}
# Integer buffers are int64 in PyTorch (int32 in JAX without x64).
_INT_LEAVES = {"num_batches_tracked"}


class StateDictMismatch(ValueError):
  """A state_dict does not fit the model; the message lists every offending key."""


def _leaf_rule(collection: str, leaf: str, ndim: int):
  for key in ((collection, leaf, ndim), (collection, leaf, None)):
    if key in LEAF_TABLE:
      return LEAF_TABLE[key]
  if collection == "params":  # learned tensors that keep their name and layout
    return leaf, None
  raise KeyError(f"no conversion rule for {collection}/{leaf} (ndim {ndim})")


def _torch_name(collection: str, path: tuple[str, ...], ndim: int):
  name, axes = _leaf_rule(collection, path[-1], ndim)
  prefix = layers.torch_name(path[:-1])
  return (f"{prefix}.{name}" if prefix else name), axes


def geometry_buffers(model) -> dict[str, np.ndarray]:
  """The non-learned PyTorch buffers of `model`, as the original registers them."""
  out = {}
  if isinstance(model, SwinTransformer):
    for i, ((h, w), geometry) in enumerate(zip(model.stage_resolutions(),
                                               model.block_geometry())):
      for j, (ws, shift) in enumerate(geometry):
        out[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = relative_position_index(ws)
        if shift:
          out[f"layers.{i}.blocks.{j}.attn_mask"] = shifted_window_mask(h, w, ws, shift)
  return out


def to_numpy(value: Any) -> np.ndarray:
  """A numpy array from a numpy/JAX array or a torch tensor (without importing torch)."""
  if hasattr(value, "detach"):
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def flax_to_torch(variables: Mapping[str, Any], model, prefix: str = "") -> dict[str, np.ndarray]:
  """PyTorch state_dict entries (numpy, PyTorch layouts) for a backbone's variables.

  `variables` holds "params" (and "batch_stats" for the "bn" variant); `model` is the
  module from `build_encoder`. Buffers are included. Keys are prefixed with `prefix`
  (e.g. "encoder.").
  """
  out = {}
  for (collection, *path), value in traverse_util.flatten_dict(dict(variables)).items():
    value = to_numpy(value)
    name, axes = _torch_name(collection, tuple(path), value.ndim)
    if axes is not None:
      value = value.transpose(axes)
    dtype = np.int64 if path[-1] in _INT_LEAVES else value.dtype
    out[prefix + name] = value.astype(dtype, order="C")  # a C-ordered copy, 0-d kept 0-d
  out.update({prefix + k: v for k, v in geometry_buffers(model).items()})
  return out


def expected_torch_shapes(model, prefix: str = "", abstract=None) -> dict[str, tuple[int, ...]]:
  """Every key (parameters and buffers) of the original state_dict, with its shape.

  `abstract`: the model's variables (or their shapes) when `model` is not a backbone.
  """
  shapes = {}
  abstract = abstract_variables(model) if abstract is None else abstract
  flat = traverse_util.flatten_dict(dict(abstract))
  for (collection, *path), leaf in flat.items():
    name, axes = _torch_name(collection, tuple(path), len(leaf.shape))
    shape = tuple(leaf.shape)
    shapes[prefix + name] = tuple(shape[a] for a in axes) if axes else shape
  shapes.update({prefix + k: v.shape for k, v in geometry_buffers(model).items()})
  return shapes


def torch_to_flax(state_dict: Mapping[str, Any], model, prefix: str = "",
                  abstract=None) -> dict:
  """Flax variables for `model` from an original state_dict (tensors or arrays).

  Only keys starting with `prefix` are considered (and the prefix removed). Raises
  `StateDictMismatch` listing every missing, unexpected and mis-shaped key, and every
  buffer whose value differs from the one the model geometry implies. `abstract`: the
  model's variables (or their shapes) when `model` is not a backbone.
  """
  given = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  abstract = abstract_variables(model) if abstract is None else abstract
  abstract = traverse_util.flatten_dict(dict(abstract))
  buffers = geometry_buffers(model)
  expected = {}
  for flax_path, leaf in abstract.items():
    name, axes = _torch_name(flax_path[0], tuple(flax_path[1:]), len(leaf.shape))
    expected[name] = (flax_path, leaf, axes)

  problems = []
  for name in sorted(set(expected) | set(buffers)):
    if name not in given:
      problems.append(f"missing key: {prefix}{name}")
  for name in sorted(set(given) - set(expected) - set(buffers)):
    problems.append(f"unexpected key: {prefix}{name} {tuple(to_numpy(given[name]).shape)}")

  flat = {}
  for name, (flax_path, leaf, axes) in expected.items():
    if name not in given:
      continue
    value = to_numpy(given[name])
    want = tuple(leaf.shape[a] for a in axes) if axes else tuple(leaf.shape)
    if value.shape != want:
      problems.append(f"shape mismatch: {prefix}{name} is {value.shape}, model needs {want}")
      continue
    if axes is not None:
      value = value.transpose(np.argsort(axes))
    flat[flax_path] = value.astype(leaf.dtype, order="C")
  for name, buffer in buffers.items():
    if name in given:
      value = to_numpy(given[name])
      if value.shape != buffer.shape:
        problems.append(f"shape mismatch: {prefix}{name} is {value.shape}, model needs "
                        f"{buffer.shape}")
      elif not np.array_equal(value, buffer):
        problems.append(f"wrong buffer: {prefix}{name} differs from the value the model "
                        f"geometry implies (window/shift/image size mismatch?)")
  if problems:
    raise StateDictMismatch(
        f"state_dict does not fit {type(model).__name__} ({len(problems)} problems):\n  "
        + "\n  ".join(problems))
  return traverse_util.unflatten_dict(flat)
