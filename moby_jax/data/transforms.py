"""Host-side image work: decode, RandomResizedCrop + flip, resize + centre crop (uint8 out).

Decoding. The crop boxes are drawn on the full image size, read from the header. A JPEG
is then decoded by libjpeg-turbo (simplejpeg) at the smallest DCT scale n/8 that still
keeps every box at least as large as the output, so a small crop of a large photo costs a
fraction of a full decode. Anything simplejpeg does not take (PNG and other formats,
CMYK/YCCK JPEGs, JPEGs with recoverable errors, which it rejects in strict mode) is
decoded by PIL, the reference's decoder: a file counts as readable exactly when PIL can
read it.

Geometry. A reduced decode is ceil(w k) x ceil(h k) for the scale k, so boxes map to it
with one factor per axis (decoded size / full size) and are clamped to the decoded
image: no valid image is ever rejected for a box that runs past its edge.

Resampling (OpenCV): area averaging when the box shrinks on both axes, bilinear
otherwise. torchvision's PIL path (what the released code uses) is an antialiased
bilinear; on ImageNet-like photos the two differ by under 2 levels of 255 on average,
about what the reduced-DCT decoding itself changes, at a third of PIL's cost.
"""

import io
import math

import cv2
import numpy as np
import simplejpeg
from PIL import Image

# One thread per call: the loader parallelises over examples (threads or processes).
cv2.setNumThreads(1)

SCALE = (0.08, 1.0)        # RandomResizedCrop area fraction (SPEC §3)
RATIO = (3 / 4, 4 / 3)     # and aspect ratio range
# JPEG colour spaces libjpeg-turbo converts to RGB as PIL does; CMYK/YCCK go to PIL,
# which handles Adobe's inverted CMYK.
_TURBO_COLORSPACES = ("YCbCr", "Gray", "RGB")


def _encoded(data) -> bool:
  return isinstance(data, (bytes, bytearray, memoryview))


def _rgb_array(image: Image.Image) -> np.ndarray:
  return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def _array_rgb(data) -> np.ndarray:
  """A decoded uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array as (H, W, 3) RGB."""
  array = np.asarray(data)
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or array.dtype != np.uint8:
    raise ValueError(f"expected a uint8 image (H, W[, 1|3|4]), got {array.dtype} "
                     f"{array.shape}")
  if array.shape[-1] == 1:
    return np.repeat(array, 3, axis=-1)
  return array[..., :3]


class Decoded:
  """An image read for cropping: its full size, and pixels decoded at some scale.

  `width`, `height`: the full size (from the header for encoded images). `decode(scale)`
  decodes at the smallest size >= scale x full size that the format allows (JPEG: n/8)
  and returns (uint8 (h', w', 3) RGB, (fx, fy)) with fx = w' / width, fy = h' / height.
  Errors of unreadable data are those of simplejpeg/PIL (ValueError, OSError, ...).
  """

  def __init__(self, data):
    self._data = data
    self._turbo = False
    if not _encoded(data):
      self._pixels = _array_rgb(data)
      self.height, self.width = self._pixels.shape[:2]
      return
    self._pixels = None
    try:
      height, width, colorspace, _ = simplejpeg.decode_jpeg_header(bytes(data))
      self._turbo = colorspace in _TURBO_COLORSPACES
    except ValueError:  # not a JPEG (or a damaged header): PIL decides
      with Image.open(io.BytesIO(bytes(data))) as image:
        width, height = image.size
    if width < 1 or height < 1:
      raise ValueError(f"empty image ({width} x {height})")
    self.width, self.height = width, height

  def decode(self, scale: float = 1.0) -> tuple[np.ndarray, tuple[float, float]]:
    if self._pixels is None:
      self._pixels = self._decode(min(scale, 1.0))
    pixels = self._pixels
    return pixels, _dct_factors(self.width, self.height, pixels.shape[1], pixels.shape[0])

  def _decode(self, scale: float) -> np.ndarray:
    data = bytes(self._data)
    if self._turbo:
      try:
        return simplejpeg.decode_jpeg(
            data, colorspace="RGB", strict=True,
            min_height=math.ceil(self.height * scale), min_width=math.ceil(self.width * scale))
      except ValueError:  # e.g. a recoverable libjpeg warning: PIL's rules decide
        pass
    with Image.open(io.BytesIO(data)) as image:
      return _rgb_array(image)


def _dct_factors(width: int, height: int, out_w: int, out_h: int) -> tuple[float, float]:
  """Full -> decoded coordinates. A JPEG decoded at scale n/8 is ceil(w n/8) x
  ceil(h n/8), its last row and column covering partial blocks: coordinates scale by
  exactly n/8 on both axes. Any other size (no reduction) scales by the size ratio."""
  for n in range(8, 0, -1):
    if out_w == -(-width * n // 8) and out_h == -(-height * n // 8):
      return n / 8, n / 8
  return out_w / width, out_h / height


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


def _resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """uint8 (h, w, 3) -> (size[1], size[0], 3): area averaging when both sides shrink."""
  shrinks = pixels.shape[1] > size[0] and pixels.shape[0] > size[1]
  return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA if shrinks else cv2.INTER_LINEAR)


def _span(start: float, stop: float, limit: int) -> tuple[int, int]:
  """[start, stop) in decoded pixels -> integer bounds inside [0, limit), at least 1 wide."""
  lo = min(max(int(round(start)), 0), limit - 1)
  hi = min(max(int(round(stop)), lo + 1), limit)
  return lo, hi


def resize_box(pixels: np.ndarray, box, factors, size: tuple[int, int]) -> np.ndarray:
  """The full-size box (left, top, w, h) of `pixels` (decoded at `factors`) resized to
  `size` = (width, height): uint8 (height, width, 3)."""
  left, top, w, h = box
  fx, fy = factors
  x0, x1 = _span(left * fx, (left + w) * fx, pixels.shape[1])
  y0, y1 = _span(top * fy, (top + h) * fy, pixels.shape[0])
  return _resize(pixels[y0:y1, x0:x1], size)


def random_crops(data, rng: np.random.Generator, size: int, count: int,
                 scale=SCALE, ratio=RATIO) -> list[np.ndarray]:
  """`count` independent RandomResizedCrop + horizontal flip (p=0.5) crops of one image,
  uint8 (size, size, 3). `data`: encoded bytes or a decoded uint8 array."""
  image = Decoded(data)
  boxes = [crop_box(rng, image.width, image.height, scale=scale, ratio=ratio)
           for _ in range(count)]
  flips = [bool(rng.random() < 0.5) for _ in range(count)]
  pixels, factors = image.decode(max(size / min(w, h) for _, _, w, h in boxes))
  crops = []
  for box, flip in zip(boxes, flips):
    crop = resize_box(pixels, box, factors, (size, size))
    crops.append(cv2.flip(crop, 1) if flip else crop)
  return crops


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
  """torchvision's Resize(int) arithmetic: the shorter side becomes `shorter`, the
  longer one int(shorter * long / short) (truncated)."""
  if width <= height:
    return shorter, int(shorter * height / width)
  return int(shorter * width / height), shorter


def center_crop(data, size: int, resize_size: int) -> np.ndarray:
  """torchvision's Resize(resize_size) then CenterCrop(size): uint8 (size, size, 3).
  `resize_size` >= `size`."""
  image = Decoded(data)
  new_w, new_h = resized_size(image.width, image.height, resize_size)
  pixels, _ = image.decode(min(new_w / image.width, new_h / image.height))
  resized = _resize(pixels, (new_w, new_h))
  top = int(round((new_h - size) / 2.0))
  left = int(round((new_w - size) / 2.0))
  return np.ascontiguousarray(resized[top:top + size, left:left + size])


def eval_resize(size: int, crop_pct: float = 0.875) -> int:
  """The shorter side before the centre crop of `size` in evaluation: floor(size / crop_pct),
  as timm's eval transform and the released classification code (`int(256 / 224 * size)`).

  At 224 with the default 0.875 it is 256, the released linear evaluation's
  `Resize(img_size + 32)`, bit for bit. At other sizes it keeps the crop's share of the
  image: `img_size + 32` would keep only the centre 50% of each side at 32 px (this gives
  36, 87.5%), and 438 instead of 416 at 384. `crop_pct` is in (0, 1] (data.eval_crop_pct).
  """
  return math.floor(size / crop_pct)
