"""Grain loaders: deterministic, per-process, resumable streams of host batches.

Row r of the global batch of step s is global row t = s B + r of the stream
(B = data.batch_size). For training, row t is example `order_e[t mod R]` of epoch
e = t // R (R = steps_per_epoch x B: the last partial batch of each epoch is dropped;
`order_e` is grain's shuffle of epoch e), and its crops are drawn with a generator seeded
by (train.seed, t). Process p of P takes rows [p B/P, (p+1) B/P) of every global batch.
So what step s sees depends only on (seed, s): not on the number of processes, nor on
how the rows are decoded (`data.worker_mode`):

- "threads": `data.num_workers` threads per process decode single examples in parallel,
  and the batch is assembled from them (GIL-free decoding and resizing; the
  simplest mode, good for a few cores per process);
- "processes": `data.num_workers` worker processes (grain's multiprocessing) each build
  whole batches, round robin; for hosts where one process feeds several accelerators
  from many cores.

A loader's position is the number of batches it has handed out (`get_state()` ->
{"next_index": step}); `set_state` restarts the stream there. It is saved with every
checkpoint.
"""

import os
from typing import Callable

import grain
import jax
from absl import flags
import numpy as np

from moby_jax import augment
from moby_jax.data import examples, transforms
from moby_jax.data.sources import build_source

WORKER_MODES = ("threads", "processes")
# Streams are open-ended: the training loop decides when to stop.
_ENDLESS = 2 ** 40  # steps


def num_workers(data_config) -> int:
  """data.num_workers, or with 0 the CPU cores available to this process."""
  if data_config.num_workers < 0:
    raise ValueError(f"data.num_workers must be >= 0 (0: one per CPU core), got "
                     f"{data_config.num_workers}")
  return data_config.num_workers or len(os.sched_getaffinity(0))


def check_config(data_config) -> None:
  """Raises ValueError naming the data.* field that cannot work."""
  if data_config.worker_mode not in WORKER_MODES:
    raise ValueError(f"data.worker_mode must be one of {WORKER_MODES}, got "
                     f"{data_config.worker_mode!r}")
  num_workers(data_config)
  if data_config.prefetch_batches < 1:
    raise ValueError(f"data.prefetch_batches must be >= 1, got {data_config.prefetch_batches}")
  if not 0 < data_config.eval_crop_pct <= 1:
    raise ValueError(f"data.eval_crop_pct must be in (0, 1] (the centre crop's share of the "
                     f"resized image's shorter side), got {data_config.eval_crop_pct}")


def _local_batch(batch_size: int) -> int:
  count = jax.process_count()
  if batch_size % count:
    raise ValueError(f"data.batch_size ({batch_size}) must be divisible by the number of "
                     f"processes ({count})")
  return batch_size // count


def _stream(row_fn: Callable[[int], dict], batch_size: int, data_config,
            length: int = _ENDLESS) -> Callable[[int], grain.IterDataset]:
  """start step -> this process's batches from that step on, built in `data.worker_mode`."""
  local = _local_batch(batch_size)
  rows = examples.ProcessRows(batch_size, local, jax.process_index())
  workers = num_workers(data_config)
  prefetch = data_config.prefetch_batches
  check_config(data_config)

  def from_step(start: int) -> grain.IterDataset:
    if data_config.worker_mode == "threads":
      ds = grain.MapDataset.range(start * local, length * local).map(rows).map(row_fn)
      ds = ds.to_iter_dataset(grain.ReadOptions(
          num_threads=workers, prefetch_buffer_size=max(prefetch * local, workers)))
      return ds.batch(local, drop_remainder=True, batch_fn=examples.stack)
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (defaults suffice)
      flags.FLAGS.mark_as_parsed()
    ds = grain.MapDataset.range(start, length).map(examples.LocalBatch(rows, row_fn))
    # Each worker builds whole batches serially (no threads inside workers).
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    return ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=max(1, -(-prefetch // workers))))

  return from_step


class Loader:
  """An iterator of host batches that can report and restore its position.

  The stream is started on the first `next()` (worker processes are spawned then), so
  `set_state` right after construction costs nothing. `close()` stops workers.
  """

  def __init__(self, from_step: Callable[[int], grain.IterDataset], source, host_fn=None):
    self.source = source
    self._from_step = from_step
    self._host_fn = host_fn
    self._step = 0
    self._iterator = None

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._iterator = iter(self._from_step(self._step))
    batch = next(self._iterator)
    self._step += 1
    return self._host_fn(batch) if self._host_fn else batch

  def get_state(self, rewind: int = 0) -> dict:
    """The position (JSON-able): the number of batches handed out, less `rewind` (batches
    the caller took but has not used, e.g. prefetched to the devices)."""
    return {"next_index": self._step - rewind}

  def set_state(self, state: dict) -> None:
    self.close()
    self._step = int(state["next_index"])

  def close(self) -> None:
    if self._iterator is not None and hasattr(self._iterator, "close"):
      self._iterator.close()
    self._iterator = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


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


def _train_rows(config, source, views, extra) -> examples.TrainRow:
  order = examples.EpochOrder(len(source), config.train.steps_per_epoch * config.data.batch_size,
                              config.train.seed)
  return examples.TrainRow(source, order, config.model.img_size, tuple(config.data.crop_scale),
                           config.train.seed, views, extra)


def pretrain_loader(config, source=None) -> Loader:
  """MoBY batches for this process: {"view1", "view2": uint8 (b, S, S, 3) crops (float32
  normalised views when augment.on_device is false), "row": int64 global row, "bad":
  int32 unreadable source index or -1}; b = data.batch_size / process count."""
  source = build_source(config.data, "train") if source is None else source
  row_fn = _train_rows(config, source, ("view1", "view2"), ("row", "bad"))
  host_fn = None if config.augment.on_device else _host_augment(config)
  return Loader(_stream(row_fn, config.data.batch_size, config.data), source, host_fn)


def linear_train_loader(config, source=None) -> Loader:
  """Linear-evaluation training batches (SPEC §3): {"image": uint8 RandomResizedCrop +
  flip, "label": int32, "bad": int32}, ordered like `pretrain_loader`."""
  source = build_source(config.data, "train") if source is None else source
  row_fn = _train_rows(config, source, ("image",), ("label", "bad"))
  return Loader(_stream(row_fn, config.data.batch_size, config.data), source)


def eval_loader(config, source, batch_size: int | None = None) -> Loader:
  """One pass over `source` (e.g. build_source(config.data, "val")) in order, with the
  eval transform (shorter side to floor(img_size / data.eval_crop_pct), centre crop):
  {"image": uint8, "label": int32, "valid": bool, "bad": int32}. The last global batch is
  padded so every batch is full; padding rows and examples that cannot be decoded have
  valid False (`bad` names the latter by source index) and must be left out of any
  metric."""
  check_config(config.data)  # data.eval_crop_pct, before it is used
  batch = batch_size or config.data.batch_size
  size = config.model.img_size
  resize = transforms.eval_resize(size, config.data.eval_crop_pct)
  row_fn = examples.EvalRow(source, size, resize)
  steps = -(-len(source) // batch)
  return Loader(_stream(row_fn, batch, config.data, length=steps), source)
