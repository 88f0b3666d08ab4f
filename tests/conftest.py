"""Shared test helpers: fixtures paths, error measures, PyTorch <-> numpy plumbing."""

import pathlib

import numpy as np
import pytest

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
