"""A small labelled image dataset generated procedurally: no download, same bytes everywhere.

Each image is a black-and-white texture: an anti-aliased binary pattern m(x, y) in [0, 1]
on a 32 x 32 canvas. The class is the kind of pattern; everything else is a nuisance drawn
independently of the class:

- scale: the pattern period, log-uniform in PERIOD (a factor of ~4.7);
- position and orientation: phase / centre, and a rotation jitter of +-ROTATION degrees
  (isotropic classes: any angle);
- polarity: white on black or black on white;
- lighting and sensor: a linear illumination gradient (+-ILLUMINATION), edge softness
  (EDGE) and additive Gaussian noise (NOISE).

Classes (all closed under horizontal flip, so that a flipped crop keeps its label, and
spatially stationary, so that a random crop keeps it too):
  0 horizontal stripes     1 vertical stripes      2 diagonal stripes (either diagonal)
  3 checkerboard           4 dot lattice           5 concentric rings
  6 grid lines             7 random blobs          8 pinwheel sectors
  9 zigzag stripes

Why these nuisances. A randomly initialised Swin pools local (8 x 8 px) responses, which
depend on the pattern's scale and polarity as much as on its kind, so its kNN accuracy
is about 50%. MoBY's random-resized crops zoom by up to ~2-3.5x and shift, which makes
scale and position useless for telling two views apart, so pre-training learns the kind
of pattern (kNN ~80% after ~800 steps of the quick start). Colour and grey-level
nuisances were tried and left out on purpose: any per-image colour or brightness survives
MoBY's colour jitter well enough to be a shortcut for matching views, and the tiny
quick-start model then learns it instead of the pattern (kNN falls below the random
encoder's).

`load(split)` generates the split on first use (a fixed seed per split, its own
`np.random.Generator`, float64 maths, rounding to uint8 at the end; 1-3 s for both
splits on one CPU core) and caches it. Classes are balanced and the order is shuffled.
"""

import functools

import numpy as np

CLASS_NAMES = ("hstripes", "vstripes", "diagonal", "checker", "dots", "rings", "grid",
               "blobs", "pinwheel", "zigzag")
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 32  # stored side, px
SPLITS = {"train": (500, 1234), "val": (100, 5678)}  # images per class, seed

PERIOD = (3.0, 14.0)      # pattern period, px (log-uniform)
ROTATION = 12.0           # +- degrees of jitter around the class's orientation
EDGE = (0.7, 1.5)         # anti-aliasing width, px
NOISE = (0.0, 0.06)       # Gaussian noise std, in [0, 1] units
ILLUMINATION = 0.3        # the brightness gradient spans up to +-30% across the image


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates (1, S, S): x grows right, y grows down, in px."""
  c = np.arange(IMAGE_SIZE) + 0.5
  y, x = np.meshgrid(c, c, indexing="ij")
  return x[None], y[None]


def _col(a: np.ndarray) -> np.ndarray:
  """(n,) -> (n, 1, 1) to broadcast over the pixel grid."""
  return a[:, None, None]


def _stripe(u, period):
  """Signed distance (px) to the edge of a stripe of half-period width; > 0 inside."""
  t = np.mod(u / period, 1.0)
  return period * (0.25 - np.abs(t - 0.5))


def _to_line(u, period):
  """Distance (px) from u to the nearest multiple of `period`."""
  return period * np.abs(np.mod(u / period + 0.5, 1.0) - 0.5)


def _pattern(label: int, n: int, rng: np.random.Generator) -> np.ndarray:
  """Signed distance to the pattern edge (n, S, S) in px, > 0 on the foreground."""
  x, y = _grid(n)
  s = IMAGE_SIZE
  period = _col(np.exp(rng.uniform(*np.log(PERIOD), n)))
  centre_x, centre_y = _col(rng.uniform(0, s, n)), _col(rng.uniform(0, s, n))
  base = {0: 90.0, 2: 45.0}.get(label, 0.0)
  angle = rng.uniform(-ROTATION, ROTATION, n) + base
  if label == 2:  # either diagonal: the class is closed under flips
    angle = np.where(rng.random(n) < 0.5, angle, 180.0 - angle)
  if label in (5, 7, 8):  # isotropic classes: any orientation
    angle = rng.uniform(0, 360, n)
  theta = _col(np.deg2rad(angle))
  dx, dy = x - centre_x, y - centre_y
  u = dx * np.cos(theta) + dy * np.sin(theta)   # across the (vertical) stripes of angle 0
  v = -dx * np.sin(theta) + dy * np.cos(theta)
  if label in (0, 1, 2):
    return _stripe(u, period)
  if label == 3:
    a, b = _stripe(u, period), _stripe(v, period)
    return np.sign(a * b) * np.minimum(np.abs(a), np.abs(b))
  if label == 4:
    radius = period * _col(rng.uniform(0.22, 0.32, n))
    return radius - np.hypot(_to_line(u, period), _to_line(v, period))
  if label == 5:
    return _stripe(np.hypot(u, v), period)
  if label == 6:
    half_width = _col(rng.uniform(0.6, 1.0, n))
    return half_width - np.minimum(_to_line(u, period), _to_line(v, period))
  if label == 7:
    # A sum of random plane waves around the period, thresholded at 0; dividing by the
    # typical gradient turns the field into an approximate distance.
    k = 6
    freq = 2 * np.pi / period[..., None] * rng.uniform(0.7, 1.3, (n, 1, 1, k))
    direction = rng.uniform(0, 2 * np.pi, (n, 1, 1, k))
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1, k))
    field = np.cos(freq * (x[..., None] * np.cos(direction) + y[..., None] * np.sin(direction))
                   + phase).sum(-1)
    return field / (np.sqrt(k / 2) * 2 * np.pi / period)
  if label == 8:
    sectors = _col(rng.integers(3, 7, n).astype(np.float64))
    radius = np.hypot(u, v)
    return radius * np.sin(sectors * np.arctan2(v, u)) / sectors
  if label == 9:
    amplitude = period * _col(rng.uniform(0.3, 0.6, n))
    wavelength = period * _col(rng.uniform(1.0, 2.0, n))
    tri = 4 * np.abs(np.mod(u / wavelength, 1.0) - 0.5) - 1  # triangle wave in [-1, 1]
    return _stripe(v + amplitude * tri, period)
  raise ValueError(f"no pattern for label {label}")


def _render(label: int, n: int, rng: np.random.Generator) -> np.ndarray:
  """n images of one class, uint8 (n, S, S, 3)."""
  edge = _col(rng.uniform(*EDGE, n))
  mask = np.clip(0.5 + _pattern(label, n, rng) / edge, 0.0, 1.0)[..., None]
  white_on_black = rng.random(n) < 0.5
  image = np.where(white_on_black[:, None, None, None], mask, 1.0 - mask)
  x, y = _grid(n)
  direction = _col(rng.uniform(0, 2 * np.pi, n))
  gain = _col(rng.uniform(0, ILLUMINATION, n))
  ramp = ((x - IMAGE_SIZE / 2) * np.cos(direction)
          + (y - IMAGE_SIZE / 2) * np.sin(direction)) / (IMAGE_SIZE / 2)
  image = image * (1.0 + gain * ramp)[..., None]  # white varies, black stays black
  image = np.broadcast_to(image, (n, IMAGE_SIZE, IMAGE_SIZE, 3))
  noise = rng.uniform(*NOISE, n)[:, None, None, None]
  image = image + noise * rng.standard_normal(image.shape)  # independent per channel
  return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


@functools.cache
def _generate(split: str) -> tuple[np.ndarray, np.ndarray]:
  per_class, seed = SPLITS[split]
  rng = np.random.default_rng(seed)
  images = np.concatenate([_render(c, per_class, rng) for c in range(NUM_CLASSES)])
  labels = np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), per_class)
  order = rng.permutation(len(labels))
  images, labels = images[order], labels[order]
  images.flags.writeable = False
  labels.flags.writeable = False
  return images, labels


def load(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 (N, S, S, 3), labels int32 (N,)) of "train" or "val"; read-only, cached."""
  if split not in SPLITS:
    raise ValueError(f"embedded dataset: unknown split {split!r}; valid: {sorted(SPLITS)}")
  return _generate(split)
