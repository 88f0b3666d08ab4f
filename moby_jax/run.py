"""One construction of a pre-training run, shared by the trainer and the pod planner.

`Pretraining(config, mesh)` checks the config against the mesh, then builds everything a
run compiles, once: the online and target branches, the optimizer, the abstract train
state and its shardings (FSDP or replicated), and the jitted step. The trainer
(`moby_jax.pretrain`) creates or restores its state and steps with it; the planner
(`moby_jax.plan`) lowers the same jitted step with the same shardings for devices it does
not have. `make_train_step` and `create_train_state` are the public shortcuts.
"""

import functools
import math
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from moby_jax import optim, parallel, train_step
from moby_jax.moby import build_branches
from moby_jax.state import TrainState

# XLA:CPU compiles the step with its memory-optimised scheduler: a 15% smaller temporary
# buffer (1.43 vs 1.69 GiB for Swin-T at batch 8), so fewer fresh pages to fault in per
# step (measurements in bench/README.md), and the same numbers bit for bit
# (tests/test_train_step.py::test_cpu_scheduler_option_keeps_the_numbers).
CPU_COMPILER_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def sharded_shapes(abstract, shardings):
  """`jax.ShapeDtypeStruct`s of `abstract` (a pytree of shapes) carrying `shardings`."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


class Pretraining:
  """A MoBY pre-training run of `config` on `mesh` (default: all devices of all processes).

  Raises ValueError naming the config field when the config cannot train on the mesh,
  or (with eval.enabled) when its linear probe could not run, before anything compiles. Attributes:
    config, mesh, online, target (the branch modules), tx (the optimizer),
    state_shardings:  the TrainState's shardings (config.parallel.fsdp or replicated),
    abstract_state:   its shapes and dtypes with those shardings (restore and lowering
                      target),
    fsdp_left_whole:  with FSDP, the large leaves it could not shard (path, bytes),
    step:             `step(state, batch) -> (state, metrics)`, jitted once; `step.jitted`
                      is the `jax.jit` object (lower it with `abstract_state` and
                      `abstract_batch()`).
  """

  def __init__(self, config, mesh: Mesh | None = None):
    self.config = config
    self.mesh = parallel.mesh_for(config) if mesh is None else mesh
    train_step.check_config(config, self.mesh.size)
    check_mesh(config, self.mesh)
    if config.eval.enabled:  # the probe runs only after pre-training: check it first
      check_probe(config, self.mesh.size)
    self.online, self.target = build_branches(config)
    self.tx = optim.make_optimizer(config)
    self._init = functools.partial(train_step.init_state, config, self.online, self.tx)
    abstract = jax.eval_shape(self._init, jax.random.key(0))
    self.state_shardings = parallel.state_shardings(abstract, self.mesh,
                                                    config.parallel.fsdp)
    self.abstract_state = sharded_shapes(abstract, self.state_shardings)
    self.fsdp_left_whole = (parallel.fsdp_left_whole(abstract, self.state_shardings)
                            if config.parallel.fsdp else [])
    self.step = self._make_step()

  def _make_step(self):
    config, mesh, online = self.config, self.mesh, self.online
    step_fn = functools.partial(train_step.train_step, config=config, online=online,
                                target=self.target, tx=self.tx,
                                fsdp=self.state_shardings if config.parallel.fsdp else None)
    on_cpu = mesh.devices.flat[0].platform == "cpu"
    jitted = jax.jit(step_fn, in_shardings=(self.state_shardings, parallel.batch_sharding(mesh)),
                     out_shardings=(self.state_shardings, parallel.replicated(mesh)),
                     donate_argnums=0,
                     compiler_options=CPU_COMPILER_OPTIONS if on_cpu else None)

    def step(state: TrainState, batch: dict[str, Any]):
      train_step.check_batch(batch, config, online.encoder.image_hw)
      return jitted(state, parallel.to_global(batch, mesh))

    step.jitted = jitted
    return step

  def init_state(self, rng: jax.Array) -> TrainState:
    """A fresh train state, created directly with its shardings (see `create_train_state`)."""
    return jax.jit(self._init, out_shardings=self.state_shardings)(rng)

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the step takes, as sharded shapes: {"view1", "view2"}, uint8 crops
    (config.augment.on_device) or float32 normalised views."""
    dtype = np.uint8 if self.config.augment.on_device else np.float32
    shape = (self.config.data.batch_size, *self.online.encoder.image_hw, 3)
    sharding = parallel.batch_sharding(self.mesh)
    return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
            for name in ("view1", "view2")}


def make_train_step(config, mesh: Mesh | None = None):
  """A jitted `step(state, batch) -> (state, metrics)` for `config` on `mesh`.

  `batch` is {"view1", "view2"}: float32 NHWC normalised views when
  `config.augment.on_device` is false, uint8 crops otherwise. Host numpy arrays are
  placed on the mesh (each process passes its slice of the global batch); global jax
  arrays are used as they are. The old state is donated: do not reuse it.
  """
  return Pretraining(config, mesh).step


def create_train_state(config, rng: jax.Array, mesh: Mesh | None = None) -> TrainState:
  """A fresh train state, created directly with its shardings on `mesh` (default: all devices).

  The target starts as a copy of the online encoder/projector, queues are random unit
  rows, the step is 0 and the step randomness comes from `config.train.seed`.
  """
  return Pretraining(config, mesh).init_state(rng)


def check_mesh(config, mesh: Mesh) -> None:
  """Raises ValueError when `mesh` is not the one parallel.fsdp_group asks for."""
  group = parallel.fsdp_group(config)
  if group and not config.parallel.fsdp:
    raise ValueError(f"parallel.fsdp_group ({group}) shards the state within groups of "
                     "devices: it needs parallel.fsdp=True")
  want = group if 1 < group < mesh.size else None
  if mesh.shape.get(parallel.FSDP) != want:
    raise ValueError(f"parallel.fsdp_group={group} needs a "
                     f"{'data x fsdp' if want else '1-D data'} mesh, got {dict(mesh.shape)}: "
                     "build it with moby_jax.parallel.mesh_for(config, devices)")


def check_probe(config, num_devices: int) -> None:
  """Raises ValueError naming the eval.linear.* field that cannot work, before pre-training
  (the probe of eval.enabled runs only after it)."""
  probe = config.eval.linear
  if probe.batch_size <= 0 or probe.batch_size % num_devices:
    raise ValueError(f"eval.linear.batch_size ({probe.batch_size}) must be positive and "
                     f"divisible by the number of devices ({num_devices})")
  if config.data.num_train_examples < probe.batch_size:
    raise ValueError(f"eval.linear.batch_size ({probe.batch_size}) is larger than the "
                     f"training split ({config.data.num_train_examples} images)")
  if probe.epochs < 1:
    raise ValueError(f"eval.linear.epochs must be >= 1, got {probe.epochs}")
  if not 0 <= probe.warmup_epochs <= probe.epochs:
    raise ValueError(f"eval.linear.warmup_epochs ({probe.warmup_epochs}) must be within "
                     f"[0, eval.linear.epochs={probe.epochs}]")
  if not (math.isfinite(probe.base_lr) and probe.base_lr > 0):
    raise ValueError(f"eval.linear.base_lr must be a positive number, got {probe.base_lr}")
  if not 0 <= probe.label_smoothing < 1:
    raise ValueError(f"eval.linear.label_smoothing must be in [0, 1), got "
                     f"{probe.label_smoothing}")


def probe_config(config, num_classes: int) -> ml_collections.ConfigDict:
  """The linear-probe config for the quick evaluation of a pre-training run (eval.linear)."""
  probe = config.eval.linear
  return ml_collections.ConfigDict(dict(
      task="linear", model=config.model.to_dict(),
      linear=dict(source="", branch="online", step=-1, num_classes=num_classes,
                  label_smoothing=probe.label_smoothing),
      optim=dict(name="sgd", base_lr=probe.base_lr, warmup_lr=0.0, min_lr=0.0, momentum=0.9,
                 weight_decay=0.0, clip_grad=5.0, reference_batch=512),
      data=dict(config.data.to_dict(), batch_size=probe.batch_size),
      train=dict(config.train.to_dict(), epochs=probe.epochs,
                 warmup_epochs=probe.warmup_epochs, log_every_steps=10 ** 9,
                 checkpoint_every_steps=0,
                 steps_per_epoch=config.data.num_train_examples // probe.batch_size),
      eval=dict(enabled=True, every_epochs=0), parallel=dict(fsdp=False, fsdp_group=0)))
