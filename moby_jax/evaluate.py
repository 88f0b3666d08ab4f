"""Evaluation of a (frozen) encoder: kNN on its features, and the linear probe (SPEC §4).

Both start from uint8 images the host has already resized/cropped; normalisation and the
encoder run on the device (`_features`, shared by feature extraction and the probe).

- `knn_classify`: weighted kNN on L2-normalised features (the InstDisc / DINO protocol).
- `make_feature_fn` + `labelled_features`: pooled eval-mode features of a dataset,
  streamed from eval-loader batches, keeping only the features and labels of the rows
  that could be read.
- `LinearState`, `create_linear_state`, `make_linear_step`, `make_linear_eval`: a Linear
  head on the frozen backbone, trained with SGD (Nesterov) and label smoothing. As in the
  released code the backbone stays in training mode while the head trains (stochastic
  depth active; in the "bn" variant its running statistics keep updating and are what
  evaluation uses); no gradient reaches it.
"""

import functools
from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from moby_jax import augment, optim, parallel
from moby_jax.models import build_encoder, layers


# ---------------------------------------------------------------------------------------
# kNN


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _knn_votes(train, train_labels, test, *, k: int, num_classes: int, temperature):
  """Class votes (B, C) of the k nearest train rows of each test row (features normalised)."""
  # Full fp32 similarities: accelerators would otherwise round the matmul inputs, which
  # reorders near-tied neighbours.
  sim = jnp.matmul(test, train.T, precision=jax.lax.Precision.HIGHEST)
  top_sim, top_idx = jax.lax.top_k(sim, k)
  weights = jnp.exp(top_sim / temperature)
  one_hot = jax.nn.one_hot(train_labels[top_idx], num_classes, dtype=jnp.float32)
  return jnp.einsum("bk,bkc->bc", weights, one_hot)


def _l2_normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def knn_classify(train_features, train_labels, test_features, test_labels, num_classes: int,
                 k: int = 20, temperature: float = 0.07, chunk_size: int = 256) -> dict:
  """Weighted kNN accuracy (percent): {"top1", "top5"}.

  Features (N, D) / (M, D) are L2-normalised; each test row takes its k most
  cosine-similar train rows (k is capped at N) and each neighbour votes for its label
  with weight exp(similarity / temperature). Ties in the votes go to the lower class
  index. Test rows are processed `chunk_size` at a time (the last chunk padded, so one
  shape compiles), so N can be tens of thousands.
  """
  train = jnp.asarray(_l2_normalize(train_features))
  test = _l2_normalize(test_features)
  train_labels = jnp.asarray(np.asarray(train_labels, np.int32))
  test_labels = np.asarray(test_labels)
  k = min(k, train.shape[0])
  votes = []
  for start in range(0, len(test), chunk_size):
    chunk = test[start:start + chunk_size]
    padded = np.pad(chunk, ((0, chunk_size - len(chunk)), (0, 0)))
    votes.append(np.asarray(_knn_votes(train, train_labels, padded, k=k,
                                       num_classes=num_classes,
                                       temperature=temperature))[:len(chunk)])
  votes = np.concatenate(votes)
  # A stable sort on negated votes ranks equal votes by class index.
  ranked = np.argsort(-votes, axis=1, kind="stable")[:, :min(5, num_classes)]
  hits = ranked == test_labels[:, None]
  return {"top1": 100.0 * float(np.mean(hits[:, 0])),
          "top5": 100.0 * float(np.mean(hits.any(axis=1)))}


# ---------------------------------------------------------------------------------------
# Features


def _encoder_variables(params, batch_stats) -> dict:
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  return variables


def _features(encoder: nn.Module, variables, images_uint8, *, train: bool = False,
              rng=None):
  """uint8 (B, H, W, 3) -> pooled features (B, D) float32, and updated batch_stats.

  Eval mode uses running statistics; train mode enables stochastic depth (`rng`) and,
  when the encoder has BatchNorm, batch statistics whose running averages are updated.
  """
  x = augment.normalize(images_uint8.astype(jnp.float32) / 255.0)
  if not train:
    return encoder.apply(variables, x, train=False), variables.get("batch_stats", {})
  features, updates = encoder.apply(variables, x, train=True, rngs={"dropout": rng},
                                    mutable=["batch_stats"])
  return features, updates.get("batch_stats", {})


def make_feature_fn(config, mesh: Mesh | None = None):
  """A jitted `feature_fn(variables, images) -> (B, D)` for the encoder of `config.model`.

  `variables` are the encoder's {"params"(, "batch_stats")}; `images` uint8
  (B, H, W, 3) at model.img_size, host numpy (this process's slice of the global
  batch) or global jax arrays. Eval mode; features come back replicated on `mesh`.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  encoder = build_encoder(config.model)
  jitted = jax.jit(lambda variables, images: _features(encoder, variables, images)[0],
                   in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                   out_shardings=parallel.replicated(mesh))

  def feature_fn(variables, images):
    return jitted(variables, parallel.to_global(images, mesh))

  return feature_fn


def labelled_features(feature_fn, variables,
                      batches: Iterable[dict]) -> tuple[np.ndarray, np.ndarray, set[int]]:
  """Features (n, D) and labels (n,) of the valid rows of `batches`, in global order,
  and the source indices of the rows that could not be decoded.

  `batches` are eval-loader batches ({"image", "label", "valid", "bad"}, this process's
  rows of each global batch, all of the same size). Rows with valid False (padding, or
  an unreadable example) are left out. Only features and labels are kept, so memory
  grows with the feature size, not the image size.
  """
  features, labels, bad = [], [], set()
  for batch in batches:
    rows = np.asarray(feature_fn(variables, batch["image"]))
    info = parallel.global_rows(np.stack([batch["label"], batch["valid"], batch["bad"]], -1)
                                .astype(np.int64))
    valid = info[:, 1].astype(bool)
    features.append(rows[valid])
    labels.append(info[valid, 0].astype(np.int32))
    bad.update(int(i) for i in info[:, 2] if i >= 0)
  if not features:
    raise ValueError("labelled_features: no batches")
  return np.concatenate(features), np.concatenate(labels), bad


# ---------------------------------------------------------------------------------------
# Linear probe


@flax.struct.dataclass
class LinearState:
  """Linear-probe state (one pytree; a checkpoint of it is complete).

  step:                steps done so far (int32); drives the LR schedule.
  params:              the head {"kernel": (D, num_classes), "bias": (num_classes,)}.
  opt_state:           optax state of the head.
  rng:                 raw key data (uint32); step randomness is fold_in(rng, step).
  encoder_params:      the frozen backbone's params (never updated).
  encoder_batch_stats: its BatchNorm running statistics ({} without BatchNorm); they
                       update during training in the "bn" variant, as PyTorch's do.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  encoder_params: Any
  encoder_batch_stats: Any


def _head(num_classes: int) -> layers.Dense:
  return layers.dense(num_classes, "head", jnp.float32)


def _check_linear_config(config, num_devices: int) -> None:
  batch = config.data.batch_size
  if batch <= 0 or batch % num_devices:
    raise ValueError(f"data.batch_size ({batch}, the global batch) must be positive and "
                     f"divisible by the number of devices ({num_devices})")
  if config.linear.num_classes <= 0:
    raise ValueError(f"linear.num_classes must be positive, got {config.linear.num_classes}")
  if config.optim.name != "sgd":
    raise ValueError(f"the linear probe trains with optim.name='sgd' (SPEC §4), got "
                     f"{config.optim.name!r}")
  optim.check_schedule(config)


def _init_linear_state(config, encoder_variables, rng) -> LinearState:
  encoder = build_encoder(config.model)
  init_rng, step_rng = jax.random.split(rng)
  params = _head(config.linear.num_classes).init(
      init_rng, jnp.zeros((1, encoder.num_features), jnp.float32))["params"]
  return LinearState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=optim.make_optimizer(config).init(params),
                     rng=jax.random.key_data(step_rng),
                     encoder_params=encoder_variables["params"],
                     encoder_batch_stats=encoder_variables.get("batch_stats", {}))


def create_linear_state(config, encoder_variables, rng: jax.Array,
                        mesh: Mesh | None = None) -> LinearState:
  """A fresh probe on the encoder `encoder_variables` ({"params"(, "batch_stats")}).

  The head is Linear(feature dim, linear.num_classes), truncated normal 0.02 / bias 0,
  initialised from `rng`, which also seeds the step randomness (drop path). The state is
  replicated on `mesh` (default: all devices).
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  _check_linear_config(config, mesh.size)
  return jax.jit(functools.partial(_init_linear_state, config),
                 out_shardings=parallel.replicated(mesh))(encoder_variables, rng)


def _check_linear_batch(batch, config, image_hw) -> None:
  if set(batch) != {"image", "label"}:
    raise ValueError(f"a linear batch is {{'image', 'label'}}, got keys {sorted(batch)}")
  image = batch["image"]
  if tuple(image.shape[1:]) != (*image_hw, 3) or str(image.dtype) != "uint8":
    raise ValueError(f"batch['image'] must be uint8 (B, {image_hw[0]}, {image_hw[1]}, 3) "
                     f"crops at model.img_size, got {image.dtype} {tuple(image.shape)}")
  if len(batch["label"]) != len(image):
    raise ValueError(f"batch['label'] has {len(batch['label'])} rows, batch['image'] "
                     f"{len(image)}")


def linear_step(state: LinearState, batch, *, config, encoder,
                tx: optax.GradientTransformation) -> tuple[LinearState, dict]:
  """One probe step on the global batch {"image": uint8 crops, "label": int32}.

  Metrics (replicated scalars): loss (label-smoothed CE), lr, grad_norm (before
  clipping), top1 (train accuracy of the batch, percent), skipped (1 if the loss or
  gradient was non-finite: then only `step` advances).
  """
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  variables = _encoder_variables(state.encoder_params, state.encoder_batch_stats)
  features, batch_stats = _features(encoder, variables, batch["image"], train=True, rng=rng)
  features = jax.lax.stop_gradient(features)
  num_classes = config.linear.num_classes
  targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], num_classes),
                                config.linear.label_smoothing)
  head = _head(num_classes)

  def loss_fn(params):
    logits = head.apply({"params": params}, features)
    return jnp.mean(optax.softmax_cross_entropy(logits, targets)), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.tree.norm(grads)
  lr = optim.lr_schedule(config)(state.step)
  opt_state = optim.set_learning_rate(state.opt_state, lr)
  updates, opt_state = tx.update(grads, opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new = dict(params=params, opt_state=opt_state, encoder_batch_stats=batch_stats)
  kept = {k: getattr(state, k) for k in new}
  new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, kept)
  top1 = 100.0 * jnp.mean((jnp.argmax(logits, axis=-1) == batch["label"]).astype(jnp.float32))
  metrics = dict(loss=loss, lr=lr, grad_norm=grad_norm, top1=top1,
                 skipped=(~finite).astype(jnp.int32))
  return state.replace(**new, step=state.step + 1), metrics


def make_linear_step(config, mesh: Mesh | None = None):
  """A jitted `step(state, batch) -> (state, metrics)` for the probe on `mesh`.

  `batch` is {"image": uint8 (B, H, W, 3) train crops, "label": int32 (B,)}: host numpy
  (this process's slice of the global batch) or global jax arrays. The optimizer is
  `optim.make_optimizer(config)` (optim.name "sgd") with `optim.lr_schedule(config)`.
  The old state is donated: do not reuse it.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  _check_linear_config(config, mesh.size)
  encoder = build_encoder(config.model)
  step_fn = functools.partial(linear_step, config=config, encoder=encoder,
                              tx=optim.make_optimizer(config))
  rep = parallel.replicated(mesh)
  jitted = jax.jit(step_fn, in_shardings=(rep, parallel.batch_sharding(mesh)),
                   out_shardings=(rep, rep), donate_argnums=0)

  def step(state: LinearState, batch: dict[str, Any]):
    _check_linear_batch(batch, config, encoder.image_hw)
    return jitted(state, parallel.to_global(batch, mesh))

  step.jitted = jitted
  return step


def make_linear_eval(config, mesh: Mesh | None = None):
  """A jitted `fn(state, images, labels) -> (top1_correct, top5_correct)` int32 counts.

  Eval mode (running statistics, no drop path); images uint8 (B, H, W, 3) resized and
  centre-cropped by the host. Rows with a negative label (padding) count as neither.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  encoder = build_encoder(config.model)
  head = _head(config.linear.num_classes)
  top = min(5, config.linear.num_classes)

  def eval_fn(state, images, labels):
    variables = _encoder_variables(state.encoder_params, state.encoder_batch_stats)
    features, _ = _features(encoder, variables, images)
    logits = head.apply({"params": state.params}, features)
    _, ranked = jax.lax.top_k(logits, top)
    valid = labels >= 0
    top1 = jnp.sum((ranked[:, 0] == labels) & valid)
    top5 = jnp.sum(jnp.any(ranked == labels[:, None], axis=1) & valid)
    return top1.astype(jnp.int32), top5.astype(jnp.int32)

  rep, shard = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  jitted = jax.jit(eval_fn, in_shardings=(rep, shard, shard), out_shardings=(rep, rep))

  def evaluate(state: LinearState, images, labels):
    images, labels = parallel.to_global((images, labels), mesh)
    return jitted(state, images, labels)

  return evaluate
