"""Backbone registry: `build_encoder(config.model)` maps a variant name to a Flax module.

Each variant fixes the architecture (widths, depths, heads, default patch and window);
any field of `config.model` that is set (not None) overrides the variant's value, so
`img_size`, `window_size`, `drop_path_rate`, `dtype`, ... come from the config.
The "_mu" variants are tiny sizes for tests: `swin_mu` and `deit_mu` are the
architectures of the golden fixtures (SPEC §7).
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moby_jax.models import layers
from moby_jax.models.swin import SwinTransformer
from moby_jax.models.vit import VisionTransformer

_SWIN = dict(patch_size=4, window_size=7, img_size=224)
_DEIT = dict(patch_size=16, img_size=224)

VARIANTS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "swin_tiny": (SwinTransformer, dict(_SWIN, embed_dim=96, depths=(2, 2, 6, 2),
                                        num_heads=(3, 6, 12, 24))),
    "swin_small": (SwinTransformer, dict(_SWIN, embed_dim=96, depths=(2, 2, 18, 2),
                                         num_heads=(3, 6, 12, 24))),
    "swin_base": (SwinTransformer, dict(_SWIN, embed_dim=128, depths=(2, 2, 18, 2),
                                        num_heads=(4, 8, 16, 32))),
    "swin_large": (SwinTransformer, dict(_SWIN, embed_dim=192, depths=(2, 2, 18, 2),
                                         num_heads=(6, 12, 24, 48))),
    "swin_mu": (SwinTransformer, dict(embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                                      patch_size=4, window_size=4, img_size=32)),
    "deit_tiny": (VisionTransformer, dict(_DEIT, embed_dim=192, depth=12, num_heads=3)),
    "deit_small": (VisionTransformer, dict(_DEIT, embed_dim=384, depth=12, num_heads=6)),
    "deit_base": (VisionTransformer, dict(_DEIT, embed_dim=768, depth=12, num_heads=12)),
    "deit_mu": (VisionTransformer, dict(embed_dim=32, depth=2, num_heads=2, patch_size=8,
                                        img_size=32)),
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_encoder(model_config: Mapping[str, Any]) -> nn.Module:
  """The backbone named by `model_config["name"]`, with the config's fields applied.

  Raises ValueError for an unknown name, a field the family does not have, an unknown
  dtype, or an image size that does not fit the patch/window arrangement.
  """
  fields = {k: v for k, v in dict(model_config).items() if v is not None}
  name = fields.pop("name", None)
  if name not in VARIANTS:
    raise ValueError(f"unknown model.name {name!r}; known: {', '.join(sorted(VARIANTS))}")
  cls, defaults = VARIANTS[name]
  known = set(cls.__dataclass_fields__) - {"parent", "name"}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"model.{unknown[0]} is not a field of {name} "
                     f"(unknown: {unknown}; known: {sorted(known)})")
  if "dtype" in fields:
    if fields["dtype"] not in _DTYPES:
      raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {fields['dtype']!r}")
    fields["dtype"] = _DTYPES[fields["dtype"]]
  for key in ("depths", "num_heads"):
    if isinstance(fields.get(key), list):
      fields[key] = tuple(fields[key])
  layers.remat_policy(fields.get("remat", False))  # fails here, before any tracing
  model = cls(**{**defaults, **fields})
  model.check_geometry()
  return model


def dummy_input(model: nn.Module, batch: int = 1) -> jax.ShapeDtypeStruct:
  """The shape of a float32 NHWC batch the model accepts."""
  return jax.ShapeDtypeStruct((batch, *model.image_hw, 3), jnp.float32)


def init_encoder(model: nn.Module, rng: jax.Array, batch: int = 1) -> dict:
  """Initial variables ({"params", and "batch_stats" for the "bn" variant})."""
  init = jax.jit(lambda r, x: model.init(r, x, train=False))
  return init(rng, jnp.zeros(dummy_input(model, batch).shape))


def abstract_variables(model: nn.Module) -> dict:
  """Shapes and dtypes of the variables, without computing them."""
  return jax.eval_shape(lambda rng: init_encoder(model, rng), jax.random.key(0))
