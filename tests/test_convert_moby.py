"""Whole-state conversion to and from the official MoBY checkpoint (SPEC §5)."""

import jax
import numpy as np
import pytest

import convert
from conftest import fixture_config
from moby_jax import parallel

ONE_DEVICE = parallel.make_mesh(jax.devices()[:1])  # the fixture's batch of 4 on 1 device


def _init_entries(fx):
  return {k[len("init/"):]: fx[k] for k in fx.files if k.startswith("init/")}


def test_official_round_trip_is_bit_exact(moby_fixture):
  config = fixture_config()
  init = _init_entries(moby_fixture)
  state = convert.from_pytorch({"model": init, "epoch": 3}, config, mesh=ONE_DEVICE)
  assert state.queue1.shape == (16, 32) and int(state.step) == 0
  out = convert.to_pytorch(state, config, fmt="official", meta=False)
  assert set(out) == {"model"}
  sd = out["model"]
  assert set(sd) == set(init)
  for key, value in init.items():
    assert sd[key].dtype == value.dtype and sd[key].shape == value.shape, key
    assert np.array_equal(sd[key], value), key


def test_import_lists_every_problem_across_parts(moby_fixture):
  config = fixture_config()
  init = _init_entries(moby_fixture)
  init.pop("predictor.linear_out.bias")
  init.pop("queue2")
  init["projector_k.linear_hidden.1.weight"] = np.zeros((64, 31), np.float32)
  init["momentum_encoder.foo"] = np.zeros(3, np.float32)
  with pytest.raises(convert.StateDictMismatch) as err:
    convert.from_pytorch(init, config, mesh=ONE_DEVICE)
  msg = str(err.value)
  assert "4 problems" in msg
  assert "missing key: predictor.linear_out.bias" in msg
  assert "missing key: queue2" in msg
  assert "shape mismatch: projector_k.linear_hidden.1.weight is (64, 31)" in msg
  assert "unexpected key: momentum_encoder.foo" in msg


def test_unknown_format_raises(moby_fixture):
  config = fixture_config()
  state = convert.from_pytorch(_init_entries(moby_fixture), config, mesh=ONE_DEVICE)
  with pytest.raises(ValueError, match="unknown format 'onnx'"):
    convert.to_pytorch(state, config, fmt="onnx")
