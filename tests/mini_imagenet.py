"""A miniature ILSVRC2012 in the real tar layout, for preparation tests.

`ILSVRC2012_img_train.tar` is a tar of per-synset tars (`n01440764.tar` holding
`n01440764_<id>.JPEG`), `ILSVRC2012_img_val.tar` a flat tar of
`ILSVRC2012_val_<8 digits>.JPEG`. TFDS's builder labels validation images by zipping the
sorted val file names with its bundled validation_labels.txt, so the miniature uses the
first validation names (whose labels are the first lines of that file) and trains on
their synsets. Some images are grayscale JPEGs, two carry names from the builder's CMYK
list (it re-encodes those), one more is a CMYK JPEG it keeps as it is, one is the PNG
named `.JPEG` (n02105855_2933.JPEG), and sizes are odd and even.
"""

import io
import pathlib
import tarfile

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from moby_jax.data import synthetic

CMYK_LISTED = ("n01739381_1309.JPEG", "n02077923_14822.JPEG")  # in the builder's list
PNG_NAMED_JPEG = "n02105855_2933.JPEG"


def imagenet_label_files() -> tuple[list[str], list[str]]:
  """(the 1000 synsets in label order, the validation labels by sorted file name)."""
  folder = pathlib.Path(tfds.__file__).parent / "datasets" / "imagenet2012"
  return ((folder / "labels.txt").read_text().split(),
          (folder / "validation_labels.txt").read_text().split())


def _pixels(rng, synset: str, width: int, height: int) -> np.ndarray:
  """Smooth colour waves whose colour and frequencies depend on the class."""
  class_rng = np.random.default_rng(int(synset[1:]))
  yy, xx = np.mgrid[:height, :width] / max(width, height)
  base = class_rng.uniform(40, 215, 3)
  freq = class_rng.uniform(2, 9, 2)
  wave = np.sin(2 * np.pi * (freq[0] * xx + freq[1] * yy) + rng.uniform(0, 6.3))
  image = base + 35 * wave[..., None] + rng.normal(0, 6, (height, width, 3))
  return image.clip(0, 255).astype(np.uint8)


def _encode(pixels: np.ndarray, kind: str) -> bytes:
  if kind == "png":
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()
  return synthetic.jpeg(pixels, mode={"rgb": "RGB", "gray": "L", "cmyk": "CMYK"}[kind])


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write(manual_dir, val_count: int = 12, per_class: int = 6, seed: int = 0) -> dict:
  """Writes the two tars into `manual_dir`; returns {"train": {file: synset}, "val":
  {file: synset}, "synsets": the 1000 synsets in label order, "specials": {file: kind}}."""
  rng = np.random.default_rng(seed)
  synsets, val_labels = imagenet_label_files()
  val = {f"ILSVRC2012_val_{i:08d}.JPEG": val_labels[i - 1] for i in range(1, val_count + 1)}
  specials = {name: "cmyk" for name in CMYK_LISTED}
  specials[PNG_NAMED_JPEG] = "png"
  classes = sorted(set(val.values()) | {name.split("_")[0] for name in specials})
  train = {}
  for c, synset in enumerate(classes):
    for k in range(per_class):
      train[f"{synset}_{1000 + k}.JPEG"] = synset
  train.update({name: name.split("_")[0] for name in specials})
  # A CMYK JPEG the builder does not know: it stays CMYK in the prepared files.
  unlisted_cmyk = f"{classes[0]}_999.JPEG"
  specials[unlisted_cmyk] = "cmyk"
  train[unlisted_cmyk] = classes[0]

  def image(i: int, name: str, synset: str) -> bytes:
    width, height = int(rng.integers(40, 300)), int(rng.integers(40, 300))
    kind = specials.get(name, "gray" if i % 5 == 0 else "rgb")
    return _encode(_pixels(rng, synset, width, height), kind)

  manual_dir = pathlib.Path(manual_dir)
  manual_dir.mkdir(parents=True, exist_ok=True)
  with tarfile.open(manual_dir / "ILSVRC2012_img_train.tar", "w") as outer:
    for synset in classes:
      inner_bytes = io.BytesIO()
      with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
        for i, (name, s) in enumerate(sorted(train.items())):
          if s == synset:
            _add(inner, name, image(i, name, s))
      _add(outer, f"{synset}.tar", inner_bytes.getvalue())
  with tarfile.open(manual_dir / "ILSVRC2012_img_val.tar", "w") as tar:
    for i, (name, synset) in enumerate(sorted(val.items())):
      _add(tar, name, image(i, name, synset))
  return {"train": train, "val": val, "synsets": synsets, "specials": specials}
