"""Device mesh, shardings and host -> global array placement.

One `data` axis over every device of every process. The batch is split along it; the
state is replicated, or (config.parallel.fsdp) its params, target params and optimizer
state are sharded along the same axis, ZeRO-3 style, and XLA gathers them where needed.
With `parallel.fsdp_group=k` (1 < k < devices) the mesh is 2-D, `data` x `fsdp` (k
consecutive devices per group: a host's GPUs, neighbouring TPU chips): the batch is split
over both axes, the state is sharded within each group and replicated across groups, so
gathers stay within a group and only the gradient shards are reduced across them.
Because the train step is written for the global batch, BatchNorm statistics and the
key enqueue span all devices without hand-written collectives.
"""

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"
FSDP = "fsdp"
# Leaves smaller than this stay replicated under FSDP: sharding them saves nothing.
FSDP_MIN_SIZE = 2 ** 12


_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
          "SLURM_LOCALID")


def _int_env(name: str, default: int = 1) -> int:
  try:
    return int(os.environ.get(name, default))
  except ValueError:
    return default


def cluster_environment() -> str | None:
  """The multi-process cluster the environment describes, or None for a single process.

  "slurm": an srun step of more than one task (SLURM_NTASKS > 1); "openmpi": mpirun with
  more than one rank; "tpu": a multi-host Cloud TPU slice on GKE (TPU_WORKER_HOSTNAMES
  lists several hosts); "kubernetes": an indexed Job with `jax[k8s]` installed. These are
  the environments `jax.distributed.initialize()` configures itself from.
  """
  if all(v in os.environ for v in _SLURM) and _int_env("SLURM_NTASKS") > 1:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in os.environ and _int_env("OMPI_COMM_WORLD_SIZE") > 1:
    return "openmpi"
  if len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
    return "tpu"
  if "KUBERNETES_SERVICE_HOST" in os.environ and "JOB_COMPLETION_INDEX" in os.environ:
    import importlib.util
    if importlib.util.find_spec("kubernetes") is not None:
      return "kubernetes"
  return None


def initialize_distributed() -> str | None:
  """Joins a multi-process run when the environment describes one; returns how (None: a
  single process, nothing done). Call it before anything else touches JAX.

  - JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID set: those (hand launches,
    the Kubernetes JobSet in launch/).
  - MOBY_DISTRIBUTED=1: `jax.distributed.initialize()` with no arguments, which asks the
    cluster (Cloud TPU VMs: launch/tpu_pod.sh). MOBY_DISTRIBUTED=0: never initialise.
  - Otherwise a cluster_environment() (SLURM, Open MPI, GKE TPU, Kubernetes with jax[k8s]):
    `jax.distributed.initialize()`. Under SLURM with one task per node, every GPU of the
    node is given to that task (JAX would give it one).
  """
  if "JAX_COORDINATOR_ADDRESS" in os.environ:
    jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"],
                               int(os.environ["JAX_NUM_PROCESSES"]),
                               int(os.environ["JAX_PROCESS_ID"]))
    return "explicit"
  forced = os.environ.get("MOBY_DISTRIBUTED")
  if forced == "0":
    return None
  cluster = "requested" if forced == "1" else cluster_environment()
  if cluster is None:
    return None
  local_device_ids = None
  if cluster == "slurm" and _int_env("SLURM_NTASKS_PER_NODE", 0) == 1:
    gpus = _int_env("SLURM_GPUS_ON_NODE", 0)
    local_device_ids = list(range(gpus)) if gpus else None
  jax.distributed.initialize(local_device_ids=local_device_ids)
  return cluster


DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def use_deterministic_ops() -> None:
  """Makes XLA pick deterministic GPU kernels (no atomics in reductions or scatters), so
  a resumed run is bit-identical to an uninterrupted one on GPUs too. Only takes effect
  before JAX starts its backend: call it first (train.py does, for train.deterministic)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if DETERMINISTIC_FLAG not in flags.split():
    os.environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_FLAG}".strip()


def check_deterministic(config) -> None:
  """Raises ValueError when train.deterministic is asked for on a GPU whose backend started
  without XLA's deterministic ops."""
  if (config.train.get("deterministic", False) and jax.default_backend() == "gpu"
      and DETERMINISTIC_FLAG not in os.environ.get("XLA_FLAGS", "").split()):
    raise ValueError("train.deterministic needs XLA_FLAGS to contain "
                     f"{DETERMINISTIC_FLAG} before JAX starts (train.py sets it; in Python "
                     "call moby_jax.parallel.use_deterministic_ops() first)")


def make_mesh(devices=None, fsdp_group: int = 0) -> Mesh:
  """The mesh over `devices` (default: all devices of all processes): 1-D, axis `data`;
  or, with 1 < `fsdp_group` < the device count (config.parallel.fsdp_group), 2-D
  `data` x `fsdp` with groups of `fsdp_group` consecutive devices."""
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices)
  if fsdp_group < 0 or (fsdp_group > 1 and n % fsdp_group):
    raise ValueError(f"parallel.fsdp_group ({fsdp_group}) must divide the number of "
                     f"devices ({n}) (0: FSDP over all of them)")
  if 1 < fsdp_group < n:
    return Mesh(np.asarray(devices).reshape(n // fsdp_group, fsdp_group), (DATA, FSDP))
  return Mesh(np.asarray(devices), (DATA,))


def mesh_for(config, devices=None) -> Mesh:
  """`make_mesh` for a run of `config` (its parallel.fsdp_group)."""
  return make_mesh(devices, fsdp_group=fsdp_group(config))


def fsdp_group(config) -> int:
  """config.parallel.fsdp_group (0 in configs saved before the field existed)."""
  return int(config.parallel.get("fsdp_group", 0))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device (`data`, or `data` x `fsdp`)."""
  return NamedSharding(mesh, P(DATA) if FSDP not in mesh.axis_names else P((DATA, FSDP)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_axis(mesh: Mesh) -> str:
  """The mesh axis the state is sharded over: `fsdp` on a 2-D mesh, else `data`."""
  return FSDP if FSDP in mesh.axis_names else DATA


def fsdp_sharding(leaf, mesh: Mesh) -> NamedSharding:
  """Shards the largest axis of `leaf` that the FSDP axis (`fsdp` on a 2-D mesh, else
  `data`) divides; small leaves replicate."""
  name = fsdp_axis(mesh)
  n = mesh.shape[name]
  shape = tuple(leaf.shape)
  if n == 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
    return replicated(mesh)
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % n == 0:
      spec = [None] * len(shape)
      spec[axis] = name
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


def fsdp_left_whole(abstract_state, shardings) -> list[tuple[str, int]]:
  """The params, target and optimizer leaves that FSDP `shardings` (`state_shardings`
  with fsdp) left whole on every device although they are large enough to shard
  (FSDP_MIN_SIZE): no axis of theirs is a multiple of the FSDP axis (256 chips divide
  few of Swin's 96 * 2^k widths). (path, bytes), largest first."""
  left = []
  for part in ("params", "target_params", "opt_state"):
    leaves = jax.tree_util.tree_leaves_with_path(getattr(abstract_state, part))
    for (path, leaf), sharding in zip(leaves, jax.tree.leaves(getattr(shardings, part))):
      size = int(np.prod(leaf.shape, dtype=np.int64))
      if size >= FSDP_MIN_SIZE and sharding.is_fully_replicated and sharding.mesh.size > 1:
        left.append((part + "/" + jax.tree_util.keystr(path, simple=True, separator="/"),
                     size * np.dtype(leaf.dtype).itemsize))
  return sorted(left, key=lambda item: -item[1])


def describe_left_whole(left: list[tuple[str, int]], mesh: Mesh) -> str:
  """One line on `fsdp_left_whole`'s leaves, for the trainer's and the planner's output."""
  return (f"FSDP leaves {len(left)} leaves whole on every device "
          f"({sum(b for _, b in left) / 2 ** 20:.1f} MiB per device): "
          f"{mesh.shape[fsdp_axis(mesh)]} divides "
          f"none of their axes (largest: {left[0][0]}); parallel.fsdp_group=k shards "
          f"within groups of k devices instead")


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


def replicate(tree, mesh: Mesh):
  """A copy of `tree` (global arrays) replicated on every device of `mesh`, so every
  process can read all of it (FSDP-sharded leaves are gathered). A collective."""
  return jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)


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
