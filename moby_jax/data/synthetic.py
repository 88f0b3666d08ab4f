"""Synthetic photograph-like JPEGs with ImageNet's spread of sizes (benchmarks and tests).

Real photographs cannot be shipped, and a JPEG's decode time depends on how much detail
it holds, so flat test images make decoding look much faster than it is. These images
have a natural-image power spectrum (amplitude ~ 1/f, colour-correlated) plus a few hard
edges, and at quality 90 they compress to about as many bytes per pixel as ImageNet's
photographs (~0.8 B/px; ImageNet's train JPEGs average ~110 kB at ~400 x 350 px).
"""

import io

import numpy as np
from PIL import Image

# Side lengths of ImageNet train images: most are 500 x 375 / 375 x 500 / 500 x 333 or
# smaller, a few are several thousand pixels wide.
_COMMON_SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 500), (400, 300))


def image_size(rng: np.random.Generator, max_side: int = 2000) -> tuple[int, int]:
  """A (width, height) drawn like ImageNet's: mean about 400 x 350, up to `max_side`."""
  u = rng.random()
  if u < 0.55:
    return _COMMON_SIZES[rng.integers(len(_COMMON_SIZES))]
  long_side = int(np.clip(rng.lognormal(np.log(300), 0.45), 64, max_side))
  if u > 0.97:  # the large tail
    long_side = int(rng.integers(1000, max_side + 1))
  aspect = rng.uniform(1.0, 1.8)
  short_side = max(16, int(long_side / aspect))
  return (long_side, short_side) if rng.random() < 0.7 else (short_side, long_side)


def photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
  """uint8 (height, width, 3): 1/f noise, colour-correlated, with a few sharp shapes."""
  fy = np.fft.fftfreq(height)[:, None]
  fx = np.fft.rfftfreq(width)[None, :]
  amplitude = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / max(width, height))
  channels = []
  shared = rng.standard_normal((height, width // 2 + 1, 2))
  for _ in range(3):
    own = rng.standard_normal((height, width // 2 + 1, 2))
    noise = 0.8 * shared + 0.45 * own  # correlated colours, as in photographs
    spectrum = amplitude * (noise[..., 0] + 1j * noise[..., 1])
    channels.append(np.fft.irfft2(spectrum, s=(height, width)))
  image = np.stack(channels, -1)
  image = (image - image.mean()) / (image.std() + 1e-9)
  image = 128 + 45 * image + rng.uniform(-40, 40, 3)
  yy, xx = np.mgrid[:height, :width]
  for _ in range(rng.integers(2, 6)):  # occluding discs: the hard edges of objects
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    radius = rng.uniform(0.05, 0.3) * min(width, height)
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2
    image[inside] = 0.5 * image[inside] + rng.uniform(0, 255, 3) * 0.5
  # Sensor-like grain: the fine detail that dominates a JPEG's size.
  image += rng.normal(0, 6, image.shape)
  return np.clip(image, 0, 255).astype(np.uint8)


def jpeg(pixels: np.ndarray, quality: int = 90, mode: str = "RGB", **save_args) -> bytes:
  """Encodes uint8 (H, W, 3) pixels as a JPEG in `mode` ("RGB", "L" or "CMYK")."""
  image = Image.fromarray(pixels)
  if mode != "RGB":
    image = image.convert(mode)
  buffer = io.BytesIO()
  image.save(buffer, "JPEG", quality=quality, **save_args)
  return buffer.getvalue()


def imagenet_like_jpegs(count: int, seed: int = 0, max_side: int = 2000) -> list[bytes]:
  """`count` photograph-like JPEGs (quality 90) with ImageNet-like sizes."""
  rng = np.random.default_rng(seed)
  return [jpeg(photo(rng, *image_size(rng, max_side))) for _ in range(count)]
