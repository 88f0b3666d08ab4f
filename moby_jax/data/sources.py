"""Random-access labelled image sources: TFDS (ArrayRecord), an image folder, the embedded set.

A source has `len(source)`, `source[i] -> {"image": encoded bytes or uint8 (H, W, C),
"label": int}`, `name(i)` (what a log line calls example i: its file name where there is
one), `num_classes`, and `skipped` (files left out when the source was built, with the
reason). Reading the bytes is cheap; decoding happens in the loader's workers
(`moby_jax.data.examples`), at reduced size for JPEGs where the crop allows. Sources are
picklable, so worker processes can read them; nothing here imports JAX.
"""

import dataclasses
import pathlib

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val")

TFDS_PREPARE_HINT = (
    "Prepare it once in ArrayRecord format (random access), e.g. for ImageNet with the "
    "two ILSVRC2012 tars in MANUAL_DIR: python3 -m pip install -r requirements-prepare.txt "
    "&& python3 -m moby_jax.data.prepare imagenet2012 --manual_dir MANUAL_DIR --data_dir "
    "DATA_DIR; then pass --config.data.data_dir=DATA_DIR")


@dataclasses.dataclass
class ArraySource:
  """In-memory images (N, H, W, 3) uint8 and labels (N,)."""
  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  skipped: list[str] = dataclasses.field(default_factory=list)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> dict:
    return {"image": self.images[i], "label": int(self.labels[i])}

  def name(self, i: int) -> str:
    return f"example {i}"


@dataclasses.dataclass
class FolderSource:
  """ImageNet layout: `root/<split>/<class>/<file>`; classes are the sorted folder names.

  Files whose suffix is not an image suffix are left out and listed in `skipped`; files
  that fail to decode are skipped by the loader when they are read.
  """
  files: list[str]
  labels: np.ndarray
  classes: list[str]
  skipped: list[str]

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, i: int) -> dict:
    return {"image": pathlib.Path(self.files[i]).read_bytes(), "label": int(self.labels[i])}

  def name(self, i: int) -> str:
    return self.files[i]

  @classmethod
  def scan(cls, root: str, split: str) -> "FolderSource":
    """Lists `root/split`; raises FileNotFoundError / ValueError naming `data.path`."""
    split_dir = pathlib.Path(root) / split
    if not split_dir.is_dir():
      raise FileNotFoundError(f"data.path={root!r}: no {split!r} folder at {split_dir} "
                              "(expected the ImageNet layout <path>/{train,val}/<class>/<image>)")
    classes = sorted(p.name for p in split_dir.iterdir()
                     if p.is_dir() and not p.name.startswith("."))
    if not classes:
      raise ValueError(f"data.path={root!r}: {split_dir} has no class folders")
    files, labels, skipped = [], [], []
    for label, name in enumerate(classes):
      entries = sorted(p for p in (split_dir / name).rglob("*")
                       if p.is_file() and not p.name.startswith("."))
      images = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
      skipped += [f"{p} (not an image suffix)" for p in entries if p not in images]
      if not images:
        raise ValueError(f"data.path={root!r}: class folder {split_dir / name} has no images "
                         f"(suffixes {', '.join(IMAGE_SUFFIXES)})")
      files += [str(p) for p in images]
      labels += [label] * len(images)
    return cls(files, np.asarray(labels, np.int32), classes, skipped)


class TfdsSource:
  """A prepared TFDS image classification dataset read with random access.

  Real ArrayRecord files are read as raw records and parsed without decoding the image,
  so the loader can decode JPEGs at the size the crop needs; data sources that hand out
  decoded examples (e.g. `tfds.testing.mock_data`) are used as they are.
  """

  def __init__(self, name: str, split: str, data_dir: str | None):
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import example_parser
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except Exception as err:  # DatasetNotFoundError and friends
      raise FileNotFoundError(f"data.dataset={name!r} is not a TFDS dataset: {err}") from err
    tfds_split = self._split_name(builder, name, split)
    try:
      self._source = tfds.data_source(name, split=tfds_split, data_dir=data_dir, download=False)
    except Exception as err:
      raise FileNotFoundError(
          f"data.dataset={name!r} (split {tfds_split!r}) is not prepared in data.data_dir="
          f"{data_dir!r}: {err}. {TFDS_PREPARE_HINT}") from err
    features = self._source.dataset_info.features
    if "image" not in features or "label" not in features:
      raise ValueError(f"data.dataset={name!r} has features {list(features)}; an image "
                       "classification dataset needs 'image' and 'label'")
    self.num_classes = int(features["label"].num_classes)
    self.skipped: list[str] = []
    self._where = f"{name}[{tfds_split}]"
    self._parser = example_parser.ExampleParserNp(features.get_serialized_info())

  @staticmethod
  def _split_name(builder, name: str, split: str) -> str:
    if split == "train":
      return "train"
    splits = set(builder.info.splits or ())
    for candidate in ("validation", "val", "test"):
      if candidate in splits:
        return candidate
    # Not prepared yet (or mocked without split metadata): the usual TFDS name.
    return "validation"

  def __len__(self) -> int:
    return len(self._source)

  def _record(self, i: int) -> dict:
    record = self._source.data_source[i]
    if isinstance(record, (bytes, memoryview)):
      record = self._parser.parse_example(record)
    return record

  def __getitem__(self, i: int) -> dict:
    record = self._record(i)
    image = record["image"]
    if isinstance(image, np.ndarray) and image.dtype == object:
      image = image.item()
    return {"image": image, "label": int(np.asarray(record["label"]))}

  def name(self, i: int) -> str:
    """`dataset[split] #i`, and the example's file_name where the dataset has one."""
    where = f"{self._where} #{i}"
    try:
      file_name = self._record(i).get("file_name")
    except Exception:  # the record itself is unreadable: the index is all there is
      return where
    if file_name is None:
      return where
    file_name = np.asarray(file_name).item()
    return f"{where} ({file_name.decode() if isinstance(file_name, bytes) else file_name})"


@dataclasses.dataclass
class Subset:
  """The examples `indices` of `source`, in that order."""
  source: object
  indices: np.ndarray

  @property
  def num_classes(self) -> int:
    return self.source.num_classes

  @property
  def skipped(self) -> list[str]:
    return self.source.skipped

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict:
    return self.source[int(self.indices[i])]

  def name(self, i: int) -> str:
    return self.source.name(int(self.indices[i]))


def subsample(source, count: int, seed: int):
  """`count` examples of `source` drawn without replacement by `seed` (in source order),
  or `source` itself when count is 0 or not smaller than it."""
  if count <= 0 or count >= len(source):
    return source
  indices = np.sort(np.random.default_rng(seed).choice(len(source), count, replace=False))
  return Subset(source, indices)


def build_source(data_config, split: str):
  """The source `data.dataset` names for `split` ("train" or "val").

  `"embedded"`: the generated set in moby_jax/data/embedded.py; `"folder"`: `data.path`
  in the ImageNet layout; anything else: a TFDS dataset in `data.data_dir`.
  Raises FileNotFoundError / ValueError naming the config field when it cannot be read.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  name = data_config.dataset
  if name == "embedded":
    from moby_jax.data import embedded  # generated on first use
    images, labels = embedded.load(split)
    return ArraySource(images, labels, embedded.NUM_CLASSES)
  if name == "folder":
    if not data_config.path:
      raise ValueError("data.dataset='folder' needs data.path (a folder with train/ and val/)")
    return FolderSource.scan(data_config.path, split)
  return TfdsSource(name, split, data_config.data_dir or None)
