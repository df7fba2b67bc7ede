"""Similarity helpers shared by matching, selection and scores."""

from __future__ import annotations

import torch


def normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """L2-normalise the last dimension (computed in float32 for half inputs, returned in float32)."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def cosine(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Batched cosine similarity: (B, N, D) x (B, M, D) -> (B, N, M), float32."""
    a = normalize(a)
    b = a if b is None else normalize(b)
    return a @ b.transpose(-1, -2)
