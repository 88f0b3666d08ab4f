"""kNN, feature extraction and the linear probe (moby_jax/evaluate.py).

The kNN is checked against a brute-force numpy version and hand-made cases; the linear
step against an independent PyTorch head (SGD Nesterov, label-smoothed CE, clipping) on
the same features.
"""

import jax
import numpy as np
import pytest
import torch

from configs import moby_swin_tiny
from moby_jax import augment, evaluate, optim, parallel
from moby_jax.models import build_encoder, init_encoder


def one_device_mesh():
  return parallel.make_mesh(jax.devices()[:1])


# ---------------------------------------------------------------------------------------
# kNN


def knn_numpy(train, train_labels, test, test_labels, num_classes, k, temperature):
  """Brute force: every test row against every train row, float64."""
  train = train / np.linalg.norm(train, axis=1, keepdims=True)
  test = test / np.linalg.norm(test, axis=1, keepdims=True)
  top1 = top5 = 0
  for row, label in zip(test, test_labels):
    sim = train.astype(np.float64) @ row
    nearest = np.argsort(-sim)[:k]
    votes = np.zeros(num_classes)
    for j in nearest:
      votes[train_labels[j]] += np.exp(sim[j] / temperature)
    ranked = np.argsort(-votes, kind="stable")
    top1 += ranked[0] == label
    top5 += label in ranked[:5]
  return 100.0 * top1 / len(test), 100.0 * top5 / len(test)


def test_knn_matches_brute_force():
  rng = np.random.default_rng(0)
  num_classes, dim = 7, 16
  centres = rng.normal(size=(num_classes, dim))
  train_labels = rng.integers(0, num_classes, 300)
  test_labels = rng.integers(0, num_classes, 45)
  train = centres[train_labels] + 1.5 * rng.normal(size=(300, dim))
  test = centres[test_labels] + 1.5 * rng.normal(size=(45, dim))
  for k, temperature in ((20, 0.07), (5, 0.5)):
    want = knn_numpy(train, train_labels, test, test_labels, num_classes, k, temperature)
    # chunk_size 16: three chunks, the last one padded.
    got = evaluate.knn_classify(train, train_labels, test, test_labels, num_classes, k=k,
                                temperature=temperature, chunk_size=16)
    assert (got["top1"], got["top5"]) == pytest.approx(want)
    assert 0 < got["top1"] < got["top5"] < 100


def unit(degrees):
  return [np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))]


def test_knn_votes_are_weighted_by_similarity():
  # One close neighbour of class 1 against two farther ones of class 0.
  train = np.array([unit(10), unit(60), unit(-60)])
  labels = np.array([1, 0, 0])
  test = np.array([unit(0)])
  sharp = evaluate.knn_classify(train, labels, test, [1], 2, k=3, temperature=0.07)
  flat = evaluate.knn_classify(train, labels, test, [1], 2, k=3, temperature=100.0)
  assert sharp["top1"] == 100.0  # exp(cos 10 / T) beats 2 exp(cos 60 / T)
  assert flat["top1"] == 0.0     # nearly equal weights: two votes beat one


def test_knn_only_the_k_nearest_vote_and_k_is_capped():
  train = np.array([unit(5), unit(50), unit(55), unit(60)])
  labels = np.array([1, 0, 0, 0])
  test = np.array([unit(0)])
  assert evaluate.knn_classify(train, labels, test, [1], 2, k=1)["top1"] == 100.0
  # k=4 covers all rows; k=50 is capped at 4 and gives the same answer.
  assert (evaluate.knn_classify(train, labels, test, [0], 2, k=4, temperature=10.0)
          == evaluate.knn_classify(train, labels, test, [0], 2, k=50, temperature=10.0))


def test_knn_ties_go_to_the_lower_class():
  train = np.array([unit(20), unit(-20)])  # equally similar to the test row
  labels = np.array([2, 1])
  test = np.array([unit(0), unit(0)])
  result = evaluate.knn_classify(train, labels, test, [1, 2], 3, k=2)
  assert result == {"top1": 50.0, "top5": 100.0}


def test_knn_top5():
  # Seven neighbours of seven classes, nearest first: class c is the (c+1)-th nearest.
  train = np.array([unit(5 * (c + 1)) for c in range(7)])
  labels = np.arange(7)
  test = np.array([unit(0)] * 3)
  result = evaluate.knn_classify(train, labels, test, [0, 4, 5], 7, k=7)
  assert result["top1"] == pytest.approx(100 / 3)
  assert result["top5"] == pytest.approx(200 / 3)  # class 5 is sixth: a top-5 miss


# ---------------------------------------------------------------------------------------
# Features


def linear_config(batch=8, num_classes=5, clip_grad=0.1, drop_path=0.0, norm="ln"):
  """The tiny Swin with a linear-probe schedule: 2 warm-up steps, 6 steps in all."""
  c = moby_swin_tiny.get_config("runlocal")
  c.model.update(drop_path_rate=drop_path, norm_before_mlp=norm)
  c.optim.update(name="sgd", base_lr=0.5, warmup_lr=0.05, min_lr=0.001, weight_decay=0.0,
                 clip_grad=clip_grad, reference_batch=batch)
  c.optim.momentum = 0.9
  c.data.batch_size = batch
  c.train.update(epochs=3, warmup_epochs=1, steps_per_epoch=2)
  c.linear = dict(num_classes=num_classes, label_smoothing=0.1)
  return c


def images(n, seed):
  return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def reference_features(config, variables, x):
  """Eval-mode features computed without evaluate.py: normalise, then the encoder."""
  model = build_encoder(config.model)
  return np.asarray(model.apply(variables, augment.normalize(x / 255.0), train=False))


def test_labelled_features_keep_only_the_valid_rows():
  config = linear_config()
  variables = init_encoder(build_encoder(config.model), jax.random.key(0))
  feature_fn = evaluate.make_feature_fn(config, one_device_mesh())
  x = images(24, seed=1)
  labels = np.arange(24, dtype=np.int32) % 5
  valid = np.ones(24, bool)
  valid[[3, 21, 22, 23]] = False  # an unreadable example (3) and the padding (21-23)
  bad = np.full(24, -1, np.int32)
  bad[3] = 3
  batches = [{"image": x[i:i + 8], "label": labels[i:i + 8], "valid": valid[i:i + 8],
              "bad": bad[i:i + 8]} for i in (0, 8, 16)]
  features, kept_labels, unreadable = evaluate.labelled_features(feature_fn, variables,
                                                                 batches)
  assert features.shape == (20, 32) and unreadable == {3}
  np.testing.assert_array_equal(kept_labels, labels[valid])
  np.testing.assert_allclose(features, reference_features(config, variables, x[valid]),
                             rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Linear probe


def batches(num_steps, batch, num_classes, seed=2):
  rng = np.random.default_rng(seed)
  return [{"image": images(batch, seed + i), "label": rng.integers(0, num_classes, batch)
           .astype(np.int32)} for i in range(num_steps)]


def test_linear_step_matches_pytorch():
  config = linear_config()
  mesh = one_device_mesh()
  variables = init_encoder(build_encoder(config.model), jax.random.key(0))
  state = evaluate.create_linear_state(config, variables, jax.random.key(1), mesh)
  head = torch.nn.Linear(32, config.linear.num_classes)
  with torch.no_grad():
    head.weight.copy_(torch.from_numpy(np.asarray(state.params["kernel"]).T.copy()))
    head.bias.copy_(torch.from_numpy(np.array(state.params["bias"])))
  assert np.abs(np.asarray(state.params["bias"])).max() == 0.0
  sgd = torch.optim.SGD(head.parameters(), lr=0.0, momentum=0.9, nesterov=True,
                        weight_decay=0.0)
  criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
  schedule = optim.lr_schedule(config)
  step = evaluate.make_linear_step(config, mesh)

  for i, batch in enumerate(batches(3, 8, config.linear.num_classes)):
    state, metrics = step(state, batch)
    # drop path 0 and LayerNorm: the training-mode backbone computes the eval features.
    features = torch.from_numpy(np.array(reference_features(config, variables, batch["image"])))
    labels = torch.from_numpy(batch["label"]).long()
    lr = float(schedule(i))
    for group in sgd.param_groups:
      group["lr"] = lr
    sgd.zero_grad()
    logits = head(features)
    loss = criterion(logits, labels)
    loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(head.parameters(), 0.1))
    assert grad_norm > 0.1  # the clipping is exercised
    sgd.step()

    assert float(metrics["lr"]) == pytest.approx(lr, rel=1e-6)
    assert float(metrics["loss"]) == pytest.approx(loss.item(), rel=1e-5)
    assert float(metrics["grad_norm"]) == pytest.approx(grad_norm, rel=1e-5)
    top1 = 100.0 * float((logits.argmax(1) == labels).float().mean())
    assert float(metrics["top1"]) == pytest.approx(top1)
    np.testing.assert_allclose(np.asarray(state.params["kernel"]),
                               head.weight.detach().numpy().T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state.params["bias"]),
                               head.bias.detach().numpy(), rtol=1e-5, atol=1e-6)
  assert int(state.step) == 3


def test_linear_step_keeps_the_encoder_frozen():
  # Drop path on: the backbone runs in training mode, yet its weights never change.
  config = linear_config(drop_path=0.5)
  mesh = one_device_mesh()
  variables = init_encoder(build_encoder(config.model), jax.random.key(0))
  before = jax.tree.map(np.array, variables)
  state = evaluate.create_linear_state(config, variables, jax.random.key(1), mesh)
  step = evaluate.make_linear_step(config, mesh)
  losses = []
  for batch in batches(2, 8, config.linear.num_classes):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert all(np.isfinite(losses))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.encoder_params),
               before["params"])
  assert state.encoder_batch_stats == {}
  # The caller's variables were copied into the (donated) state, not consumed by it.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables), before)


def test_bn_backbone_updates_running_statistics_only():
  config = linear_config(norm="bn")
  mesh = one_device_mesh()
  variables = init_encoder(build_encoder(config.model), jax.random.key(0))
  state = evaluate.create_linear_state(config, variables, jax.random.key(1), mesh)
  step = evaluate.make_linear_step(config, mesh)
  state, _ = step(state, batches(1, 8, config.linear.num_classes)[0])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.encoder_params),
               jax.device_get(variables["params"]))
  stats = jax.device_get(state.encoder_batch_stats)["layers_0"]["blocks_0"]["norm2"]
  assert int(stats["num_batches_tracked"]) == 1
  assert not np.allclose(stats["mean"], 0.0)


def test_linear_eval_counts_and_ignores_padding():
  config = linear_config(num_classes=7)
  mesh = one_device_mesh()
  variables = init_encoder(build_encoder(config.model), jax.random.key(0))
  state = evaluate.create_linear_state(config, variables, jax.random.key(1), mesh)
  x = images(8, seed=5)
  logits = (reference_features(config, variables, x) @ np.asarray(state.params["kernel"])
            + np.asarray(state.params["bias"]))
  ranked = np.argsort(-logits, axis=1)
  # Labels: 3 rows right at top-1, 2 rows at rank 3 (top-5 only), 1 row at rank 7
  # (a miss), 2 padding rows.
  labels = np.array([ranked[0, 0], ranked[1, 0], ranked[2, 0], ranked[3, 2], ranked[4, 2],
                     ranked[5, 6], -1, -1], np.int32)
  top1, top5 = evaluate.make_linear_eval(config, mesh)(state, x, labels)
  assert (int(top1), int(top5)) == (3, 5)


def test_linear_step_one_device_equals_eight():
  config = linear_config()
  variables = init_encoder(build_encoder(config.model), jax.random.key(0))
  results = []
  for mesh in (one_device_mesh(), parallel.make_mesh(jax.devices()[:8])):
    state = evaluate.create_linear_state(config, variables, jax.random.key(1), mesh)
    step = evaluate.make_linear_step(config, mesh)
    for batch in batches(2, 8, config.linear.num_classes):
      state, metrics = step(state, batch)
    results.append((jax.device_get(state.params), float(metrics["loss"])))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               results[0][0], results[1][0])
  assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)


def test_linear_batch_and_config_errors():
  config = linear_config()
  mesh = one_device_mesh()
  step = evaluate.make_linear_step(config, mesh)
  variables = init_encoder(build_encoder(config.model), jax.random.key(0))
  state = evaluate.create_linear_state(config, variables, jax.random.key(1), mesh)
  batch = batches(1, 8, config.linear.num_classes)[0]
  with pytest.raises(ValueError, match="uint8"):
    step(state, {**batch, "image": batch["image"].astype(np.float32)})
  with pytest.raises(ValueError, match="keys"):
    step(state, {"image": batch["image"]})
  config.optim.name = "adamw"
  with pytest.raises(ValueError, match="optim.name"):
    evaluate.make_linear_step(config, mesh)
