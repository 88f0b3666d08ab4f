"""Initialisation as the released code does it, parameter kind by parameter kind (SPEC §8).

Each kind of parameter of our Swin-T / DeiT-S / MoBY heads is compared with the same
shape drawn by PyTorch's own initialiser, the one the released code applies to it:
timm's trunc_normal_(std=.02) (bounds +-2 absolute) for Linear weights, relative position
bias tables and position embeddings; PyTorch's default kaiming_uniform_(a=sqrt(5)) for
the MoBY heads' Linears and the patch-embedding convolutions; ones and zeros for norms.
Mean, standard deviation and bounds are checked, plus a two-sample Kolmogorov-Smirnov
test on the large tensors.
"""

import math

import jax
import numpy as np
import pytest
import torch
from scipy import stats

from configs import moby_deit_small, moby_swin_tiny
from moby_jax import moby, train_step

torch.manual_seed(0)


@pytest.fixture(scope="module", params=["swin", "deit"])
def released(request):
  """(online params, config) of the released recipe's MoBY network, at initialisation."""
  config = (moby_swin_tiny if request.param == "swin" else moby_deit_small).get_config()
  config.model.dtype = "float32"
  online, _ = moby.build_branches(config)
  variables = jax.jit(lambda key: online.init(key, np.zeros((1, 224, 224, 3), np.float32),
                                              train=False))(jax.random.key(0))
  return jax.device_get(variables["params"]), request.param


def leaves(params, predicate):
  """Flattened arrays of every leaf whose '/'-joined path satisfies `predicate`."""
  found = []
  for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = "/".join(p.key for p in path)
    if predicate(name):
      found.append((name, np.asarray(value)))
  assert found
  return found


def torch_sample(shape, init) -> np.ndarray:
  t = torch.empty(shape)
  init(t)
  return t.numpy().ravel()


def same_distribution(ours: np.ndarray, theirs: np.ndarray, what: str):
  ours, theirs = ours.ravel(), theirs.ravel()
  assert abs(ours.mean() - theirs.mean()) < 5 * theirs.std() / math.sqrt(ours.size) + 1e-7, what
  assert abs(ours.std() / theirs.std() - 1) < 0.03 + 5 / math.sqrt(ours.size), what
  if ours.size >= 1000:
    assert stats.ks_2samp(ours, theirs).pvalue > 1e-4, what


def timm_trunc_normal(t):
  torch.nn.init.trunc_normal_(t, std=0.02, a=-2.0, b=2.0)


def torch_default_weight(t):
  torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def torch_default_bias(fan_in):
  bound = 1 / math.sqrt(fan_in)
  return lambda t: torch.nn.init.uniform_(t, -bound, bound)


def test_backbone_linear_weights_and_tables_are_timm_truncated_normal(released):
  params, _ = released
  encoder = params["encoder"]
  for name, w in leaves(encoder, lambda n: n.endswith("kernel") and "patch_embed" not in n):
    same_distribution(w, torch_sample(w.shape, timm_trunc_normal), name)
    assert np.abs(w).max() < 2.0
  tables = [w for _, w in leaves(encoder, lambda n: "relative_position_bias_table" in n
                                 or "pos_embed" in n or "cls_token" in n)]
  pooled = np.concatenate([t.ravel() for t in tables])
  same_distribution(pooled, torch_sample(pooled.shape, timm_trunc_normal),
                    "bias tables / position embeddings")
  for name, b in leaves(encoder, lambda n: n.endswith("bias") and "patch_embed" not in n
                        and "norm" not in n):
    assert not b.any(), name


def test_moby_heads_keep_pytorch_default_linear_init(released):
  params, _ = released
  for head in ("projector", "predictor"):
    for name, w in leaves(params[head], lambda n: n.endswith("kernel")):
      fan_in = w.shape[0]  # Flax kernels are (in, out)
      same_distribution(w, torch_sample(w.shape[::-1], torch_default_weight), f"{head} {name}")
      assert np.abs(w).max() <= 1 / math.sqrt(fan_in)
      bias = params[head][name.split("/")[0]]["bias"]
      same_distribution(bias, torch_sample(bias.shape, torch_default_bias(fan_in)),
                        f"{head} {name} bias")


def test_patch_embedding_keeps_pytorch_default_conv_init(released):
  params, _ = released
  proj = params["encoder"]["patch_embed"]["proj"]
  kh, kw, cin, cout = proj["kernel"].shape
  fan_in = kh * kw * cin
  conv = torch.nn.Conv2d(cin, cout, kh, stride=kh)
  same_distribution(proj["kernel"], conv.weight.detach().numpy(), "patch_embed.proj.weight")
  same_distribution(proj["bias"], torch_sample((cout,), torch_default_bias(fan_in)),
                    "patch_embed.proj.bias")


def test_norms_start_at_one_and_zero(released):
  params, _ = released
  for name, v in leaves(params, lambda n: "norm" in n.split("/")[-2] or "linear_hidden_2" in n):
    want = 1.0 if name.endswith("scale") else 0.0
    np.testing.assert_array_equal(v, want, err_msg=name)
