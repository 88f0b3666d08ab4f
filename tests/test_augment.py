"""View augmentations (SPEC §3): op formulas against numpy, decision statistics, wiring."""

import colorsys
import itertools

import jax
import numpy as np
import pytest

from moby_jax import augment

MEAN = np.array(augment.MEAN, np.float64)
STD = np.array(augment.STD, np.float64)

# Keyword arguments are traced by jit, so both views share one compilation per shape.
view_augment = jax.jit(augment.view_augment)
two_views = jax.jit(augment.two_views)
sample_decisions = jax.jit(augment.sample_decisions, static_argnums=1)
apply_decisions = jax.jit(augment.apply_decisions)

STATS_BATCH = 4096  # binomial std of a p=0.2 fraction: 0.006


def colourful(seed: int, shape) -> np.ndarray:
  """Uniform random uint8 RGB: every image has strongly coloured pixels."""
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def unnormalize(view) -> np.ndarray:
  return np.asarray(view, np.float64) * STD + MEAN


def assert_rate(name, flags, p, n_sigma=5.0):
  """The fraction of True in `flags` is p within n_sigma binomial standard deviations."""
  flags = np.asarray(flags)
  rate = flags.mean()
  tol = n_sigma * np.sqrt(p * (1 - p) / flags.size) if 0 < p < 1 else 0.0
  assert abs(rate - p) <= tol, f"{name}: rate {rate:.4f}, expected {p} +- {tol:.4f}"


# Independent numpy references (float64; colorsys for hue).

def np_luma(x):
  return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]


def np_brightness(x, b):
  return np.clip(x * b, 0, 1)


def np_contrast(x, c):
  return np.clip(c * x + (1 - c) * np_luma(x).mean(), 0, 1)


def np_saturation(x, s):
  return np.clip(s * x + (1 - s) * np_luma(x)[..., None], 0, 1)


def np_hue(x, shift):
  out = np.empty_like(x)
  for idx in np.ndindex(x.shape[:-1]):
    h, s, v = colorsys.rgb_to_hsv(*x[idx])
    out[idx] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
  return out


NP_JITTER = (np_brightness, np_contrast, np_saturation, np_hue)


def np_blur(image, sigma, k):
  """Separable Gaussian blur of one (H, W, C) image, reflect padding, float64."""
  x = np.arange(k) - k // 2
  taps = np.exp(-x ** 2 / (2 * sigma ** 2))
  taps /= taps.sum()
  r = k // 2
  padded = np.pad(image, ((r, r), (r, r), (0, 0)), mode="reflect")
  h, w = image.shape[:2]
  rows = sum(taps[t] * padded[t:t + h] for t in range(k))
  return sum(taps[t] * rows[:, t:t + w] for t in range(k))


# Single ops.

def test_normalize_uses_mean_std():
  x = np.random.default_rng(0).random((2, 4, 4, 3)).astype(np.float32)
  out = augment.normalize(x)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, (x - MEAN) / STD, rtol=1e-6, atol=1e-6)


def test_solarize_threshold_is_128_of_255():
  x = (np.arange(256, dtype=np.float32) / 255).reshape(1, 16, 16, 1)
  expected = np.where(np.arange(256) >= 128, 1 - x.ravel(), x.ravel())
  np.testing.assert_array_equal(np.asarray(augment.solarize(x)).ravel(), expected)


def test_grayscale_weights():
  x = np.random.default_rng(1).random((2, 5, 5, 3)).astype(np.float32)
  out = np.asarray(augment.grayscale(x))
  np.testing.assert_allclose(out, np.repeat(np_luma(x)[..., None], 3, -1), atol=1e-6)
  red_green_blue = np.eye(3, dtype=np.float32).reshape(1, 1, 3, 3)
  np.testing.assert_allclose(augment.grayscale(red_green_blue)[0, 0, :, 0],
                             [0.299, 0.587, 0.114], atol=1e-7)


@pytest.mark.parametrize("kind", ["brightness", "contrast", "saturation"])
def test_blend_ops_match_formulas(kind):
  op = getattr(augment, f"adjust_{kind}")
  np_op = {"brightness": np_brightness, "contrast": np_contrast,
           "saturation": np_saturation}[kind]
  x = np.random.default_rng(2).random((4, 6, 6, 3)).astype(np.float32)
  factors = np.array([0.6, 1.0, 1.25, 1.4], np.float32)  # one per image
  out = np.asarray(op(x, factors))
  for i, f in enumerate(factors):
    np.testing.assert_allclose(out[i], np_op(x[i].astype(np.float64), f), atol=1e-6)
  # A scalar factor on one image is the same computation.
  np.testing.assert_allclose(op(x[1], factors[1]), out[1], atol=1e-7)


def test_hue():
  x = np.random.default_rng(3).random((2, 5, 5, 3)).astype(np.float32)
  np.testing.assert_allclose(augment.adjust_hue(x, 0.0), x, atol=2e-6)
  red = np.array([1, 0, 0], np.float32).reshape(1, 1, 1, 3)
  np.testing.assert_allclose(augment.adjust_hue(red, 1 / 3).ravel(), [0, 1, 0], atol=1e-6)
  np.testing.assert_allclose(augment.adjust_hue(red, -1 / 3).ravel(), [0, 0, 1], atol=1e-6)
  shifts = np.array([-0.1, 0.07], np.float32)
  out = np.asarray(augment.adjust_hue(x, shifts))
  for i, s in enumerate(shifts):
    np.testing.assert_allclose(out[i], np_hue(x[i].astype(np.float64), float(s)), atol=1e-5)


def test_jitter_applies_ops_in_each_images_own_order():
  # All 24 orders on copies of one image, strong factors so that order matters (clipping).
  perms = np.array(list(itertools.permutations(range(4))), np.int32)
  x = np.random.default_rng(4).random((6, 6, 3)).astype(np.float32)
  factors = np.array([1.4, 0.6, 1.2, 0.08], np.float32)
  out = np.asarray(augment.apply_color_jitter(
      np.broadcast_to(x, (24,) + x.shape), np.tile(factors, (24, 1)), perms))
  for i, perm in enumerate(perms):
    y = x.astype(np.float64)
    for k in perm:
      y = NP_JITTER[k](y, float(factors[k]))
    np.testing.assert_allclose(out[i], y, atol=2e-5, err_msg=f"order {perm}")
  assert len({o.round(4).tobytes() for o in out}) > 12  # the order really changes results


def test_color_jitter_strength_zero_is_identity():
  x = np.random.default_rng(5).random((3, 6, 6, 3)).astype(np.float32)
  key = jax.random.key(0)
  np.testing.assert_allclose(augment.color_jitter(x, key, 0.0, 0.0, 0.0, 0.0), x, atol=2e-6)
  assert np.abs(np.asarray(augment.color_jitter(x, key)) - x).max() > 0.01


def test_gaussian_kernel():
  assert augment.default_kernel_size(224) == 23
  assert augment.default_kernel_size(32) == 3
  sigmas = np.array([0.1, 0.7, 2.0], np.float32)
  k = np.asarray(augment.gaussian_kernel(sigmas, 23))
  assert k.shape == (3, 23)
  np.testing.assert_allclose(k.sum(-1), 1.0, atol=1e-6)
  x = np.arange(23) - 11
  for s, row in zip(sigmas, k):
    expected = np.exp(-x ** 2 / (2 * float(s) ** 2))
    np.testing.assert_allclose(row, expected / expected.sum(), atol=1e-7)


def test_gaussian_blur():
  const = np.full((2, 24, 24, 3), 0.3, np.float32)
  sigma = np.array([0.5, 2.0], np.float32)
  np.testing.assert_allclose(augment.gaussian_blur(const, sigma), const, atol=1e-6)
  x = np.random.default_rng(6).random((2, 24, 20, 3)).astype(np.float32)
  out = np.asarray(augment.gaussian_blur(x, sigma, kernel_size=7))
  for i in range(2):
    np.testing.assert_allclose(out[i], np_blur(x[i].astype(np.float64), sigma[i], 7), atol=1e-6)
  with pytest.raises(ValueError, match="odd"):
    augment.gaussian_blur(x, sigma, kernel_size=6)


# The composed views.

def test_two_views_shapes_dtypes_ranges():
  x = colourful(0, (64, 32, 32, 3))
  v1, v2 = two_views(x, x, jax.random.key(0))
  for v in (v1, v2):
    assert v.shape == x.shape and v.dtype == np.float32
    u = unnormalize(v)
    assert u.min() >= -1e-5 and u.max() <= 1 + 1e-5
  assert np.abs(np.asarray(v1) - np.asarray(v2)).max() > 0.1  # same input, different views


def test_determinism():
  x = colourful(1, (64, 32, 32, 3))
  a = two_views(x, x, jax.random.key(7))
  b = two_views(x, x, jax.random.key(7))
  c = two_views(x, x, jax.random.key(8))
  for va, vb, vc in zip(a, b, c):
    np.testing.assert_array_equal(va, vb)
    assert not np.array_equal(va, vc)


def test_two_views_uses_the_spec_settings():
  assert augment.VIEW1 == dict(blur_prob=1.0, solarize_prob=0.0)
  assert augment.VIEW2 == dict(blur_prob=0.1, solarize_prob=0.2)
  x1, x2 = colourful(2, (64, 32, 32, 3)), colourful(3, (64, 32, 32, 3))
  key = jax.random.key(3)
  v1, v2 = two_views(x1, x2, key)
  k1, k2 = jax.random.split(key)
  np.testing.assert_array_equal(v1, view_augment(x1, k1, **augment.VIEW1))
  np.testing.assert_array_equal(v2, view_augment(x2, k2, **augment.VIEW2))


def test_view_augment_is_sample_then_apply():
  x = colourful(4, (64, 32, 32, 3))
  key = jax.random.key(4)
  d = sample_decisions(key, 64, 0.1, 0.2)
  expected = augment.normalize(apply_decisions(x.astype(np.float32) / 255, d))
  # Not bitwise: the two compilations fuse (and so round) differently.
  np.testing.assert_allclose(view_augment(x, key, blur_prob=0.1, solarize_prob=0.2),
                             expected, atol=2e-5)


@pytest.mark.parametrize("op", ["blur", "solarize"])
def test_optional_ops_follow_their_flags(op):
  # Same key, only this op's probability changed: images flagged at p=0.2 look exactly
  # like the p=1 output, the others like the p=0 output, and the op changes images.
  x = colourful(5, (64, 32, 32, 3))
  key = jax.random.key(5)

  def run(p):
    probs = dict(blur_prob=0.0, solarize_prob=0.0)
    probs[f"{op}_prob"] = p  # same compilation: the probabilities are traced
    return np.asarray(view_augment(x, key, **probs))

  never, sometimes, always = run(0.0), run(0.2), run(1.0)
  probs = (0.2, 0.0) if op == "blur" else (0.0, 0.2)
  flags = np.asarray(getattr(sample_decisions(key, 64, *probs), op))
  assert 0 < flags.sum() < 64
  np.testing.assert_array_equal(sometimes[flags], always[flags])
  np.testing.assert_array_equal(sometimes[~flags], never[~flags])
  # Nearly all: a blur with sigma below ~0.15 px is an exact no-op in float32.
  assert (np.abs(always - never).max(axis=(1, 2, 3)) > 0).mean() > 0.9


@pytest.mark.parametrize("view", ["view1", "view2"])
def test_decision_statistics(view):
  probs = augment.VIEW1 if view == "view1" else augment.VIEW2
  d = jax.tree.map(np.asarray, sample_decisions(jax.random.key(11), STATS_BATCH, **probs))
  assert_rate("jitter", d.jitter, 0.8)
  assert_rate("grayscale", d.gray, 0.2)
  assert_rate("blur", d.blur, probs["blur_prob"])
  assert_rate("solarize", d.solarize, probs["solarize_prob"])
  lo, hi = [0.6, 0.6, 0.8, -0.1], [1.4, 1.4, 1.2, 0.1]
  assert (d.factors >= lo).all() and (d.factors <= hi).all()
  np.testing.assert_allclose(d.factors.mean(0), [1, 1, 1, 0], atol=0.02)
  assert (np.sort(d.order, axis=1) == np.arange(4)).all()  # permutations
  for pos in range(4):  # each op is equally likely at each position
    np.testing.assert_allclose(np.bincount(d.order[:, pos], minlength=4) / STATS_BATCH,
                               0.25, atol=5 * np.sqrt(0.25 * 0.75 / STATS_BATCH))
  assert d.sigma.min() >= 0.1 and d.sigma.max() <= 2.0
  assert abs(d.sigma.mean() - 1.05) < 0.05


@pytest.mark.parametrize("view", ["view1", "view2"])
def test_output_signatures_match_decisions(view):
  # 16 px images: the default blur kernel is 1 tap (identity), so an image that is not
  # jittered, grayed or solarised must come out exactly as it went in.
  probs = augment.VIEW1 if view == "view1" else augment.VIEW2
  x = colourful(6, (STATS_BATCH, 16, 16, 3))
  key = jax.random.key(12)
  out = unnormalize(view_augment(x, key, **probs))
  d = jax.tree.map(np.asarray, sample_decisions(key, STATS_BATCH, **probs))

  spread = (out.max(-1) - out.min(-1)).max(axis=(1, 2))  # largest channel difference
  looks_gray = spread < 1e-5
  np.testing.assert_array_equal(looks_gray, d.gray)
  assert_rate("grayscale (measured)", looks_gray, 0.2)

  # Solarised images have no value above 0.5; colourful inputs rarely end up so dark.
  dark = out.max(axis=(1, 2, 3)) <= 0.5 + 1e-5
  assert dark[d.solarize].all()
  assert dark[~d.solarize].mean() < 0.02

  plain = ~d.gray & ~d.solarize
  unchanged = np.abs(out - x / 255).max(axis=(1, 2, 3)) < 1e-5
  np.testing.assert_array_equal(unchanged[plain], ~d.jitter[plain])
  assert_rate("jitter (measured)", ~unchanged[plain], 0.8)
