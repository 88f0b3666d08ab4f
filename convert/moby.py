"""Whole MoBY train states <-> the state_dict of the official MoBY checkpoint (SPEC §5),
and the encoders inside a train state.

The official file is `{"model": state_dict}` with `encoder.`/`encoder_k.` backbones,
`projector.`, `projector_k.`, `predictor.` heads (`linear_hidden.{1,2,...}`, `linear_out`),
`queue1`, `queue2` as (dim, K) and `queue_ptr` as an int64 (1,) tensor.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from convert.backbone import (StateDictMismatch, expected_torch_shapes, flax_to_torch, to_numpy,
                              torch_to_flax)
from moby_jax import moby
from moby_jax.state import TrainState
from moby_jax.run import Pretraining
from moby_jax.train_step import abstract_state

# Per encoder branch: (prefix in the official state_dict, params field, batch-stats field).
BRANCHES = {"online": ("encoder.", "params", "batch_stats"),
            "target": ("encoder_k.", "target_params", "target_batch_stats")}


def _parts(config):
  """(torch prefix, state field for params, field for batch stats, key, module) per part."""
  online, target = moby.build_branches(config)
  # The heads have no buffers, so they need no module (their shapes come from the state).
  return [
      (*BRANCHES["online"], "encoder", online.encoder),
      (*BRANCHES["target"], "encoder", target.encoder),
      ("projector.", "params", "batch_stats", "projector", None),
      ("projector_k.", "target_params", "target_batch_stats", "projector", None),
      ("predictor.", "params", "batch_stats", "predictor", None),
  ]


def _variables(state, params_field, stats_field, key) -> dict:
  out = {"params": getattr(state, params_field)[key]}
  stats = getattr(state, stats_field)
  if key in stats:
    out["batch_stats"] = stats[key]
  return out


def encoder_variables(state, config, branch: str = "online"):
  """(variables, module) of the online or target encoder of a train state."""
  variables = state.encoder(branch)
  return variables, moby.branch_encoder(config, branch)


def with_encoder(state: TrainState, variables: Mapping[str, Any]) -> TrainState:
  """`state` with `variables` ({"params"(, "batch_stats")}) as both the online and the
  target encoder (the target starts as a copy of the online network)."""
  fields = {}
  for _, params_field, stats_field in BRANCHES.values():
    fields[params_field] = {**getattr(state, params_field), "encoder": variables["params"]}
    if "batch_stats" in variables:
      fields[stats_field] = {**getattr(state, stats_field),
                             "encoder": variables["batch_stats"]}
  return state.replace(**fields)


def to_state_dict(state: TrainState, config) -> dict[str, np.ndarray]:
  """The official state_dict (numpy arrays, PyTorch names and layouts) of a host state."""
  sd = {}
  for prefix, params_field, stats_field, key, module in _parts(config):
    sd.update(flax_to_torch(_variables(state, params_field, stats_field, key), module, prefix))
  sd["queue1"] = np.ascontiguousarray(np.asarray(state.queue1).T)
  sd["queue2"] = np.ascontiguousarray(np.asarray(state.queue2).T)
  sd["queue_ptr"] = np.asarray([state.queue_ptr], np.int64)
  return sd


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
  """Every key of the official checkpoint for `config`, with its shape (nothing computed)."""
  abstract = abstract_state(config)
  shapes = {}
  for prefix, params_field, stats_field, key, module in _parts(config):
    shapes.update(expected_torch_shapes(
        module, prefix, abstract=_variables(abstract, params_field, stats_field, key)))
  rows, dim = abstract.queue1.shape
  shapes.update(queue1=(dim, rows), queue2=(dim, rows), queue_ptr=(1,))
  return shapes


def to_state(sd: Mapping[str, Any], config, step: int = 0, mesh=None) -> TrainState:
  """A train state from the state_dict of an official MoBY checkpoint.

  Every key is validated (missing, unexpected, mis-shaped keys and wrong buffers are all
  listed in one `StateDictMismatch`). The optimizer state is fresh (the PyTorch one is not
  carried over), `step` is the number of steps already done (drives the LR and momentum
  schedules) and the step randomness comes from config.train.seed. The state is placed on
  `mesh` (default: all devices) with the shardings of `moby_jax.run.Pretraining`.
  """
  run = Pretraining(config, mesh)
  abstract = run.abstract_state
  problems, fields = [], {"params": {}, "target_params": {}, "batch_stats": {},
                          "target_batch_stats": {}}
  prefixes = [p[0] for p in _parts(config)] + ["queue1", "queue2", "queue_ptr"]
  for name in sorted(k for k in sd if not any(k == p or k.startswith(p) and p.endswith(".")
                                             for p in prefixes)):
    problems.append(f"unexpected key: {name}")
  for prefix, params_field, stats_field, key, module in _parts(config):
    try:
      variables = torch_to_flax(sd, module, prefix,
                                abstract=_variables(abstract, params_field, stats_field, key))
    except StateDictMismatch as err:
      problems += str(err).splitlines()[1:]
      continue
    fields[params_field][key] = variables["params"]
    if "batch_stats" in variables:
      fields[stats_field][key] = variables["batch_stats"]

  queues = {}
  for name in ("queue1", "queue2"):
    want = abstract.queue1.shape[::-1]
    if name not in sd:
      problems.append(f"missing key: {name}")
    elif to_numpy(sd[name]).shape != want:
      problems.append(f"shape mismatch: {name} is {to_numpy(sd[name]).shape}, model needs {want}")
    else:
      queues[name] = to_numpy(sd[name]).T.astype(np.float32, order="C")
  if "queue_ptr" not in sd:
    problems.append("missing key: queue_ptr")
  elif to_numpy(sd["queue_ptr"]).size != 1:
    problems.append(f"shape mismatch: queue_ptr is {to_numpy(sd['queue_ptr']).shape}, needs (1,)")
  if problems:
    raise StateDictMismatch(f"checkpoint does not fit the config ({len(problems)} problems):"
                            "\n  " + "\n  ".join(p.strip() for p in problems))

  params = fields["params"]
  state = TrainState(
      step=np.asarray(step, np.int32), params=params, target_params=fields["target_params"],
      batch_stats=fields["batch_stats"], target_batch_stats=fields["target_batch_stats"],
      opt_state=run.tx.init(params),
      queue1=queues["queue1"], queue2=queues["queue2"],
      queue_ptr=np.asarray(to_numpy(sd["queue_ptr"]).reshape(()), np.int32),
      rng=np.asarray(jax.random.key_data(jax.random.key(config.train.seed))),
      skipped_steps=np.zeros((), np.int32))
  return jax.device_put(jax.tree.map(jnp.asarray, state), run.state_shardings)
