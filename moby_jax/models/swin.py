"""Swin Transformer (Liu et al. 2021) in Flax, structured as the original PyTorch code.

Computes the same function as the original model (SPEC §1) on the same weights; the
module tree mirrors the original names (`layers_{i}/blocks_{j}/attn/qkv`, ...) so that
`convert` maps it to the PyTorch state_dict with one table. Activations stay in
(B, H, W, C) layout between blocks; windows are cut out by reshapes.

Precision (`dtype`, the compute dtype) follows AMP O1, how the released code trains:
Linears, the patch convolution and the attention matmuls run in `dtype`; the residual
stream, LayerNorm, BatchNorm, softmax, GELU and the pooled feature stay float32; params
are float32.

The "bn" variant (`norm_before_mlp="bn"`, MoBY-BN) uses a real BatchNorm before the MLP,
with learned scale/bias and running statistics over the global batch. The released
PyTorch code instead builds a fresh, untrained BatchNorm at every call (and, through a
misspelled argument, never enables it); ours is the model the paper describes.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from moby_jax.models import layers

Dtype = Any


def relative_position_index(window_size: int) -> np.ndarray:
  """The (ws^2, ws^2) int index into the bias table: (dy+ws-1)*(2ws-1) + (dx+ws-1)."""
  ws = window_size
  ys, xs = np.meshgrid(np.arange(ws), np.arange(ws), indexing="ij")
  ys, xs = ys.reshape(-1), xs.reshape(-1)  # row-major tokens of a window
  dy = ys[:, None] - ys[None, :] + ws - 1
  dx = xs[:, None] - xs[None, :] + ws - 1
  return (dy * (2 * ws - 1) + dx).astype(np.int64)


def window_partition(x, ws: int):
  """(B, H, W, C) -> (B * nW, ws*ws, C), windows row-major, tokens row-major."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // ws, ws, w // ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, ws * ws, c)


def window_reverse(windows, ws: int, h: int, w: int):
  """Inverse of `window_partition`: (B * nW, ws*ws, C) -> (B, H, W, C)."""
  c = windows.shape[-1]
  x = windows.reshape(-1, h // ws, w // ws, ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, h, w, c)


def shifted_window_mask(h: int, w: int, window_size: int, shift: int) -> np.ndarray:
  """(nW, ws^2, ws^2) float32: -100 where two tokens of a window lie in different regions.

  The regions are the 3x3 pieces cut by slicing H and W at [0:-ws], [-ws:-shift],
  [-shift:] after the cyclic shift (SPEC §1).
  """
  ws = window_size
  labels = np.zeros((1, h, w, 1), np.float32)
  cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
  for i, hs in enumerate(cuts):
    for j, wsl in enumerate(cuts):
      labels[:, hs, wsl, :] = 3 * i + j
  win = window_partition(labels, ws)[..., 0]  # (nW, N)
  differ = win[:, :, None] != win[:, None, :]
  return np.where(differ, -100.0, 0.0).astype(np.float32)


class SwinBlock(nn.Module):
  """x + DropPath(W-MSA(LN(x))); x + DropPath(MLP(norm2(x))), on (B, H, W, C)."""
  num_heads: int
  window_size: int
  shift: int
  mlp_ratio: float
  qkv_bias: bool
  drop_path: float
  norm_before_mlp: str
  dtype: Dtype

  @nn.compact
  def __call__(self, x, deterministic: bool):
    b, h, w, c = x.shape
    ws, shift = self.window_size, self.shift
    shortcut = x
    x = layers.layer_norm(1e-5, "norm1")(x)
    if shift:
      x = jnp.roll(x, (-shift, -shift), axis=(1, 2))
    mask = shifted_window_mask(h, w, ws, shift) if shift else None
    attn = layers.Attention(self.num_heads, self.qkv_bias, ws, self.dtype, name="attn")
    x = attn(window_partition(x, ws), relative_position_index(ws), mask)
    x = window_reverse(x, ws, h, w)
    if shift:
      x = jnp.roll(x, (shift, shift), axis=(1, 2))
    x = shortcut + layers.drop_path(x, self.drop_path, deterministic, "drop_path1")
    if self.norm_before_mlp == "bn":
      y = layers.BatchNorm(name="norm2")(x, use_running_average=deterministic)
    else:
      y = layers.layer_norm(1e-5, "norm2")(x)
    y = layers.Mlp(int(c * self.mlp_ratio), self.dtype, name="mlp")(y)
    return x + layers.drop_path(y, self.drop_path, deterministic, "drop_path2")


class PatchMerging(nn.Module):
  """(B, H, W, C) -> (B, H/2, W/2, 2C): concat of the four 2x2 neighbours, LN, Linear.

  The channel order x[0::2,0::2], x[1::2,0::2], x[0::2,1::2], x[1::2,1::2] is the
  original one; the reduction Linear has no bias.
  """
  dtype: Dtype

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = jnp.concatenate(
        [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
    x = layers.layer_norm(1e-5, "norm")(x)
    # The residual stream of the next stage starts here: float32.
    return layers.dense(2 * c, "reduction", self.dtype, use_bias=False)(x).astype(jnp.float32)


class SwinStage(nn.Module):
  """One stage (`layers.{i}` in PyTorch): its blocks, then patch merging if not last.

  Returns (stage output before merging, input of the next stage).
  """
  geometry: Sequence[tuple[int, int]]  # (window, shift) per block
  num_heads: int
  mlp_ratio: float
  qkv_bias: bool
  drop_paths: Sequence[float]
  norm_before_mlp: str
  downsample: bool
  remat: bool | str
  dtype: Dtype

  @nn.compact
  def __call__(self, x, deterministic: bool):
    block_cls = layers.remat_block(SwinBlock, self.remat)
    for j, ((ws, shift), dp) in enumerate(zip(self.geometry, self.drop_paths)):
      x = block_cls(self.num_heads, ws, shift, self.mlp_ratio, self.qkv_bias, dp,
                    self.norm_before_mlp, self.dtype, name=f"blocks_{j}")(x, deterministic)
    out = x
    if self.downsample:
      x = PatchMerging(self.dtype, name="downsample")(x)
    return out, x


class SwinTransformer(nn.Module):
  """Swin backbone. Input (B, H, W, 3) normalised images, NHWC.

  Returns the pooled feature (B, embed_dim * 2^(stages-1)) in float32 (final LayerNorm,
  mean over tokens), or the logits of `head` when `num_classes` > 0. With
  `return_stages=True` it returns `(out, stages)` where `stages[i]` is (B, H_i, W_i, C_i),
  the tokens of stage i after its blocks and before patch merging, without any norm (the
  tensors detection/segmentation necks consume).
  `train=True` enables stochastic depth (rng stream "dropout") and batch statistics in
  the "bn" variant (mutable "batch_stats").
  """
  img_size: int | tuple[int, int] = 224
  patch_size: int = 4
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_path_rate: float = 0.0
  ape: bool = False
  patch_norm: bool = True
  norm_before_mlp: str = "ln"
  num_classes: int = 0
  remat: bool | str = False  # layers.REMAT_POLICIES
  dtype: Dtype = jnp.float32

  @property
  def image_hw(self) -> tuple[int, int]:
    return layers.to_hw(self.img_size)

  @property
  def num_features(self) -> int:
    return self.embed_dim * 2 ** (len(self.depths) - 1)

  def stage_resolutions(self) -> list[tuple[int, int]]:
    h, w = (s // self.patch_size for s in self.image_hw)
    return [(h // 2 ** i, w // 2 ** i) for i in range(len(self.depths))]

  def block_geometry(self) -> list[list[tuple[int, int]]]:
    """(window, shift) of every block, stage by stage, with the small-stage rule.

    A stage whose smaller side is <= window_size uses one window of that size and no
    shift; otherwise odd blocks shift by window_size // 2.
    """
    geometry = []
    for (h, w), depth in zip(self.stage_resolutions(), self.depths):
      if min(h, w) <= self.window_size:
        geometry.append([(min(h, w), 0)] * depth)
      else:
        geometry.append([(self.window_size, (j % 2) * (self.window_size // 2))
                         for j in range(depth)])
    return geometry

  def check_geometry(self) -> None:
    """Raises ValueError (naming the config fields) if the image does not tile."""
    fields = "(config fields model.img_size, model.patch_size, model.window_size)"
    h, w = self.image_hw
    if h % self.patch_size or w % self.patch_size:
      raise ValueError(f"Swin: image size {h}x{w} is not divisible by patch size "
                       f"{self.patch_size} {fields}")
    if len(self.num_heads) != len(self.depths):
      raise ValueError(f"Swin: model.num_heads {tuple(self.num_heads)} and model.depths "
                       f"{tuple(self.depths)} must have the same length")
    if self.norm_before_mlp not in ("ln", "bn"):
      raise ValueError(f"Swin: model.norm_before_mlp must be 'ln' or 'bn', "
                       f"got {self.norm_before_mlp!r}")
    last = len(self.depths) - 1
    for i, ((sh, sw), geo) in enumerate(zip(self.stage_resolutions(), self.block_geometry())):
      ws = geo[0][0]
      if sh == 0 or sw == 0 or sh % ws or sw % ws:
        raise ValueError(
            f"Swin: image size {h}x{w} does not fit the patch/window arrangement: stage {i} "
            f"has resolution {sh}x{sw}, not a multiple of its window {ws} {fields}")
      if i < last and (sh % 2 or sw % 2):
        raise ValueError(
            f"Swin: image size {h}x{w} does not fit the patch/window arrangement: stage {i} "
            f"resolution {sh}x{sw} is odd, so patch merging cannot halve it {fields}")

  @nn.compact
  def __call__(self, x, train: bool = False, return_stages: bool = False):
    self.check_geometry()
    if tuple(x.shape[1:3]) != self.image_hw:
      raise ValueError(f"Swin: input images are {x.shape[1]}x{x.shape[2]} but the model was "
                       f"built for {self.image_hw[0]}x{self.image_hw[1]} (config field "
                       f"model.img_size)")
    x = layers.PatchEmbed(self.patch_size, self.embed_dim, 1e-5 if self.patch_norm else None,
                          self.dtype, name="patch_embed")(x)
    if self.ape:
      b, h, w, c = x.shape
      pos = self.param("absolute_pos_embed", layers.trunc_normal, (1, h * w, c), jnp.float32)
      x = x + pos.reshape(1, h, w, c)
    rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
    stages = []
    for i, geo in enumerate(self.block_geometry()):
      start = sum(self.depths[:i])
      out, x = SwinStage(geo, self.num_heads[i], self.mlp_ratio, self.qkv_bias,
                         rates[start:start + len(geo)], self.norm_before_mlp,
                         i < len(self.depths) - 1, self.remat, self.dtype,
                         name=f"layers_{i}")(x, not train)
      stages.append(out)
    x = layers.layer_norm(1e-5, "norm")(x)
    out = jnp.mean(x, axis=(1, 2))
    if self.num_classes:
      out = layers.dense(self.num_classes, "head", jnp.float32)(out)
    return (out, stages) if return_stages else out
