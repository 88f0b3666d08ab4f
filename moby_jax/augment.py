"""MoBY's per-pixel view augmentations (SPEC §3), run on the accelerator inside the step.

The host decodes, random-resized-crops and flips (DESIGN principle 5) and hands over
uint8 crops (B, H, W, 3); everything here is a pure, jit-able function of (images, rng)
in float32, with pixel values in [0, 1] until `normalize`.

`view_augment` = `sample_decisions` (every random choice for a batch: which ops fire,
their factors, the jitter order; one set per image, as torchvision's per-sample
transforms draw them) + `apply_decisions` (deterministic pixel math).

Where the released PIL/torchvision pipeline is not a function of floats, we choose:
- no requantisation to uint8 between ops (PIL rounds after each); values stay float32;
- grayscale luma 0.299 R + 0.587 G + 0.114 B (ITU-R 601, PIL's "L" conversion);
- contrast blends with the unrounded mean luma of the image;
- solarize inverts x >= 0.5, which on inputs k/255 is exactly "pixel >= 128";
- blur is the exact truncated Gaussian (BYOL / torchvision form), separable, with
  reflect padding and a kernel of ~10% of the image side (23 px at 224).

Ops that fire for only some images are computed for all and picked with `jnp.where`:
shapes stay static and nothing is gathered. Under `vmap` a `lax.switch` on a per-image
index does the same (every branch runs, one is selected), so the random jitter order
costs 4 evaluations of each op; cheap next to the backbone.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.299, 0.587, 0.114)

# SPEC §3, both views.
JITTER_PROB = 0.8
JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
GRAY_PROB = 0.2
SIGMA_RANGE = (0.1, 2.0)  # blur std, pixels
# SPEC §3, the asymmetric part.
VIEW1 = dict(blur_prob=1.0, solarize_prob=0.0)
VIEW2 = dict(blur_prob=0.1, solarize_prob=0.2)


def _per_image(factor, trailing: int):
  """A scalar or (...,) factor as float32, with `trailing` unit axes to broadcast."""
  factor = jnp.asarray(factor, jnp.float32)
  return factor.reshape(factor.shape + (1,) * trailing)


def normalize(images):
  """(..., 3) floats in [0, 1] -> (x - MEAN) / STD, float32."""
  x = jnp.asarray(images).astype(jnp.float32)
  return (x - jnp.asarray(MEAN, jnp.float32)) / jnp.asarray(STD, jnp.float32)


def _luma(images):
  """(..., H, W, 3) -> (..., H, W) grayscale value."""
  # An explicit weighted sum, not `images @ w`: accelerators may run fp32 matmuls at
  # reduced precision by default.
  r, g, b = images[..., 0], images[..., 1], images[..., 2]
  return GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b


def grayscale(images):
  """(..., H, W, 3) -> luma replicated on the 3 channels."""
  return jnp.broadcast_to(_luma(images)[..., None], images.shape)


def solarize(images):
  """Floats in [0, 1]: x -> 1 - x where x >= 0.5 (on k/255 inputs: k >= 128)."""
  return jnp.where(images >= 0.5, 1.0 - images, images)


# Colour jitter. Each op takes (..., H, W, 3) floats in [0, 1] and a factor that is a
# scalar or one per leading index (e.g. (B,)), and clips its result to [0, 1]
# (torchvision ColorJitter semantics).

def adjust_brightness(images, factor):
  """x * factor, clipped."""
  return jnp.clip(images * _per_image(factor, 3), 0.0, 1.0)


def adjust_contrast(images, factor):
  """Blend with the image's mean luma: c * x + (1 - c) * mean(gray), clipped."""
  mean = jnp.mean(_luma(images), axis=(-2, -1))[..., None, None, None]
  c = _per_image(factor, 3)
  return jnp.clip(c * images + (1.0 - c) * mean, 0.0, 1.0)


def adjust_saturation(images, factor):
  """Blend with the grayscale image: s * x + (1 - s) * gray, clipped."""
  s = _per_image(factor, 3)
  return jnp.clip(s * images + (1.0 - s) * _luma(images)[..., None], 0.0, 1.0)


def _rgb_to_hsv(images):
  """(..., 3) RGB in [0, 1] -> h (turns, [0, 1)), s, v, each (...)."""
  r, g, b = images[..., 0], images[..., 1], images[..., 2]
  v = jnp.maximum(jnp.maximum(r, g), b)
  chroma = v - jnp.minimum(jnp.minimum(r, g), b)
  s = chroma / jnp.where(v > 0, v, 1.0)  # black: s = 0
  c = jnp.where(chroma > 0, chroma, 1.0)  # gray: every difference below is 0, so h = 0
  # Hue in sixths of a turn, by which channel is the max (ties: r, then g, then b).
  h6 = jnp.where(v == r, (g - b) / c,
                 jnp.where(v == g, 2.0 + (b - r) / c, 4.0 + (r - g) / c))
  return jnp.mod(h6 / 6.0, 1.0), s, v


def _hsv_to_rgb(h, s, v):
  """h (turns, [0, 1)), s, v in [0, 1], each (...) -> (..., 3) RGB."""
  h6 = h * 6.0
  sector = jnp.floor(h6)
  f = h6 - sector
  sector = sector.astype(jnp.int32) % 6
  p, q, t = v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f))
  # (r, g, b) per sector 0..5 of the hue circle.
  table = ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))
  cases = [sector == i for i in range(5)]  # sector 5 is the default
  return jnp.stack([jnp.select(cases, [row[ch] for row in table[:5]], table[5][ch])
                    for ch in range(3)], axis=-1)


def adjust_hue(images, shift):
  """Rotates the HSV hue by `shift` turns (ColorJitter draws it in [-0.1, 0.1]), clipped."""
  h, s, v = _rgb_to_hsv(images)
  h = jnp.mod(h + _per_image(shift, 2), 1.0)
  return jnp.clip(_hsv_to_rgb(h, s, v), 0.0, 1.0)


# Index k of a jitter order means _JITTER_OPS[k] with factors[..., k].
_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def _jitter_one(image, factors, order):
  """One (H, W, 3) image through the four ops; factors (4,), order (4,) a permutation."""
  def body(i, x):
    k = order[i]
    return jax.lax.switch(k, _JITTER_OPS, x, factors[k])
  return jax.lax.fori_loop(0, 4, body, image)


def apply_color_jitter(images, factors, order):
  """(B, H, W, 3) in [0, 1] -> jittered, each image with its own factors and op order.

  factors: (B, 4) float32 brightness, contrast, saturation (multipliers), hue (turns).
  order: (B, 4) int32, a permutation of 0..3 per image: the ops (indices into factors)
  in the order they are applied.
  """
  return jax.vmap(_jitter_one)(images, factors, order)


def _jitter_params(rng, batch: int, brightness, contrast, saturation, hue):
  """Per-image factors (B, 4) and order (B, 4) as torchvision's ColorJitter draws them."""
  k_factors, k_order = jax.random.split(rng)
  lo = jnp.stack([jnp.maximum(0.0, 1.0 - brightness), jnp.maximum(0.0, 1.0 - contrast),
                  jnp.maximum(0.0, 1.0 - saturation), -jnp.asarray(hue, jnp.float32)])
  hi = jnp.stack([1.0 + jnp.asarray(brightness, jnp.float32), 1.0 + contrast,
                  1.0 + saturation, jnp.asarray(hue, jnp.float32)])
  factors = jax.random.uniform(k_factors, (batch, 4), jnp.float32, lo, hi)
  # The argsort of i.i.d. uniforms is a uniformly random permutation, one per row.
  order = jnp.argsort(jax.random.uniform(k_order, (batch, 4)), axis=-1).astype(jnp.int32)
  return factors, order


def color_jitter(images, rng, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
  """(B, H, W, 3) in [0, 1] -> ColorJitter applied to every image, per-image draws.

  Factors ~ U[max(0, 1 - a), 1 + a] for brightness/contrast/saturation strength a, hue
  shift ~ U[-hue, hue] turns; the four ops run in a random order per image.
  """
  factors, order = _jitter_params(rng, images.shape[0], brightness, contrast, saturation, hue)
  return apply_color_jitter(images, factors, order)


def default_kernel_size(size: int) -> int:
  """Odd blur kernel side for an image side of `size` px: ~10%, 23 at 224 (BYOL)."""
  return int(0.1 * size) // 2 * 2 + 1


def gaussian_kernel(sigma, kernel_size: int):
  """(...,) std in pixels -> (..., kernel_size) taps exp(-x^2 / (2 sigma^2)), summing to 1."""
  x = jnp.arange(kernel_size, dtype=jnp.float32) - kernel_size // 2
  sigma = jnp.asarray(sigma, jnp.float32)[..., None]
  taps = jnp.exp(-0.5 * jnp.square(x / sigma))
  return taps / jnp.sum(taps, axis=-1, keepdims=True)


def _blur_axis(image, kernel, axis: int):
  """1-D correlation of one (H, W, 3) image with `kernel` (K,) along `axis`, reflect-padded."""
  n, r = image.shape[axis], kernel.shape[0] // 2
  pad = [(0, 0)] * image.ndim
  pad[axis] = (r, r)
  padded = jnp.pad(image, pad, mode="reflect")  # edge pixel not repeated, as torchvision
  # One shifted copy per tap: XLA fuses the K multiply-adds; exact fp32, no conv layouts.
  return sum(kernel[t] * jax.lax.slice_in_dim(padded, t, t + n, axis=axis)
             for t in range(kernel.shape[0]))


def gaussian_blur(images, sigma, kernel_size: int | None = None):
  """(B, H, W, 3) blurred with a separable Gaussian of std `sigma` (B,) pixels per image.

  kernel_size: odd; default `default_kernel_size(H)` (23 for 224 px, 1 = no-op below 20).
  """
  if kernel_size is None:
    kernel_size = default_kernel_size(images.shape[-3])
  if kernel_size < 1 or kernel_size % 2 == 0:
    raise ValueError(f"gaussian_blur: kernel_size must be odd and positive, got {kernel_size}")

  def one(image, s):
    kernel = gaussian_kernel(s, kernel_size)
    return _blur_axis(_blur_axis(image, kernel, 0), kernel, 1)

  return jax.vmap(one)(images, jnp.asarray(sigma, jnp.float32))


class Decisions(NamedTuple):
  """Every random choice for a batch of B images of one view (SPEC §3)."""
  jitter: jax.Array    # (B,) bool: colour jitter applied
  factors: jax.Array   # (B, 4) float32: brightness, contrast, saturation, hue (turns)
  order: jax.Array     # (B, 4) int32: jitter ops in application order (indices into factors)
  gray: jax.Array      # (B,) bool
  blur: jax.Array      # (B,) bool
  sigma: jax.Array     # (B,) float32: blur std, pixels
  solarize: jax.Array  # (B,) bool


def sample_decisions(rng, batch: int, blur_prob, solarize_prob) -> Decisions:
  """Draws the per-image decisions of one view; jitter p=0.8 and grayscale p=0.2 fixed."""
  k_jitter, k_params, k_gray, k_blur, k_sigma, k_solarize = jax.random.split(rng, 6)

  # Each flag compares its own uniform with its probability, so changing one probability
  # under the same key flips only that op's flags (the tests rely on it).
  def fires(key, prob):
    return jax.random.uniform(key, (batch,)) < prob

  factors, order = _jitter_params(k_params, batch, **JITTER)
  sigma = jax.random.uniform(k_sigma, (batch,), jnp.float32, *SIGMA_RANGE)
  return Decisions(jitter=fires(k_jitter, JITTER_PROB), factors=factors, order=order,
                   gray=fires(k_gray, GRAY_PROB), blur=fires(k_blur, blur_prob), sigma=sigma,
                   solarize=fires(k_solarize, solarize_prob))


def apply_decisions(images, decisions: Decisions, kernel_size: int | None = None):
  """(B, H, W, 3) in [0, 1] -> jitter, grayscale, blur, solarize as decided; in [0, 1]."""
  def pick(flag, new, old):
    return jnp.where(flag[:, None, None, None], new, old)

  d = decisions
  x = pick(d.jitter, apply_color_jitter(images, d.factors, d.order), images)
  x = pick(d.gray, grayscale(x), x)
  x = pick(d.blur, gaussian_blur(x, d.sigma, kernel_size), x)
  return pick(d.solarize, solarize(x), x)


def view_augment(images_uint8, rng, *, blur_prob, solarize_prob):
  """uint8 (B, H, W, 3) crops -> one augmented, normalised float32 view (B, H, W, 3)."""
  x = jnp.asarray(images_uint8).astype(jnp.float32) / 255.0
  decisions = sample_decisions(rng, x.shape[0], blur_prob, solarize_prob)
  return normalize(apply_decisions(x, decisions))


def two_views(view1_uint8, view2_uint8, rng):
  """The asymmetric pair (SPEC §3): view 1 blur p=1, no solarize; view 2 blur p=0.1,
  solarize p=0.2. uint8 (B, H, W, 3) each -> two float32 normalised (B, H, W, 3).

  Keys: `jax.random.split(rng)` gives view 1's, then view 2's.
  """
  k1, k2 = jax.random.split(rng)
  return view_augment(view1_uint8, k1, **VIEW1), view_augment(view2_uint8, k2, **VIEW2)
