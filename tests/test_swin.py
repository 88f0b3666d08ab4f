"""Swin parity with an independent PyTorch reference (SPEC §1) and its building blocks."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import convert
from conftest import load_torch, nchw, perturb_norms_, rel_err, torch_state
from moby_jax.models import abstract_variables, build_encoder, layers, swin
import torch_reference as ref


def torch_swin_like(model, seed: int) -> ref.SwinTransformer:
  """The reference with the same architecture as a Flax Swin, random weights."""
  torch.manual_seed(seed)
  net = ref.like(model)
  perturb_norms_(net, seed)
  return net.eval()


def reference_variables(model, seed: int = 0) -> dict:
  """Random Flax variables taken from the reference (much faster than compiling init)."""
  return convert.torch_to_flax(torch_state(torch_swin_like(model, seed)), model)


PARITY_CASES = {
    "swin_tiny_224_w7": dict(name="swin_tiny"),
    "swin_tiny_64_w4_small_last_stages": dict(name="swin_tiny", img_size=64, window_size=4),
    "ape": dict(name="swin_mu", img_size=64, ape=True),
    "bn_variant": dict(name="swin_mu", img_size=64, norm_before_mlp="bn"),
    "no_patch_norm_with_head": dict(name="swin_mu", patch_norm=False, num_classes=10),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_parity_with_pytorch_reference(case):
  model = build_encoder(PARITY_CASES[case])
  net = torch_swin_like(model, seed=len(case))
  variables = convert.torch_to_flax(torch_state(net), model)
  x = np.random.default_rng(0).normal(size=(2, model.img_size, model.img_size, 3))
  x = x.astype(np.float32)

  out, stages = jax.jit(functools.partial(model.apply, return_stages=True))(variables, x)
  with torch.no_grad():
    want = net(nchw(x)).numpy()
    want_stages = [s.numpy() for s in net.forward_stages(nchw(x))]
  assert rel_err(out, want) < 1e-5
  assert len(stages) == len(model.depths)
  for got, exp in zip(stages, want_stages):
    assert got.shape == exp.shape
    assert rel_err(got, exp) < 1e-5


def test_small_stage_rule_swin_tiny_64():
  """At 64 px with window 4 the stages are 16, 8, 4, 2: the last two use one window."""
  model = build_encoder(dict(name="swin_tiny", img_size=64, window_size=4))
  assert model.stage_resolutions() == [(16, 16), (8, 8), (4, 4), (2, 2)]
  geo = model.block_geometry()
  assert geo[0] == [(4, 0), (4, 2)]
  assert geo[1] == [(4, 0), (4, 2)]
  assert geo[2] == [(4, 0)] * 6
  assert geo[3] == [(2, 0)] * 2
  # Swin-T at 224: last stage is 7x7, so no shift there.
  assert build_encoder(dict(name="swin_tiny")).block_geometry()[3] == [(7, 0), (7, 0)]


def test_bn_variant_training_mode_matches_pytorch():
  """Train-mode BatchNorm: same output and same running statistics (unbiased var)."""
  model = build_encoder(dict(name="swin_mu", norm_before_mlp="bn"))
  net = torch_swin_like(model, seed=3).train()
  variables = convert.torch_to_flax(torch_state(net), model)
  x = np.random.default_rng(1).normal(size=(3, 32, 32, 3)).astype(np.float32)
  out, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
  with torch.no_grad():
    want = net(nchw(x)).numpy()
  assert rel_err(out, want) < 1e-5
  exported = convert.flax_to_torch({**variables, **updated}, model)
  for key, value in torch_state(net).items():
    if "running" in key or "num_batches" in key:
      np.testing.assert_allclose(exported[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
  count = exported["layers.0.blocks.0.norm2.num_batches_tracked"]
  assert count.shape == () and count.dtype == np.int64 and count == 1


def test_relative_position_index_formula():
  for ws in (2, 4, 7):
    idx = swin.relative_position_index(ws)
    assert idx.shape == (ws * ws, ws * ws) and idx.dtype == np.int64
    for a in range(ws * ws):
      for b in range(ws * ws):
        dy, dx = a // ws - b // ws, a % ws - b % ws
        assert idx[a, b] == (dy + ws - 1) * (2 * ws - 1) + (dx + ws - 1)
    np.testing.assert_array_equal(idx, ref.relative_position_index(ws).numpy())


def _region(coord: int, size: int, ws: int, shift: int) -> int:
  return 0 if coord < size - ws else (1 if coord < size - shift else 2)


@pytest.mark.parametrize("h,w,ws,shift", [(8, 8, 4, 2), (56, 56, 7, 3), (12, 8, 4, 2)])
def test_shifted_window_mask(h, w, ws, shift):
  mask = swin.shifted_window_mask(h, w, ws, shift)
  assert mask.shape == ((h // ws) * (w // ws), ws * ws, ws * ws)
  assert set(np.unique(mask)) <= {0.0, -100.0}
  for win in range(mask.shape[0]):
    wy, wx = divmod(win, w // ws)
    labels = [(_region(wy * ws + t // ws, h, ws, shift), _region(wx * ws + t % ws, w, ws, shift))
              for t in range(ws * ws)]
    for a in range(ws * ws):
      for b in range(ws * ws):
        assert mask[win, a, b] == (0.0 if labels[a] == labels[b] else -100.0)
  np.testing.assert_array_equal(mask, ref.shifted_window_mask(h, w, ws, shift).numpy())


class _DropPathProbe(nn.Module):
  rate: float

  @nn.compact
  def __call__(self, x, deterministic):
    return layers.drop_path(x, self.rate, deterministic, "drop_path")


def test_drop_path_statistics():
  rate, n = 0.3, 20000
  x = jnp.ones((n, 3, 5))
  probe = _DropPathProbe(rate)
  np.testing.assert_array_equal(probe.apply({}, x, True), x)
  y = np.asarray(probe.apply({}, x, False, rngs={"dropout": jax.random.key(0)}))
  kept = y[:, 0, 0] != 0
  # Whole samples are kept or dropped, never single elements.
  assert np.all((y != 0) == kept[:, None, None])
  sigma = np.sqrt(rate * (1 - rate) / n)
  assert abs(kept.mean() - (1 - rate)) < 5 * sigma
  np.testing.assert_allclose(y[kept], 1 / (1 - rate), rtol=1e-6)


def test_drop_path_off_in_eval_and_on_in_training():
  model = build_encoder(dict(name="swin_mu", drop_path_rate=0.5))
  variables = reference_variables(model)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  plain = jax.jit(build_encoder(dict(name="swin_mu")).apply)(variables, x)
  np.testing.assert_array_equal(jax.jit(model.apply)(variables, x), plain)
  train = jax.jit(functools.partial(model.apply, train=True))
  dropped = train(variables, x, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(dropped, plain)


def test_bfloat16_close_to_float32():
  model32 = build_encoder(dict(name="swin_tiny", img_size=64, window_size=4))
  model16 = build_encoder(dict(name="swin_tiny", img_size=64, window_size=4, dtype="bfloat16"))
  variables = reference_variables(model32)
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  f32 = jax.jit(model32.apply)(variables, x)
  f16 = jax.jit(model16.apply)(variables, x)
  assert f16.dtype == jnp.float32  # features come back in float32
  assert rel_err(f16, f32) < 2e-2
  leaves = jax.tree.leaves(abstract_variables(model16))
  assert all(leaf.dtype == jnp.float32 for leaf in leaves)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_same_values_and_gradients(policy):
  plain = build_encoder(dict(name="swin_mu", norm_before_mlp="bn", drop_path_rate=0.1))
  remat = build_encoder(dict(name="swin_mu", norm_before_mlp="bn", drop_path_rate=0.1,
                             remat=policy))
  variables = reference_variables(plain)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))

  def loss(model, params):
    out, _ = model.apply({**variables, "params": params}, x, train=True,
                         rngs={"dropout": jax.random.key(3)}, mutable=["batch_stats"])
    return jnp.sum(out ** 2)

  v1, g1 = jax.jit(jax.value_and_grad(functools.partial(loss, plain)))(variables["params"])
  v2, g2 = jax.jit(jax.value_and_grad(functools.partial(loss, remat)))(variables["params"])
  np.testing.assert_allclose(v1, v2, rtol=1e-6)
  # Recomputation may fuse differently: equal up to float32 rounding.
  jax.tree.map(lambda a, b: rel_err(a, b) < 1e-5 or pytest.fail("gradients differ"), g1, g2)


@pytest.mark.parametrize("fields,needle", [
    (dict(name="swin_tiny", img_size=100), "100x100"),           # 100 / 4 = 25, odd stage
    (dict(name="swin_tiny", img_size=226), "patch size 4"),      # not divisible by patch
    (dict(name="swin_tiny", img_size=224, window_size=5), "window 5"),
])
def test_bad_geometry_raises_before_compilation(fields, needle):
  with pytest.raises(ValueError, match="model.img_size") as err:
    build_encoder(fields)
  assert needle in str(err.value)
  assert "model.window_size" in str(err.value) and "model.patch_size" in str(err.value)


def test_wrong_input_size_raises_at_trace_time():
  model = build_encoder(dict(name="swin_mu"))
  variables = reference_variables(model)
  with pytest.raises(ValueError, match=r"input images are 48x48.*model.img_size"):
    jax.jit(model.apply)(variables, jnp.zeros((1, 48, 48, 3)))


def test_unknown_model_fields_and_names_raise():
  with pytest.raises(ValueError, match="unknown model.name 'swin_huge'"):
    build_encoder(dict(name="swin_huge"))
  with pytest.raises(ValueError, match="model.ape is not a field of deit_small"):
    build_encoder(dict(name="deit_small", ape=True))
  with pytest.raises(ValueError, match="model.dtype"):
    build_encoder(dict(name="swin_mu", dtype="float16"))
  with pytest.raises(ValueError, match="norm_before_mlp"):
    build_encoder(dict(name="swin_mu", norm_before_mlp="gn"))
