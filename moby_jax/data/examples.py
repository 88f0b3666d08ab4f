"""What one row of a loader's stream holds: read, decode and crop one example.

These callables run in the loader's threads or worker processes, so this module (like
`sources` and `transforms`) never imports JAX. Each is a frozen dataclass: cheap to
pickle into a worker, and a pure function of the global row number it is given, so a
row's content depends only on the seed and its position in the stream, never on the
number of processes, threads or workers.

Training rows that cannot be decoded are replaced by the next readable example (and
reported in `bad`): a training step needs a full batch. Evaluation rows never are: they
come back with `valid` False, so metrics leave them out instead of counting another
image under their label.
"""

import dataclasses
from typing import Any, Callable

import grain
import numpy as np
from PIL import Image

from moby_jax.data import transforms

# What decoding an unreadable file raises: PIL's UnidentifiedImageError and truncated
# data are OSErrors, simplejpeg/OpenCV raise ValueError.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def read_first_readable(source, index: int, crop_fn) -> tuple[Any, int, int]:
  """(crop_fn(image), label, bad) for the first readable example j >= index (cyclic);
  `bad` is the first unreadable index met (-1 if `index` itself was fine)."""
  bad = -1
  for attempt in range(len(source)):
    j = (index + attempt) % len(source)
    try:
      record = source[j]
      return crop_fn(record["image"]), record["label"], bad
    except DECODE_ERRORS:
      bad = j if bad < 0 else bad
  raise RuntimeError(f"none of the {len(source)} examples of the source can be decoded")


@dataclasses.dataclass(frozen=True)
class ProcessRows:
  """Index i of one process's stream -> global row t: process p of P takes rows
  [s B + p b, s B + (p + 1) b) of step s (B = global batch, b = B / P)."""
  batch_size: int
  local_batch: int
  process: int

  def __call__(self, i: int) -> int:
    step, r = divmod(i, self.local_batch)
    return step * self.batch_size + self.process * self.local_batch + r


class EpochOrder:
  """Global row t of the training stream -> source index. Epoch e = t // rows_per_epoch
  visits grain's shuffle of the source for epoch e (a random-access permutation, O(1)
  per lookup whatever the dataset size); the rows of an epoch past rows_per_epoch (the
  last partial batch) are never visited."""

  def __init__(self, num_examples: int, rows_per_epoch: int, seed: int):
    self.num_examples, self.rows_per_epoch = num_examples, rows_per_epoch
    self._epochs = grain.MapDataset.range(num_examples).shuffle(seed=seed).repeat()

  def __call__(self, t: int) -> int:
    epoch, row = divmod(t, self.rows_per_epoch)
    return int(self._epochs[epoch * self.num_examples + row])


@dataclasses.dataclass(frozen=True)
class TrainRow:
  """Global row t -> one RandomResizedCrop + flip crop of its example per name in
  `views` (uint8 (S, S, 3)), drawn with a generator seeded by (seed, t), plus the
  fields named in `extra` of {"label": int32, "row": int64 t, "bad": int32 unreadable
  index or -1}."""
  source: Any
  order: EpochOrder
  size: int
  scale: tuple[float, float]
  seed: int
  views: tuple[str, ...]
  extra: tuple[str, ...]

  def __call__(self, t: int) -> dict:
    rng = np.random.default_rng([self.seed, t])
    crops, label, bad = read_first_readable(
        self.source, self.order(t),
        lambda image: transforms.random_crops(image, rng, self.size, len(self.views),
                                              scale=self.scale))
    fields = {"label": np.int32(label), "row": np.int64(t), "bad": np.int32(bad)}
    return {**dict(zip(self.views, crops)), **{key: fields[key] for key in self.extra}}


@dataclasses.dataclass(frozen=True)
class EvalRow:
  """Global row t < len(source) -> {"image": uint8 resize + centre crop, "label",
  "valid", "bad"}. Rows past the end (padding of the last batch) and examples that
  cannot be decoded come back zero with valid False; `bad` is t for the latter."""
  source: Any
  size: int
  resize_size: int

  def __call__(self, t: int) -> dict:
    image = np.zeros((self.size, self.size, 3), np.uint8)
    label, valid, bad = -1, False, -1
    if t < len(self.source):
      try:
        record = self.source[t]
        image = transforms.center_crop(record["image"], self.size, self.resize_size)
        label, valid = record["label"], True
      except DECODE_ERRORS:
        bad = t
    return {"image": image, "label": np.int32(label), "valid": np.bool_(valid),
            "bad": np.int32(bad)}


def stack(rows: list[dict]) -> dict[str, np.ndarray]:
  """Rows of equal structure -> one batch (leaves stacked on a new leading axis)."""
  return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


@dataclasses.dataclass(frozen=True)
class LocalBatch:
  """Step s -> this process's rows of the global batch of step s, stacked (what a
  loader worker process produces)."""
  rows: ProcessRows
  row_fn: Callable[[int], dict]

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    local = self.rows.local_batch
    return stack([self.row_fn(self.rows(step * local + r)) for r in range(local)])
