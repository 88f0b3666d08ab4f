"""Safe reading and writing of PyTorch `.pth` files (torch.save'd dicts of tensors).

All file access goes through `etils.epath`, so a path may be local or a bucket
(`gs://...`); torch serialises into and from memory.

Reading never runs code from the file. `torch.load(weights_only=True)` comes first; the
released MoBY checkpoints also pickle a yacs config (and optimizer/amp state), which
weights_only refuses, so the fallback unpickler resolves only the globals torch itself
trusts for weights_only loading and turns every other class or function the file names
into an inert `ForeignObject` stand-in.
"""

import _compat_pickle
import io
import pickle
import types
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from etils import epath
from torch import _weights_only_unpickler


class PthError(ValueError):
  """A file that cannot be read (or written) as a PyTorch checkpoint; says why."""


class ForeignObject(dict):
  """An inert stand-in for a pickled class or function this reader does not trust.

  It records what the pickle hands it (constructor arguments, state, dict/list items)
  and does nothing else; `foreign_name` is the global the file named.
  """
  foreign_name = "?"
  args: tuple = ()
  state: Any = None

  def __init__(self, *args, **kwargs):  # called by REDUCE; NEWOBJ only calls __new__
    super().__init__()
    self.args = args

  def __setstate__(self, state):
    self.state = state

  def append(self, item):
    self.__dict__.setdefault("items", []).append(item)

  def extend(self, items):
    self.__dict__.setdefault("items", []).extend(items)

  def __repr__(self):
    return f"<foreign {self.foreign_name}>"


_FOREIGN: dict[str, type] = {}


def _foreign(full_name: str) -> type:
  if full_name not in _FOREIGN:
    _FOREIGN[full_name] = type(full_name.rpartition(".")[2], (ForeignObject,),
                               {"foreign_name": full_name, "__module__": __name__})
  return _FOREIGN[full_name]


class _SafeUnpickler(pickle.Unpickler):
  """Resolves only torch's weights_only allow-list; everything else becomes inert."""

  def find_class(self, module, name):
    # Protocol 2 (torch's default) writes Python 2 names such as __builtin__.set.
    if (module, name) in _compat_pickle.NAME_MAPPING:
      module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    allowed = _weights_only_unpickler._get_allowed_globals()
    full_name = f"{module}.{name}"
    return allowed[full_name] if full_name in allowed else _foreign(full_name)


# torch.load takes a `pickle_module` with `Unpickler` and `load` (the legacy format uses both).
_SAFE_PICKLE = types.ModuleType("convert_safe_pickle")
_SAFE_PICKLE.Unpickler = _SafeUnpickler
_SAFE_PICKLE.load = lambda f, **kwargs: _SafeUnpickler(f, **kwargs).load()


def read_pth(path, trusted_only: bool = False) -> Any:
  """The object a `.pth` file holds (tensors on the CPU), read without running its code.

  `trusted_only`: only `torch.load(weights_only=True)`, no stand-ins for foreign objects
  (for files this tool wrote). Raises PthError naming the problem for a missing,
  truncated or non-PyTorch file.
  """
  path = epath.Path(path)
  if not path.is_file():
    raise PthError(f"{path}: no such file")
  data = path.read_bytes()
  try:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as err:
    if trusted_only:
      raise PthError(f"{path} holds objects torch.load(weights_only=True) refuses: "
                     f"{err}") from None
    # foreign pickled objects (e.g. a yacs config): read again with stand-ins
  except Exception as err:
    raise PthError(f"{path} is not a readable PyTorch file (truncated or not written by "
                   f"torch.save?): {type(err).__name__}: {err}") from None
  try:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False,
                      pickle_module=_SAFE_PICKLE)
  except Exception as err:
    raise PthError(f"{path} is not a readable PyTorch file (truncated or not written by "
                   f"torch.save?): {type(err).__name__}: {err}") from None


def state_dict_arrays(state_dict: Mapping[str, Any], what: str) -> dict[str, np.ndarray]:
  """{name: numpy array} from a state_dict of tensors; PthError if an entry is not one."""
  if not isinstance(state_dict, Mapping):
    raise PthError(f"{what} is a {type(state_dict).__name__}, not a state_dict")
  out, bad = {}, []
  for name, value in state_dict.items():
    if isinstance(value, torch.Tensor):
      value = value.detach().cpu()
      # numpy has no bfloat16; float32 holds it exactly.
      out[str(name)] = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    elif isinstance(value, np.ndarray):
      out[str(name)] = value
    else:
      bad.append(f"{name} ({type(value).__name__})")
  if bad:
    raise PthError(f"{what} holds entries that are not tensors: {', '.join(bad[:5])}"
                   + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
  return out


def _tensors(value):
  """Numpy arrays -> torch tensors inside nested dicts; everything else as it is."""
  if isinstance(value, np.ndarray):
    return torch.from_numpy(np.require(value, requirements="C"))  # 0-d stays 0-d
  if isinstance(value, Mapping):
    return {k: _tensors(v) for k, v in value.items()}
  return value


def write_pth(path, content: Mapping[str, Any]) -> None:
  """torch.save of `content` with its numpy arrays as tensors (other values unchanged)."""
  buffer = io.BytesIO()
  torch.save(_tensors(content), buffer)
  epath.Path(path).write_bytes(buffer.getvalue())
