"""Building blocks shared by the backbones and the MoBY heads.

Module and parameter names follow the original PyTorch names (``fc1``/``fc2``,
``running mean``/``var`` as ``mean``/``var``) so that ``convert`` can map them with
one table.
"""

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

def trunc_normal(key, shape, dtype=jnp.float32, std: float = 0.02, bound: float = 2.0):
  """timm's `trunc_normal_(t, std=.02)`: N(0, std) cut at +-`bound` in absolute units
  (not standard deviations), so at std 0.02 it is a plain normal: Linear weights, relative
  position bias tables and position embeddings of the original Swin/DeiT code."""
  return jnp.clip(std * jax.random.normal(key, shape, dtype), -bound, bound)


def torch_uniform(fan_in: int):
  """PyTorch's default Linear/Conv2d init, kaiming_uniform_(a=sqrt(5)) for weights and the
  same bound for biases: U(-1/sqrt(fan_in), +1/sqrt(fan_in))."""
  bound = fan_in ** -0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype,
                                                                  -bound, bound)


zeros = nn.initializers.zeros


def torch_name(path: tuple[str, ...]) -> str:
  """A Flax module path as the original PyTorch dotted name: `layers_0/blocks_1` ->
  `layers.0.blocks.1` (modules are named `name_N` where PyTorch has `name.N`)."""
  return ".".join(re.sub(r"_(\d+)$", r".\1", p) for p in path)


def to_hw(size: int | tuple[int, int]) -> tuple[int, int]:
  """An image size given as one int (square) or (H, W) -> (H, W)."""
  return (size, size) if isinstance(size, int) else tuple(size)


class Dense(nn.Module):
  """A Linear layer: float32 params, matmul in `dtype` (inputs cast to it), output in
  `dtype`. `initializer`: "timm" (the backbones: truncated normal 0.02, zero bias) or
  "torch" (PyTorch's defaults, which the released MoBY heads keep)."""
  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  initializer: str = "timm"

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    kernel_init, bias_init = ((trunc_normal, zeros) if self.initializer == "timm"
                              else (torch_uniform(fan_in), torch_uniform(fan_in)))
    kernel = self.param("kernel", kernel_init, (fan_in, self.features), jnp.float32)
    y = jnp.matmul(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      y = y + self.param("bias", bias_init, (self.features,), jnp.float32).astype(self.dtype)
    return y


def dense(features: int, name: str, dtype: Dtype, use_bias: bool = True,
          initializer: str = "timm") -> Dense:
  """A Linear layer named `name` (see Dense)."""
  return Dense(features, use_bias, dtype, initializer, name=name)


def layer_norm(epsilon: float, name: str) -> nn.LayerNorm:
  """LayerNorm computed and returned in float32 whatever the compute dtype (AMP O1)."""
  return nn.LayerNorm(epsilon, dtype=jnp.float32, param_dtype=jnp.float32, name=name)


# Rematerialisation of the blocks (model.remat): what the backward pass recomputes.
REMAT_POLICIES = {
    "none": None,              # keep every activation
    "full": "nothing_saveable",  # keep only each block's input, recompute the rest
    "dots": "checkpoint_dots",  # keep the matmul outputs, recompute the element-wise ops
}


def remat_policy(remat) -> str:
  """The REMAT_POLICIES name `remat` (a name, or a bool: True is "full") stands for;
  ValueError naming model.remat for anything else."""
  name = ("full" if remat else "none") if isinstance(remat, bool) else remat
  if name not in REMAT_POLICIES:
    raise ValueError(f"model.remat must be one of {sorted(REMAT_POLICIES)} (or a bool), "
                     f"got {remat!r}")
  return name


def remat_block(block_cls, remat):
  """`block_cls` wrapped by nn.remat for `remat` (see remat_policy); its
  __call__(x, deterministic) keeps `deterministic` static."""
  remat = remat_policy(remat)
  if remat == "none":
    return block_cls
  policy = getattr(jax.checkpoint_policies, REMAT_POLICIES[remat])
  # static_argnums counts the module as argument 0, so 2 is `deterministic`.
  return nn.remat(block_cls, static_argnums=(2,), policy=policy)


def drop_path(x: jax.Array, rate: float, deterministic: bool, name: str) -> jax.Array:
  """Stochastic depth: drops whole samples with probability `rate`, scales kept by 1/(1-rate).

  A dropout whose mask is broadcast over every axis but the batch axis is exactly
  per-sample DropPath; it draws from the "dropout" rng stream.
  """
  if rate == 0.0:
    return x
  return nn.Dropout(rate, broadcast_dims=tuple(range(1, x.ndim)), name=name)(
      x, deterministic=deterministic)


def gelu(x):
  """Exact GELU in float32, written as PyTorch computes it: x/2 (1 + erf(x / sqrt 2)).
  (jax.nn.gelu's exact form goes through erfc and an exponential: twice the cost on
  CPUs.)"""
  x = x.astype(jnp.float32)
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.float32(2 ** -0.5)))


class Mlp(nn.Module):
  """Linear(dim -> hidden) -> exact (erf) GELU in float32 -> Linear(hidden -> dim); the
  Linears in `dtype`, the output in `dtype`."""
  hidden_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    out_dim = x.shape[-1]
    x = dense(self.hidden_dim, "fc1", self.dtype)(x)
    return dense(out_dim, "fc2", self.dtype)(gelu(x))


class BatchNorm(nn.Module):
  """BatchNorm with PyTorch semantics over all axes but the last (channels).

  Training mode normalises with the biased variance of the batch and updates the
  running statistics with momentum 0.1 (PyTorch convention) using the *unbiased*
  variance, as `torch.nn.BatchNorm1d` does, so exported running statistics match the
  PyTorch code. Statistics are computed in float32 over the whole (global) batch: under
  `jax.jit` with a data-sharded batch this is synchronised BatchNorm with no extra code.
  Eval mode normalises with the running statistics. `num_batches_tracked` counts
  training-mode calls, like PyTorch's buffer of that name. The output is float32, as
  AMP O1 keeps BatchNorm.
  """
  momentum: float = 0.1
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, use_running_average: bool):
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", zeros, (features,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    count = self.variable("batch_stats", "num_batches_tracked", jnp.zeros, (), jnp.int32)

    x32 = x.astype(jnp.float32)
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      n = x32.size // features
      mean = jnp.mean(x32, axis=axes)
      var = jnp.mean(jnp.square(x32 - mean), axis=axes)
      if not self.is_initializing():
        unbiased = var * (n / max(n - 1, 1))
        ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
        ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
        count.value = count.value + 1
    return (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class PatchConv(nn.Module):
  """Conv2d with kernel = stride = p (flax Conv's params: kernel (p, p, C, out), bias),
  computed as what it is, one matmul over the non-overlapping patches: the reshapes are
  free and the weight gradient is a matmul too (XLA's CPU convolution gradient for this
  stride is ten times slower). PyTorch's default Conv2d init, as the originals keep."""
  features: int
  patch_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    b, h, w, c = x.shape
    init = torch_uniform(p * p * c)
    kernel = self.param("kernel", init, (p, p, c, self.features), jnp.float32)
    bias = self.param("bias", init, (self.features,), jnp.float32)
    patches = x.astype(self.dtype).reshape(b, h // p, p, w // p, p, c)
    y = jnp.einsum("bhpwqc,pqco->bhwo", patches, kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)


class PatchEmbed(nn.Module):
  """Conv with kernel = stride = patch size: (B, H, W, 3) -> (B, H/p, W/p, embed_dim),
  float32 (the convolution in `dtype`).

  Followed by a LayerNorm named `norm` when `norm_eps` is given (Swin's `patch_norm`).
  """
  patch_size: int
  embed_dim: int
  norm_eps: float | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = PatchConv(self.embed_dim, self.patch_size, self.dtype, name="proj")(x)
    if self.norm_eps is not None:
      return layer_norm(self.norm_eps, "norm")(x)
    return x.astype(jnp.float32)


class Attention(nn.Module):
  """Multi-head self-attention with the original fused `qkv` and `proj` Linears.

  With `window_size` set it is Swin's window attention: a learned
  `relative_position_bias_table` ((2ws-1)^2, heads) gathered by `relative_index`
  (ws^2, ws^2) is added to the logits, and an optional additive `mask`
  (nW, N, N) is applied per window (the leading axis of x is batch * nW, window-major
  inside each image). The projections and both attention matmuls run in `dtype`; the
  logits come out of their matmul in float32 (accumulated and kept in float32), and
  the bias, mask and softmax are float32 whatever the compute dtype.

  x: (B_, N, C) -> (B_, N, C) in `dtype`.
  """
  num_heads: int
  qkv_bias: bool = True
  window_size: int | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, relative_index=None, mask=None):
    b, n, c = x.shape
    head_dim = c // self.num_heads
    qkv = dense(3 * c, "qkv", self.dtype, use_bias=self.qkv_bias)(x)
    # PyTorch's channel order is (3, heads, hd): q, k, v are three channel blocks, each
    # split into heads by a free reshape, and their gradients are joined by one
    # concatenate. (Moving the heads axis of the whole qkv tensor instead costs XLA:CPU a
    # slow 5-D transpose in the backward pass, and three slices a pad-and-add; measured
    # in bench/.)
    q, k, v = (t.reshape(b, n, self.num_heads, head_dim) for t in jnp.split(qkv, 3, axis=-1))
    q = q * np.asarray(head_dim ** -0.5, self.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    if self.window_size is not None:
      ws = self.window_size
      table = self.param("relative_position_bias_table", trunc_normal,
                         ((2 * ws - 1) ** 2, self.num_heads), jnp.float32)
      # A one-hot matmul instead of a gather: exact (one term per sum), and its gradient
      # is a matmul, where a gather's is a scatter-add that GPUs compute in a
      # non-deterministic order.
      onehot = jax.nn.one_hot(np.asarray(relative_index).reshape(-1), table.shape[0],
                              dtype=jnp.float32)
      bias = jnp.matmul(onehot, table, precision=jax.lax.Precision.HIGHEST)
      bias = bias.reshape(n, n, self.num_heads)
      logits = logits + bias.transpose(2, 0, 1)[None]
    if mask is not None:
      nw = mask.shape[0]
      logits = logits.reshape(b // nw, nw, self.num_heads, n, n) + mask[None, :, None]
      logits = logits.reshape(b, self.num_heads, n, n)
    attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, c)
    return dense(c, "proj", self.dtype)(out)
