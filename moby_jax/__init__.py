"""moby_jax: MoBY self-supervised pre-training of Swin/DeiT in JAX/Flax (SPEC.md)."""

import importlib

__version__ = "0.1.0"

# Imported on first use, so that data-loader worker processes, which import
# moby_jax.data.*, do not pay for Flax and the models.
_EXPORTS = {"TrainState": "moby_jax.state", "create_train_state": "moby_jax.run",
            "encode": "moby_jax.train_step", "make_train_step": "moby_jax.run",
            "Pretraining": "moby_jax.run"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'moby_jax' has no attribute {name!r}")
  return getattr(importlib.import_module(_EXPORTS[name]), name)
