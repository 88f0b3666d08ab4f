"""Orbax checkpoints of a run: the train state, the data-iterator position and the config.

Layout: `WORKDIR/config.json` (the resolved config of the run) and
`WORKDIR/checkpoints/<step>/{state, data, config}`. Orbax writes each checkpoint into a
temporary directory and renames it when complete, so a save interrupted by a crash or a
kill leaves only a temporary directory, which is never listed as a step. Restoring also
falls back to the previous step if the latest one cannot be read.
"""

import json
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from moby_jax import files

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"


def config_to_dict(config) -> dict:
  """The config as plain JSON types (references resolved)."""
  return json.loads(config.to_json_best_effort())


def save_config(workdir, config) -> None:
  """Writes WORKDIR/config.json (only process 0 writes)."""
  if jax.process_index() == 0:
    path = files.path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(config_to_dict(config), indent=2) + "\n")


def load_config(path) -> ml_collections.ConfigDict:
  """The config saved in a workdir (config.json) or in one checkpoint step directory."""
  path = files.path(path)
  for candidate in (path / CONFIG_FILE, path / "config" / "metadata"):
    if candidate.is_file():
      return ml_collections.ConfigDict(json.loads(candidate.read_text()))
  raise FileNotFoundError(f"{path} has no saved config ({CONFIG_FILE}): not a moby_jax workdir "
                          "or checkpoint directory")


class Checkpointer:
  """Saves every `every_steps` steps (and when forced), keeps the last `keep`, async."""

  def __init__(self, workdir, config, every_steps: int, keep: int, async_save: bool = True):
    self.config = config
    self.every_steps = every_steps
    self.manager = ocp.CheckpointManager(
        files.path(workdir) / CHECKPOINTS,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_state: dict, force: bool = False) -> bool:
    """Saves (asynchronously) when `step` is a multiple of every_steps or `force`."""
    if not force and (self.every_steps <= 0 or step % self.every_steps):
      return False
    if step in self.manager.all_steps():
      return False
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config_to_dict(self.config))), force=True)

  def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict, int] | None:
    """(state, data_state, step) from `step` or the latest readable checkpoint; None if
    there is none. `abstract_state` carries shapes, dtypes and target shardings."""
    steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
    errors = []
    for candidate in steps:
      try:
        restored = self.manager.restore(candidate, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
      except Exception as err:  # a damaged checkpoint: fall back to the one before
        errors.append(f"step {candidate}: {type(err).__name__}: {err}")
        print(f"checkpoint: cannot restore step {candidate} ({type(err).__name__}: {err}); "
              "trying the previous one", flush=True)
        continue
      return restored.state, restored.data, candidate
    if errors and step is not None:
      raise ValueError(f"cannot restore checkpoint step {step}: {errors[0]}")
    if errors:
      raise ValueError("no checkpoint in the workdir can be restored:\n  " + "\n  ".join(errors))
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _split(path) -> tuple[epath.Path, int | None]:
  """A workdir or a step directory -> (workdir, step or None)."""
  path = files.path(path)
  if path.name.isdigit() and path.parent.name == CHECKPOINTS:
    return path.parent.parent, int(path.name)
  return path, None


def abstract_target(config, mesh):
  """Shapes, dtypes and shardings on `mesh` of the state a run of `config` saves: the
  restore target. Unlike a run's own (`moby_jax.run.Pretraining.abstract_state`), it does
  not check that the config could train on `mesh`: any mesh can read a checkpoint."""
  from moby_jax import evaluate, parallel
  from moby_jax.models import abstract_variables, build_encoder
  from moby_jax.run import sharded_shapes
  from moby_jax.train_step import abstract_state
  if config.get("task", "moby") == "linear":
    encoder = abstract_variables(build_encoder(config.model))
    abstract = jax.eval_shape(
        lambda rng: evaluate.create_linear_state(config, encoder, rng, mesh), jax.random.key(0))
    shardings = jax.tree.map(lambda _: parallel.replicated(mesh), abstract)
  else:
    abstract = abstract_state(config)
    shardings = parallel.state_shardings(abstract, mesh, config.parallel.fsdp)
  return sharded_shapes(abstract, shardings)


def load_state(path, step: int | None = None, mesh=None):
  """(state, config) from a workdir (latest complete checkpoint, or `step`) or from one
  checkpoint step directory (`WORKDIR/checkpoints/<step>`). The state is a TrainState
  (pre-training) or a LinearState (linear evaluation), replicated on `mesh` (default: all
  devices). Raises FileNotFoundError when there is nothing to load."""
  from moby_jax import parallel
  workdir, dir_step = _split(path)
  step = dir_step if step is None else step
  config = load_config(path if dir_step is not None else workdir)
  if not (workdir / CHECKPOINTS).is_dir():
    raise FileNotFoundError(f"{workdir} has no checkpoints/ folder: not a moby_jax workdir")
  mesh = parallel.make_mesh() if mesh is None else mesh
  if "parallel" in config:
    with config.unlocked():
      config.parallel.fsdp = False  # restore replicated, whatever the run used
      if "fsdp_group" in config.parallel:
        config.parallel.fsdp_group = 0
  ckpt = Checkpointer(workdir, config, every_steps=0, keep=None, async_save=False)
  try:
    restored = ckpt.restore(abstract_target(config, mesh), step)
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"{workdir / CHECKPOINTS} holds no complete checkpoint")
  return restored[0], config


def write_state(workdir, state, config) -> epath.Path:
  """Writes `state` as the complete checkpoint of step int(state.step), with config.json,
  so that train.py resumes from it (the data stream continues at that step)."""
  workdir = files.path(workdir)
  if (workdir / CHECKPOINTS).is_dir() and any((workdir / CHECKPOINTS).iterdir()):
    raise FileExistsError(f"{workdir / CHECKPOINTS} already holds checkpoints")
  step = int(jax.device_get(state.step))
  save_config(workdir, config)
  ckpt = Checkpointer(workdir, config, every_steps=0, keep=None, async_save=False)
  try:
    ckpt.save(step, state, {"next_index": step}, force=True)
  finally:
    ckpt.close()
  return workdir / CHECKPOINTS / str(step)
