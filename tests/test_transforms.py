"""Decoding and crop geometry (moby_jax/data/transforms.py) on awkward images.

Every crop of an encoded image (reduced-DCT decoding where the crop allows, boxes mapped
to the decoded size) is compared with the same crop of the fully decoded pixels, over
odd and even sizes from 1 px to 4000 px, every DCT scale, grayscale, CMYK, progressive
JPEGs and PNG; no valid image may ever fail to decode.
"""

import io
import math

import numpy as np
import pytest
from PIL import Image

from moby_jax.data import examples, loader, sources, synthetic, transforms
from test_data import loader_config

SIZES = [(1, 1), (2, 3), (17, 16), (31, 40), (255, 256), (1023, 768), (768, 1023),
         (1001, 1000), (4000, 3001)]
KINDS = ["RGB", "L", "CMYK", "progressive", "PNG"]


def smooth(rng, width, height) -> np.ndarray:
  """Low-frequency colour waves: content where a misplaced box shows, and that every
  resampler renders alike."""
  yy, xx = np.mgrid[:height, :width]
  out = np.zeros((height, width, 3))
  for c in range(3):
    for _ in range(3):
      fy, fx = rng.uniform(0.5, 3, 2) * 2 * np.pi / np.array([height, width])
      out[..., c] += np.sin(fy * yy + fx * xx + rng.uniform(0, 2 * np.pi))
  return (128 + 30 * out).clip(0, 255).astype(np.uint8)


def encode(pixels, kind) -> bytes:
  if kind == "PNG":
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()
  if kind == "progressive":
    return synthetic.jpeg(pixels, progressive=True)
  return synthetic.jpeg(pixels, mode=kind)


def full_decode(data) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize("kind", KINDS)
def test_crops_of_encoded_images_match_crops_of_the_full_decode(kind):
  rng = np.random.default_rng(0)
  for width, height in SIZES:
    data = encode(smooth(rng, width, height), kind)
    full = full_decode(data)
    for size in (32, 224):
      for seed in range(6):
        fast = transforms.random_crops(data, np.random.default_rng(seed), size, 2)
        exact = transforms.random_crops(full, np.random.default_rng(seed), size, 2)
        for a, b in zip(fast, exact):
          assert a.shape == (size, size, 3) and a.dtype == np.uint8
          # Boxes land within half a decoded pixel: a few levels of 255 at most.
          assert np.abs(a.astype(int) - b).mean() < 4, (width, height, kind, size, seed)
      fast = transforms.center_crop(data, size, transforms.eval_resize(size))
      exact = transforms.center_crop(full, size, transforms.eval_resize(size))
      assert fast.shape == (size, size, 3)
      assert np.abs(fast.astype(int) - exact).mean() < 4, (width, height, kind, size)


def test_every_dct_scale_maps_boxes_exactly():
  width, height = 1023, 769
  data = synthetic.jpeg(smooth(np.random.default_rng(1), width, height))
  full = full_decode(data)
  for n in range(1, 9):
    image = transforms.Decoded(data)
    pixels, factors = image.decode(n / 8)
    assert pixels.shape == (math.ceil(height * n / 8), math.ceil(width * n / 8), 3)
    assert factors == (n / 8, n / 8)
    # The decoded image is the full one scaled by n/8 (its last row/column partial).
    box = (100, 50, 800, 700)
    got = transforms.resize_box(pixels, box, factors, (64, 64))
    want = transforms.resize_box(full, box, (1.0, 1.0), (64, 64))
    assert np.abs(got.astype(int) - want).mean() < 3, n


@pytest.mark.parametrize("width,height", [(1023, 768), (1001, 1000), (999, 1000)])
def test_sizes_that_used_to_be_reported_unreadable(width, height):
  data = synthetic.jpeg(synthetic.photo(np.random.default_rng(2), width, height))
  assert transforms.center_crop(data, 224, 256).shape == (224, 224, 3)
  rng = np.random.default_rng(0)
  for _ in range(300):  # small crops of a large image: reduced decodes at every scale
    for crop in transforms.random_crops(data, rng, 32, 2):
      assert crop.shape == (32, 32, 3)


def test_recoverable_jpeg_errors_decode_and_truncated_files_do_not():
  pixels = smooth(np.random.default_rng(3), 120, 90)
  data = synthetic.jpeg(pixels)
  # Extraneous bytes before the end marker: libjpeg warns, simplejpeg (strict) refuses,
  # PIL decodes it whole, and so do we.
  warned = data[:-2] + b"\x00\x00" + data[-2:]
  np.testing.assert_array_equal(transforms.center_crop(warned, 64, 73),
                                transforms.center_crop(full_decode(data), 64, 73))
  with pytest.raises(examples.DECODE_ERRORS):
    transforms.center_crop(data[:len(data) // 2], 64, 73)
  with pytest.raises(examples.DECODE_ERRORS):
    transforms.random_crops(b"\xff\xd8\xff\xe0 not a jpeg", np.random.default_rng(0), 32, 2)


def torchvision_eval_geometry(width, height, size, resize):
  """torchvision's Resize(resize) then CenterCrop(size), written from its definition:
  (resized width, height, crop left, top). Resize(int) scales the shorter side to the int
  and truncates the longer one; CenterCrop rounds its offsets with Python's round()."""
  short, long = sorted((width, height))
  new_short, new_long = resize, int(resize * long / short)
  new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
  return new_w, new_h, int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))


@pytest.mark.parametrize("size", [32, 224, 384])
def test_eval_transform_keeps_the_224_share_at_every_size(size):
  # The released linear evaluation's Resize(size + 32) at 224, bit for bit; the
  # classification code's int(256 / 224 * size) (timm's crop_pct 0.875) at every size.
  resize = transforms.eval_resize(size)
  assert resize == int(256 / 224 * size) == {32: 36, 224: 256, 384: 438}[size]
  if size == 224:
    assert resize == size + 32
  rng = np.random.default_rng(size)
  for width, height in [(500, 375), (375, 500), (333, 500), (1023, 768), (257, 259),
                        (size, size), (size + 1, 3 * size)]:
    pixels = smooth(rng, width, height)
    new_w, new_h, left, top = torchvision_eval_geometry(width, height, size, resize)
    assert transforms.resized_size(width, height, resize) == (new_w, new_h)
    resized = transforms._resize(pixels, (new_w, new_h))
    np.testing.assert_array_equal(transforms.center_crop(pixels, size, resize),
                                  resized[top:top + size, left:left + size])
  # Another crop share: the whole shorter side (1.0), or its centre half (0.5).
  assert transforms.eval_resize(size, 1.0) == size
  assert transforms.eval_resize(size, 0.5) == 2 * size


def test_no_valid_awkward_image_is_reported_unreadable(tmp_path):
  rng = np.random.default_rng(4)
  for i, ((width, height), kind) in enumerate(
      (size, kind) for size in SIZES[:-1] for kind in KINDS):
    folder = tmp_path / "train" / f"c{i % 3}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{i}.{'png' if kind == 'PNG' else 'jpg'}").write_bytes(
        encode(smooth(rng, width, height), kind))
  source = sources.FolderSource.scan(str(tmp_path), "train")
  config = loader_config(path=str(tmp_path), batch_size=len(source))
  config.train.steps_per_epoch = 1
  with loader.pretrain_loader(config, source) as batches:
    for _ in range(3):
      assert (next(batches)["bad"] == -1).all()
  with loader.eval_loader(config, source) as batches:
    batch = next(batches)
  assert batch["valid"].all() and (batch["bad"] == -1).all()
