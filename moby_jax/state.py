"""The MoBY train state: one pytree, everything a run needs to continue exactly."""

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  """Train state (all leaves are arrays; shardings come from `parallel`).

  step:               steps done so far (int32); drives the LR and momentum schedules.
  params:             online {"encoder", "projector", "predictor"}.
  target_params:      target {"encoder", "projector"} (momentum copies, no gradients).
  batch_stats:        online BatchNorm running statistics, same keys as params.
  target_batch_stats: target BatchNorm running statistics.
  opt_state:          optax state of the online params.
  queue1, queue2:     (queue_size, proj_dim) keys of view 1 / view 2, rows.
  queue_ptr:          next row to write (int32).
  rng:                raw key data (uint32); step randomness is fold_in(rng, step).
  skipped_steps:      steps whose loss or gradient was non-finite (no update applied).
  """
  step: jax.Array
  params: Any
  target_params: Any
  batch_stats: Any
  target_batch_stats: Any
  opt_state: Any
  queue1: jax.Array
  queue2: jax.Array
  queue_ptr: jax.Array
  rng: jax.Array
  skipped_steps: jax.Array

  def encoder(self, branch: str = "online") -> dict:
    """The online or the target encoder's variables: {"params"(, "batch_stats")}."""
    if branch not in ("online", "target"):
      raise ValueError(f"branch must be 'online' or 'target', got {branch!r}")
    online = branch == "online"
    params = self.params if online else self.target_params
    stats = self.batch_stats if online else self.target_batch_stats
    variables = {"params": params["encoder"]}
    if "encoder" in stats:
      variables["batch_stats"] = stats["encoder"]
    return variables
