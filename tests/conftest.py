"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch

from tiny import IMAGE

# tiny models run fastest on one thread (and CI machines are small and shared)
torch.set_num_threads(1)


@pytest.fixture
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, IMAGE, IMAGE, generator=g)
