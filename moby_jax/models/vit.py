"""DeiT / ViT (timm's VisionTransformer as MoBY configures it) in Flax.

Same function as the original on the same weights (SPEC §1): patch embedding, a
prepended cls token, learned position embedding, pre-norm blocks with LayerNorm
epsilon 1e-6 and exact GELU, final LayerNorm; the feature is the cls token.
Module names mirror the original (`blocks_{i}/attn/qkv`, ...) for `convert`.
Precision follows AMP O1 as in swin.py: matmuls in `dtype`, the residual stream,
LayerNorm, softmax and GELU in float32.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from moby_jax.models import layers

Dtype = Any
EPS = 1e-6


class ViTBlock(nn.Module):
  """x + DropPath(MSA(LN(x))); x + DropPath(MLP(LN(x)))."""
  num_heads: int
  mlp_ratio: float
  qkv_bias: bool
  drop_path: float
  dtype: Dtype

  @nn.compact
  def __call__(self, x, deterministic: bool):
    y = layers.layer_norm(EPS, "norm1")(x)
    y = layers.Attention(self.num_heads, self.qkv_bias, None, self.dtype, name="attn")(y)
    x = x + layers.drop_path(y, self.drop_path, deterministic, "drop_path1")
    y = layers.layer_norm(EPS, "norm2")(x)
    y = layers.Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype, name="mlp")(y)
    return x + layers.drop_path(y, self.drop_path, deterministic, "drop_path2")


class VisionTransformer(nn.Module):
  """ViT backbone. Input (B, H, W, 3) normalised images, NHWC.

  Returns the final-LayerNorm cls token (B, embed_dim) in float32, or the logits of
  `head` when `num_classes` > 0. `train=True` enables stochastic depth ("dropout" rng).
  """
  img_size: int | tuple[int, int] = 224
  patch_size: int = 16
  embed_dim: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_path_rate: float = 0.0
  num_classes: int = 0
  remat: bool | str = False  # layers.REMAT_POLICIES
  dtype: Dtype = jnp.float32

  @property
  def image_hw(self) -> tuple[int, int]:
    return layers.to_hw(self.img_size)

  @property
  def num_features(self) -> int:
    return self.embed_dim

  def check_geometry(self) -> None:
    """Raises ValueError (naming the config fields) if the image does not tile."""
    h, w = self.image_hw
    if h % self.patch_size or w % self.patch_size:
      raise ValueError(f"ViT: image size {h}x{w} is not divisible by patch size "
                       f"{self.patch_size} (config fields model.img_size, model.patch_size)")
    if self.embed_dim % self.num_heads:
      raise ValueError(f"ViT: embed_dim {self.embed_dim} is not divisible by num_heads "
                       f"{self.num_heads} (config fields model.embed_dim, model.num_heads)")

  @nn.compact
  def __call__(self, x, train: bool = False):
    self.check_geometry()
    if tuple(x.shape[1:3]) != self.image_hw:
      raise ValueError(f"ViT: input images are {x.shape[1]}x{x.shape[2]} but the model was "
                       f"built for {self.image_hw[0]}x{self.image_hw[1]} (config field "
                       f"model.img_size)")
    x = layers.PatchEmbed(self.patch_size, self.embed_dim, None, self.dtype,
                          name="patch_embed")(x)
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    cls = self.param("cls_token", layers.trunc_normal, (1, 1, c), jnp.float32)
    pos = self.param("pos_embed", layers.trunc_normal, (1, h * w + 1, c), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c)), x], axis=1) + pos
    block_cls = layers.remat_block(ViTBlock, self.remat)
    rates = np.linspace(0.0, self.drop_path_rate, self.depth).tolist()
    for i in range(self.depth):
      x = block_cls(self.num_heads, self.mlp_ratio, self.qkv_bias, rates[i], self.dtype,
                    name=f"blocks_{i}")(x, not train)
    x = layers.layer_norm(EPS, "norm")(x)
    out = x[:, 0]
    if self.num_classes:
      out = layers.dense(self.num_classes, "head", jnp.float32)(out)
    return out
