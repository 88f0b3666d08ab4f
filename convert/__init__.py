"""Checkpoint conversion between moby_jax (Flax) and the PyTorch world (SPEC §5).

  backbone.py     one encoder's Flax variables <-> the original PyTorch state_dict
  moby.py         a whole train state <-> the official MoBY state_dict; encoders of a state
  names.py        the file formats, their name tables and layout maps
  keys.py         the key list (names and shapes) of each format
  consumers.py    simulations of the downstream readers of each format
  inspection.py   format detection, architecture inference, parameter counts
  meta.py         the `meta` entry of an export
  pth.py          `.pth` file I/O (etils.epath; reading never runs the file's code)
  export.py       to_pytorch / save: train state -> file content / checked file
  load.py         from_pytorch / encoder_from_pytorch: any format -> state / encoder
  __main__.py     `python -m convert export|import|inspect`
"""

from convert.backbone import (StateDictMismatch, expected_torch_shapes, flax_to_torch,
                              torch_to_flax)
from convert.export import Saved, save, to_pytorch
from convert.load import encoder_from_pytorch, from_pytorch
from convert.names import FORMATS, FormatError
from convert.pth import PthError

__all__ = ["FORMATS", "FormatError", "PthError", "Saved", "StateDictMismatch",
           "encoder_from_pytorch", "expected_torch_shapes", "flax_to_torch", "from_pytorch",
           "save", "to_pytorch", "torch_to_flax"]
