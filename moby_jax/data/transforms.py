"""Host-side image work: decode, RandomResizedCrop + flip, resize + centre crop (uint8 out).

The crop box is drawn on the full image size, read from the header before decoding. A
JPEG is then decoded with PIL's draft mode at the smallest DCT scale (1/2, 1/4, 1/8) that
still covers the box at the output resolution, so a small crop of a large photo costs a
fraction of a full decode. Resizing is PIL bilinear (with antialiasing when shrinking).
"""

import io
import math

import numpy as np
from PIL import Image

SCALE = (0.08, 1.0)        # RandomResizedCrop area fraction (SPEC §3)
RATIO = (3 / 4, 4 / 3)     # and aspect ratio range


def open_image(data) -> Image.Image:
  """Encoded bytes (lazy: header only) or a uint8 (H, W[, C]) array -> PIL image."""
  if isinstance(data, (bytes, bytearray, memoryview)):
    return Image.open(io.BytesIO(bytes(data)))
  array = np.asarray(data)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  return Image.fromarray(array)


def crop_box(rng: np.random.Generator, width: int, height: int,
             scale=SCALE, ratio=RATIO) -> tuple[int, int, int, int]:
  """torchvision's RandomResizedCrop box (left, top, w, h): 10 tries, then a centre crop."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, w, h
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def _draft(image: Image.Image, needed_scale: float) -> float:
  """Decodes a JPEG at a reduced DCT scale if `needed_scale` (<= 1) allows; returns the
  factor (decoded size / full size) by which box coordinates must be multiplied."""
  width, height = image.size
  if image.format == "JPEG" and needed_scale < 1:
    image.draft("RGB", (math.ceil(width * needed_scale), math.ceil(height * needed_scale)))
  return image.size[0] / width


def _to_rgb(image: Image.Image) -> Image.Image:
  return image if image.mode == "RGB" else image.convert("RGB")


def random_crops(data, rng: np.random.Generator, size: int, count: int,
                 scale=SCALE, ratio=RATIO) -> list[np.ndarray]:
  """`count` independent RandomResizedCrop + horizontal flip (p=0.5) crops, uint8 (size, size, 3)."""
  image = open_image(data)
  boxes = [crop_box(rng, *image.size, scale=scale, ratio=ratio) for _ in range(count)]
  flips = [bool(rng.random() < 0.5) for _ in range(count)]
  factor = _draft(image, max(size / min(w, h) for _, _, w, h in boxes))
  image = _to_rgb(image)
  crops = []
  for (left, top, w, h), flip in zip(boxes, flips):
    box = (left * factor, top * factor, (left + w) * factor, (top + h) * factor)
    crop = np.asarray(image.resize((size, size), Image.BILINEAR, box=box))
    crops.append(np.ascontiguousarray(crop[:, ::-1]) if flip else crop)
  return crops


def center_crop(data, size: int, resize_size: int) -> np.ndarray:
  """Shorter side resized to `resize_size`, then the central (size, size) crop, uint8."""
  image = open_image(data)
  width, height = image.size
  factor = _draft(image, resize_size / min(width, height))
  image = _to_rgb(image)
  scale = resize_size / min(width, height)
  new_w, new_h = max(resize_size, round(width * scale)), max(resize_size, round(height * scale))
  image = image.resize((new_w, new_h), Image.BILINEAR,
                       box=(0, 0, width * factor, height * factor))
  left, top = (new_w - size) // 2, (new_h - size) // 2
  return np.asarray(image.crop((left, top, left + size, top + size)))


def eval_resize(size: int) -> int:
  """The Swin repo's test resize: int(256 / 224 * size) (256 for 224)."""
  return int(256 / 224 * size)
