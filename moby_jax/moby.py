"""The MoBY network and its pure pieces (SPEC §2).

The online branch is encoder -> projector -> predictor, the target branch encoder ->
projector with the same module names, so that the target's parameter tree is the online
tree without `predictor` and the momentum update is one `jax.tree.map`.
Queues are stored as (queue_size, dim) rows (the converter owns PyTorch's (dim, K)).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from moby_jax.models import build_encoder
from moby_jax.models.heads import MLPHead

TARGET_KEYS = ("encoder", "projector")


def l2_normalize(x, eps: float = 1e-12):
  """x / max(||x||, eps) along the last axis (torch.nn.functional.normalize), float32."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class MoBYBranch(nn.Module):
  """encoder -> projector (-> predictor), L2-normalised output (B, proj_dim), float32."""
  encoder: nn.Module
  proj_hidden_dim: int
  proj_dim: int
  proj_layers: int
  pred_hidden_dim: int = 0
  pred_layers: int = 0  # 0: no predictor (the target branch)

  @nn.compact
  def __call__(self, x, train: bool):
    z = self.encoder(x, train=train)
    dtype = self.encoder.dtype
    z = MLPHead(self.proj_hidden_dim, self.proj_dim, self.proj_layers, dtype,
                name="projector")(z, train)
    if self.pred_layers:
      z = MLPHead(self.pred_hidden_dim, self.proj_dim, self.pred_layers, dtype,
                  name="predictor")(z, train)
    return l2_normalize(z)


def build_branches(config) -> tuple[MoBYBranch, MoBYBranch]:
  """(online, target) branches from `config.model` and `config.moby`."""
  m = config.moby
  online_encoder = build_encoder(config.model)
  target_encoder = build_encoder({**config.model, "drop_path_rate": m.target_drop_path_rate})
  heads = dict(proj_hidden_dim=m.proj_hidden_dim, proj_dim=m.proj_dim,
               proj_layers=m.proj_layers)
  online = MoBYBranch(online_encoder, **heads, pred_hidden_dim=m.pred_hidden_dim,
                      pred_layers=m.pred_layers)
  return online, MoBYBranch(target_encoder, **heads)


def branch_encoder(config, branch: str = "online") -> nn.Module:
  """The encoder module of the online or the target branch (their drop-path rates differ)."""
  online, target = build_branches(config)
  return (online if branch == "online" else target).encoder


def momentum_at(k, total_steps: int, base_momentum: float):
  """m_k = 1 - (1 - m0) * (cos(pi k / K) + 1) / 2: m0 at k = 0, 1.0 at k = K."""
  k = jnp.asarray(k, jnp.float32)
  return 1.0 - (1.0 - base_momentum) * (jnp.cos(math.pi * k / total_steps) + 1.0) / 2.0


def target_update(target, online, m):
  """target <- m * target + (1 - m) * online, leaf by leaf (online = pre-update weights)."""
  return jax.tree.map(lambda t, o: m * t + (1 - m) * o, target, online)


def contrastive_loss(q, k, queue, temperature: float):
  """Cross-entropy with label 0 over [q.k, q.queue_1 .. q.queue_K] / T, batch mean.

  q, k: (B, D) L2-normalised; queue: (K, D). float32.
  """
  positive = jnp.sum(q * k, axis=-1, keepdims=True)
  # Full float32 (accelerators would round the inputs of a default-precision matmul).
  negatives = jnp.matmul(q, queue.T, precision=jax.lax.Precision.HIGHEST)
  logits = jnp.concatenate([positive, negatives], axis=1) / temperature
  return -jnp.mean(jax.nn.log_softmax(logits, axis=-1)[:, 0])


def enqueue(queue, keys, ptr):
  """Writes keys (B, D) at rows ptr..ptr+B of queue (K, D); the caller advances ptr."""
  return jax.lax.dynamic_update_slice(queue, keys.astype(queue.dtype), (ptr, 0))


def init_queue(rng, queue_size: int, dim: int):
  """(K, D) standard normal rows, L2-normalised along D."""
  return l2_normalize(jax.random.normal(rng, (queue_size, dim), jnp.float32))
