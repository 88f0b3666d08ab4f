"""Grain loaders: deterministic, per-process, checkpointable streams of host batches.

Row r of the global batch of step s is example `perm_e[i * B + r]` of epoch
e = s // steps_per_epoch, i = s % steps_per_epoch (B = data.batch_size; the last partial
batch of each epoch is dropped; `perm_e` is grain's shuffle of epoch e). Its crops are
drawn with a generator seeded by (train.seed, s * B + r). Process p of P takes rows
[p B/P, (p+1) B/P) of each global batch, so what step s sees depends only on (seed, s),
not on the number of processes. The iterator's state is grain's (`next_index` = the next
step); it is saved with every checkpoint.

An example that cannot be read or decoded is replaced by the next readable example of
the source and reported in the batch's `bad` field (its source index, -1 if none).
"""

import dataclasses
from typing import Any

import grain
import jax
import numpy as np
from PIL import Image

from moby_jax import augment
from moby_jax.data import transforms
from moby_jax.data.sources import build_source

# What PIL raises for a file that is not a readable image (UnidentifiedImageError and
# truncated data are OSErrors).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _read(source, index: int, crop_fn) -> tuple[Any, int, int]:
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
class _EpochIndex:
  """Global row t of the step stream -> position in grain's stream of shuffled epochs."""
  num_examples: int
  rows_per_epoch: int

  def __call__(self, t: int) -> int:
    epoch, row = divmod(t, self.rows_per_epoch)
    return epoch * self.num_examples + row


def _train_rows(source, rows_per_epoch: int, seed: int) -> grain.MapDataset:
  """(t, source index) for every global row t of the (infinite) step stream."""
  epochs = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()
  locate = _EpochIndex(len(source), rows_per_epoch)
  return grain.MapDataset.range(len(epochs)).map(lambda t: (t, epochs[locate(t)]))


def _per_process(rows: grain.MapDataset, batch_size: int, config) -> grain.IterDataset:
  """This process's consecutive slice of every global batch, read by worker threads."""
  count, index = jax.process_count(), jax.process_index()
  if batch_size % count:
    raise ValueError(f"data.batch_size ({batch_size}) must be divisible by the number of "
                     f"processes ({count})")
  local = rows.batch(batch_size // count)
  return local[index::count].to_iter_dataset(grain.ReadOptions(
      num_threads=config.data.num_workers, prefetch_buffer_size=config.data.prefetch_batches))


class Loader:
  """An iterator of host batches with grain's `get_state()` / `set_state()` (JSON-able)."""

  def __init__(self, dataset: grain.IterDataset, source, host_fn=None):
    self.source = source
    self._iterator = iter(dataset)
    self._host_fn = host_fn

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    return self._host_fn(batch) if self._host_fn else batch

  def get_state(self) -> dict:
    return self._iterator.get_state()

  def set_state(self, state: dict) -> None:
    self._iterator.set_state(state)


def _host_augment(config):
  """augment.on_device=False: the per-pixel view augmentations on the host CPU, with one
  key per global row (so the result does not depend on the number of processes)."""
  cpu = jax.devices("cpu")[0]
  base = jax.random.key(config.train.seed)

  @jax.jit
  def views(v1, v2, rows):
    def one(a, b, row):
      a, b = augment.two_views(a[None], b[None], jax.random.fold_in(base, row))
      return a[0], b[0]
    return jax.vmap(one)(v1, v2, rows)

  def apply(batch):
    with jax.default_device(cpu):
      v1, v2 = views(batch["view1"], batch["view2"], batch["row"])
    return dict(batch, view1=np.asarray(v1), view2=np.asarray(v2))

  return apply


def _crop_rows(config, source, count: int) -> grain.MapDataset:
  """(t, `count` random crops of row t's example, its label, bad index) per global row."""
  size, scale = config.model.img_size, tuple(config.data.crop_scale)

  def example(pair, rng):
    t, index = pair
    crops, label, bad = _read(source, int(index), lambda image: transforms.random_crops(
        image, rng, size, count, scale=scale))
    return t, crops, label, bad

  return _train_rows(source, config.train.steps_per_epoch * config.data.batch_size,
                     config.train.seed).random_map(example, seed=config.train.seed)


def pretrain_loader(config, source=None) -> Loader:
  """MoBY batches for this process: {"view1", "view2": uint8 (b, S, S, 3) crops (float32
  normalised views when augment.on_device is false), "row": int64 global row, "bad":
  int32 unreadable source index or -1}; b = data.batch_size / process count."""
  source = build_source(config.data, "train") if source is None else source
  rows = _crop_rows(config, source, 2).map(lambda e: {
      "view1": e[1][0], "view2": e[1][1], "row": np.int64(e[0]), "bad": np.int32(e[3])})
  host_fn = None if config.augment.on_device else _host_augment(config)
  return Loader(_per_process(rows, config.data.batch_size, config), source, host_fn)


def linear_train_loader(config, source=None) -> Loader:
  """Linear-evaluation training batches (SPEC §3): {"image": uint8 RandomResizedCrop +
  flip, "label": int32, "bad": int32}, ordered like `pretrain_loader`."""
  source = build_source(config.data, "train") if source is None else source
  rows = _crop_rows(config, source, 1).map(lambda e: {
      "image": e[1][0], "label": np.int32(e[2]), "bad": np.int32(e[3])})
  return Loader(_per_process(rows, config.data.batch_size, config), source)


def eval_loader(config, source, batch_size: int | None = None) -> Loader:
  """One pass over `source` (e.g. build_source(config.data, "val")) in order with the eval transform (resize to
  int(256/224 * img_size), centre crop): {"image": uint8, "label": int32, "valid": bool,
  "bad": int32}. The last global batch is padded (valid False) so every batch is full."""
  batch = batch_size or config.data.batch_size
  size = config.model.img_size
  resize = transforms.eval_resize(size)
  n = len(source)

  def example(t):
    image, label, bad = _read(source, min(t, n - 1),
                              lambda image: transforms.center_crop(image, size, resize))
    return {"image": image, "label": np.int32(label), "valid": np.bool_(t < n),
            "bad": np.int32(bad)}

  rows = grain.MapDataset.range(-(-n // batch) * batch).map(example)
  return Loader(_per_process(rows, batch, config), source)
