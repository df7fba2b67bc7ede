"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch

from tiny import IMAGE


@pytest.fixture
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, IMAGE, IMAGE, generator=g)
