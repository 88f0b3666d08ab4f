"""Checkpoint conversion between moby_jax (Flax) and the PyTorch world (SPEC §5)."""

from convert.backbone import (StateDictMismatch, expected_torch_shapes, flax_to_torch,
                              torch_to_flax)
from convert.moby import from_pytorch, to_pytorch

__all__ = ["StateDictMismatch", "expected_torch_shapes", "flax_to_torch", "from_pytorch",
           "to_pytorch", "torch_to_flax"]
