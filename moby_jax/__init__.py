"""moby_jax: MoBY self-supervised pre-training of Swin/DeiT in JAX/Flax (SPEC.md)."""

__version__ = "0.1.0"

from moby_jax.state import TrainState
from moby_jax.train_step import create_train_state, encode, make_train_step

__all__ = ["TrainState", "create_train_state", "encode", "make_train_step"]
