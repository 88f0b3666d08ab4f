"""Device mesh, shardings and host -> global array placement.

One `data` axis over every device of every process. The batch is split along it; the
state is replicated, or (config.parallel.fsdp) its params, target params and optimizer
state are sharded along the same axis, ZeRO-3 style, and XLA gathers them where needed.
Because the train step is written for the global batch, BatchNorm statistics and the
key enqueue span all devices without hand-written collectives.
"""

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"
# Leaves smaller than this stay replicated under FSDP: sharding them saves nothing.
FSDP_MIN_SIZE = 2 ** 12


def initialize_distributed() -> None:
  """Joins a multi-process run when the environment describes one (no-op otherwise).

  Reads JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID when set;
  otherwise lets `jax.distributed.initialize` auto-detect (SLURM, TPU pods, ...) only if
  MOBY_DISTRIBUTED=1.
  """
  if "JAX_COORDINATOR_ADDRESS" in os.environ:
    jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"],
                               int(os.environ["JAX_NUM_PROCESSES"]),
                               int(os.environ["JAX_PROCESS_ID"]))
  elif os.environ.get("MOBY_DISTRIBUTED") == "1":
    jax.distributed.initialize()


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh with axis `data` over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`."""
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_sharding(leaf, mesh: Mesh) -> NamedSharding:
  """Shards the largest axis of `leaf` that the mesh size divides; small leaves replicate."""
  n = mesh.shape[DATA]
  shape = tuple(leaf.shape)
  if n == 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
    return replicated(mesh)
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % n == 0:
      spec = [None] * len(shape)
      spec[axis] = DATA
      return NamedSharding(mesh, P(*spec))
  return replicated(mesh)


def state_shardings(abstract_state, mesh: Mesh, fsdp: bool):
  """Shardings for a TrainState: FSDP for params/target/optimizer when asked, else replicated."""
  rep = replicated(mesh)
  if not fsdp:
    return jax.tree.map(lambda _: rep, abstract_state)
  shard = lambda tree: jax.tree.map(lambda leaf: fsdp_sharding(leaf, mesh), tree)
  return abstract_state.replace(
      **{k: jax.tree.map(lambda _: rep, getattr(abstract_state, k))
         for k in ("step", "batch_stats", "target_batch_stats", "queue1", "queue2",
                   "queue_ptr", "rng", "skipped_steps")},
      params=shard(abstract_state.params), target_params=shard(abstract_state.target_params),
      opt_state=shard(abstract_state.opt_state))


def to_global(batch, mesh: Mesh):
  """Places a batch on the mesh, split along its leading axis.

  Global jax arrays pass through (resharded if needed). Host (numpy) arrays are this
  process's part of the global batch: with one process, the whole batch; with several,
  each process passes its own consecutive slice of the global batch, in process order.
  """
  sharding = batch_sharding(mesh)

  def place(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x if x.sharding == sharding else jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jax.process_count() == 1:
      return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))

  return jax.tree.map(place, batch)


def global_rows(local: np.ndarray) -> np.ndarray:
  """This process's rows of a global batch (host numpy) -> the whole batch, in global
  (process-major) order, on every process. A collective: all processes call it."""
  if jax.process_count() == 1:
    return np.asarray(local)
  from jax.experimental import multihost_utils
  local = np.asarray(local)
  return np.asarray(multihost_utils.process_allgather(local)).reshape(-1, *local.shape[1:])


def union_over_processes(values) -> set[int]:
  """The union of every process's set of non-negative ints, on every process. A
  collective: all processes call it, each with its own (possibly empty) values."""
  values = sorted({int(v) for v in values})
  if jax.process_count() == 1:
    return set(values)
  from jax.experimental import multihost_utils
  longest = int(np.max(multihost_utils.process_allgather(np.int64(len(values)))))
  padded = np.full(max(longest, 1), -1, np.int64)
  padded[:len(values)] = values
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return {int(v) for v in gathered.ravel() if v >= 0}
