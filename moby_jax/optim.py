"""Optimisers, learning-rate schedule and weight-decay masks with the SPEC §2/§4 semantics.

The learning rate is an injected hyperparameter (`optax.inject_hyperparams`) that the
train step sets from `state.step` with `set_learning_rate`, so the schedule follows the
data position even when a non-finite step is skipped (a skipped step leaves the optimizer
state untouched, including optax's own counter).
"""

import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from moby_jax.models import layers


def scaled_lrs(config) -> tuple[float, float, float]:
  """(base, warmup, min) LR scaled linearly by global_batch / optim.reference_batch (512)."""
  scale = config.data.batch_size / config.optim.reference_batch
  return (config.optim.base_lr * scale, config.optim.warmup_lr * scale,
          config.optim.min_lr * scale)


def total_steps(config) -> int:
  return int(config.train.epochs * config.train.steps_per_epoch)


def warmup_steps(config) -> int:
  return int(config.train.warmup_epochs * config.train.steps_per_epoch)


def lr_schedule(config) -> Callable[[jax.Array], jax.Array]:
  """Step -> LR, timm's CosineLRScheduler per step (t_in_epochs False).

  t < W: warmup_lr + t * (base - warmup_lr) / W; otherwise
  min_lr + 0.5 * (base - min_lr) * (1 + cos(pi * t / T)) with t NOT shifted by W, and
  min_lr from T on. Step i of training uses lr(i).
  """
  base, warmup_lr, min_lr = scaled_lrs(config)
  big_t, big_w = total_steps(config), warmup_steps(config)

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    cosine = min_lr + 0.5 * (base - min_lr) * (1 + jnp.cos(jnp.pi * t / big_t))
    cosine = jnp.where(t >= big_t, min_lr, cosine)
    if big_w == 0:
      return cosine
    warm = warmup_lr + t * (base - warmup_lr) / big_w
    return jnp.where(t < big_w, warm, cosine)

  return schedule


def moby_decay_mask(params) -> Any:
  """MoBY pre-training: no decay for 1-D parameters and biases; all else decays.

  The MoBY wrapper does not forward the backbone's no-decay lists, so the relative
  position bias table, position embeddings and cls token decay here (SPEC §2).
  """
  flat = traverse_util.flatten_dict(params)
  mask = {path: leaf.ndim > 1 and path[-1] != "bias" for path, leaf in flat.items()}
  return traverse_util.unflatten_dict(mask)


_BACKBONE_NO_DECAY = re.compile(
    r"(^|\.)(absolute_pos_embed|pos_embed|cls_token)$|relative_position_bias_table")


def backbone_decay_mask(params) -> Any:
  """Supervised/linear training of a bare backbone: the MoBY mask plus Swin's
  `absolute_pos_embed` and `relative_position_bias_table` and DeiT's `pos_embed` and
  `cls_token` lists."""
  flat = traverse_util.flatten_dict(moby_decay_mask(params))
  mask = {path: decays and not _BACKBONE_NO_DECAY.search(layers.torch_name(path))
          for path, decays in flat.items()}
  return traverse_util.unflatten_dict(mask)


def adamw(config, mask_fn: Callable = moby_decay_mask) -> optax.GradientTransformation:
  """Global-norm clipping at optim.clip_grad, then AdamW (decoupled decay under `mask_fn`).

  AdamW as PyTorch: p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p). Clipping is skipped
  when optim.clip_grad is 0 or None.
  """
  o = config.optim
  # Only the learning rate is injected; the mask is a function of the params, not a
  # schedule, so it must stay static.
  inner = optax.inject_hyperparams(
      optax.adamw, static_args=("b1", "b2", "eps", "weight_decay", "mask"))(
      learning_rate=0.0, b1=o.betas[0], b2=o.betas[1], eps=o.eps,
      weight_decay=o.weight_decay, mask=mask_fn)
  if not o.clip_grad:
    return inner
  return optax.chain(optax.clip_by_global_norm(o.clip_grad), inner)


def sgd_nesterov(config) -> optax.GradientTransformation:
  """Linear evaluation (SPEC §4): clipping, then SGD with Nesterov momentum and the
  backbone no-decay lists for optim.weight_decay (0 in the released recipe)."""
  o = config.optim
  inner = optax.inject_hyperparams(
      lambda learning_rate: optax.chain(
          optax.add_decayed_weights(o.weight_decay, backbone_decay_mask),
          optax.sgd(learning_rate, momentum=o.momentum, nesterov=True)))(learning_rate=0.0)
  if not o.clip_grad:
    return inner
  return optax.chain(optax.clip_by_global_norm(o.clip_grad), inner)


def make_optimizer(config) -> optax.GradientTransformation:
  """The optimizer named by optim.name ("adamw" or "sgd")."""
  builders = {"adamw": adamw, "sgd": sgd_nesterov}
  if config.optim.name not in builders:
    raise ValueError(f"unknown optim.name {config.optim.name!r}; known: {sorted(builders)}")
  return builders[config.optim.name](config)


def set_learning_rate(opt_state, lr):
  """The optimizer state with its injected learning rate set to `lr`."""
  return optax.tree_utils.tree_set(opt_state, learning_rate=jnp.asarray(lr, jnp.float32))


def check_schedule(config) -> None:
  """Raises ValueError naming the field for schedules that cannot run."""
  if total_steps(config) <= 0:
    raise ValueError(f"train.epochs * train.steps_per_epoch must be positive, got "
                     f"{config.train.epochs} * {config.train.steps_per_epoch}")
  if warmup_steps(config) > total_steps(config):
    raise ValueError(f"train.warmup_epochs ({config.train.warmup_epochs}) exceeds "
                     f"train.epochs ({config.train.epochs})")
  if not math.isfinite(config.optim.base_lr):
    raise ValueError("optim.base_lr must be finite")
