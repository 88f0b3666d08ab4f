"""MoBY projector/predictor heads and the linear-evaluation head.

Module names follow the released MoBY `MoBYMLP` so that `convert` maps them with its one
table: index 0 of `linear_hidden` is an Identity, then (Linear, BatchNorm1d, ReLU) sit at
indices 1, 2, 3, then 4, 5, 6, ...; the last Linear is `linear_out`.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from moby_jax.models import layers

Dtype = Any


class MLPHead(nn.Module):
  """`num_layers` Linear layers, each but the last followed by BatchNorm + ReLU.

  BatchNorm statistics are over the whole (global) batch in training mode (SyncBN). The
  Linears keep PyTorch's default init (the released `MoBYMLP` never re-initialises
  them) and run in `dtype`; BatchNorm and ReLU in float32. x: (B, in) -> (B, out_dim),
  float32.
  """
  hidden_dim: int
  out_dim: int
  num_layers: int = 2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    if self.num_layers < 1:
      raise ValueError(f"MLP head needs at least one layer, got num_layers={self.num_layers} "
                       "(config fields moby.proj_layers / moby.pred_layers)")
    for i in range(self.num_layers - 1):
      x = layers.dense(self.hidden_dim, f"linear_hidden_{3 * i + 1}", self.dtype,
                       initializer="torch")(x)
      x = layers.BatchNorm(name=f"linear_hidden_{3 * i + 2}")(x, use_running_average=not train)
      x = nn.relu(x)
    return layers.dense(self.out_dim, "linear_out", self.dtype, initializer="torch")(x).astype(
        jnp.float32)
