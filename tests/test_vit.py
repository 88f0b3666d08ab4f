"""DeiT/ViT parity with an independent PyTorch reference (SPEC §1) and the golden fixture."""

import jax
import numpy as np
import pytest
import torch

import convert
from conftest import nchw, perturb_norms_, rel_err, torch_state
from moby_jax.models import build_encoder
import torch_reference as ref


def torch_vit_like(model, seed: int) -> ref.VisionTransformer:
  torch.manual_seed(seed)
  net = ref.like(model)
  perturb_norms_(net, seed)
  return net.eval()


@pytest.mark.parametrize("fields", [dict(name="deit_small"),
                                    dict(name="deit_mu", num_classes=7)])
def test_parity_with_pytorch_reference(fields):
  model = build_encoder(fields)
  net = torch_vit_like(model, seed=1)
  variables = convert.torch_to_flax(torch_state(net), model)
  x = np.random.default_rng(0).normal(size=(2, model.img_size, model.img_size, 3))
  x = x.astype(np.float32)
  out = jax.jit(model.apply)(variables, x)
  with torch.no_grad():
    want = net(nchw(x)).numpy()
  assert out.shape == want.shape
  assert rel_err(out, want) < 1e-5


def test_golden_fixture_features(vit_fixture):
  """The released timm ViT's features on its own weights (SPEC §7)."""
  model = build_encoder(dict(name="deit_mu"))
  weights = {k[len("weights/"):]: vit_fixture[k] for k in vit_fixture.files
             if k.startswith("weights/")}
  variables = convert.torch_to_flax(weights, model)
  out = model.apply(variables, vit_fixture["input_nhwc"])
  assert rel_err(out, vit_fixture["features"]) < 1e-5
  back = convert.flax_to_torch(variables, model)
  assert set(back) == set(weights)
  for key, value in weights.items():
    assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key


def test_bfloat16_close_to_float32():
  model32 = build_encoder(dict(name="deit_mu"))
  model16 = build_encoder(dict(name="deit_mu", dtype="bfloat16"))
  variables = convert.torch_to_flax(torch_state(torch_vit_like(model32, 0)), model32)
  x = np.random.default_rng(2).normal(size=(4, 32, 32, 3)).astype(np.float32)
  assert rel_err(jax.jit(model16.apply)(variables, x), jax.jit(model32.apply)(variables, x)) < 2e-2


def test_bad_geometry_raises():
  with pytest.raises(ValueError, match=r"230x230.*model.img_size, model.patch_size"):
    build_encoder(dict(name="deit_small", img_size=230))
