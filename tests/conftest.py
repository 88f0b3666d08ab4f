"""Shared test helpers: fixtures paths, error measures, PyTorch <-> numpy plumbing.

The whole test session sees 8 fake CPU devices (set before jax is imported), so that
multi-device equivalence can be tested; everything else runs on the first device.
"""

import importlib.util
import json
import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# With libtpu installed (requirements-plan.txt, for the pod planner), every JAX process
# would look for TPU chips and take libtpu's lock file. The tests run on the CPU (the
# planner compiles for TPUs it only describes), their subprocesses too.
if importlib.util.find_spec("libtpu") is not None:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import tempfile

import jax
import numpy as np
import pytest

# Tests that run the same program twice (determinism, resume, linear evaluation from two
# sources) reuse the compiled executables through JAX's persistent compilation cache.
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(tempfile.gettempdir(), "moby_jax_test_xla_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def rel_err(actual, expected) -> float:
  """Relative error ||actual - expected|| / ||expected|| (Frobenius, float64)."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def torch_state(module) -> dict[str, np.ndarray]:
  """A PyTorch module's state_dict as numpy arrays."""
  return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def load_torch(module, state: dict[str, np.ndarray]) -> None:
  """Loads numpy arrays into a PyTorch module with strict=True."""
  import torch
  module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()},
                         strict=True)


def perturb_norms_(module, seed: int) -> None:
  """Moves every norm weight/bias away from 1/0 and BN running stats away from 0/1.

  Default norm parameters hide a wrong mapping; perturbed ones expose it.
  """
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if p.ndim == 1:
        p.add_(0.2 * torch.randn(p.shape, generator=gen))
    for name, b in module.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(0.1 * torch.randn(b.shape, generator=gen))
      elif name.endswith("running_var"):
        b.copy_(0.5 + torch.rand(b.shape, generator=gen))


def assert_trees_equal(a, b):
  """Same tree paths, dtypes and values, bit for bit."""
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and np.array_equal(x, y), path


def nchw(x):
  """NHWC numpy -> NCHW torch tensor."""
  import torch
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


@pytest.fixture(scope="session")
def moby_fixture():
  return np.load(FIXTURES / "moby_tiny_swin.npz")


@pytest.fixture(scope="session")
def vit_fixture():
  return np.load(FIXTURES / "vit_tiny_features.npz")


def fixture_config(batch_size: int = 4):
  """The configuration of the golden MoBY fixture (SPEC §7), through config fields only.

  Tiny Swin, heads 32 -> 64 -> 32, queue 16, T 0.2, m0 0.99 over K = 10 steps, AdamW with
  a constant LR of 1e-3 (min_lr = base_lr, no warm-up, LR scaling reference = batch),
  weight decay 0.05, clip 5; host-side views (no on-device augmentation).
  """
  from configs import moby_swin_tiny
  meta = json.loads(str(np.load(FIXTURES / "moby_tiny_swin.npz")["meta"]))
  c = moby_swin_tiny.get_config("runlocal")
  c.model.update(name="swin_mu", img_size=meta["img_size"], window_size=meta["window_size"],
                 drop_path_rate=0.0, dtype="float32")
  c.moby.update(target_drop_path_rate=0.0, momentum=meta["momentum"],
                temperature=meta["temperature"], queue_size=meta["queue_size"],
                proj_hidden_dim=meta["proj_hidden_dim"], pred_hidden_dim=meta["pred_hidden_dim"],
                proj_dim=meta["proj_dim"], proj_layers=meta["proj_layers"],
                pred_layers=meta["pred_layers"])
  c.optim.update(base_lr=meta["lr"], min_lr=meta["lr"], warmup_lr=meta["lr"],
                 weight_decay=meta["weight_decay"], betas=tuple(meta["betas"]), eps=meta["eps"],
                 clip_grad=meta["clip_grad"], reference_batch=batch_size)
  c.data.update(batch_size=batch_size, num_train_examples=meta["total_steps"] * batch_size)
  c.train.update(epochs=1, warmup_epochs=0)
  c.augment.on_device = False
  return c


def noise_robust_config(batch_size):
  """The fixture config with Adam's eps at 1e-3 instead of 1e-8.

  Device-count equivalence compares two float32 computations that sum in different
  orders. With eps 1e-8 Adam turns the resulting 1e-7 gradient noise of the elements
  whose true gradient vanishes (the biases before a BatchNorm) into +-lr steps, which
  then leak into the keys; with eps 1e-3 the update stays a smooth function of the
  gradient and the whole state can be compared at 1e-5.
  """
  config = fixture_config(batch_size=batch_size)
  config.optim.eps = 1e-3
  return config
