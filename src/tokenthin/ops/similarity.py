"""Similarity helpers shared by matching, selection and scores.

:func:`per_sample_matmul` builds pairwise products one sample at a time so that a sample's result is bitwise
independent of the rest of its batch (see :mod:`tokenthin.ops.select`)."""

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


def per_sample_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b^T`` for (B, M, D) x (B, N, D) -> (B, M, N), one GEMM per sample.

    One GEMM per sample (instead of one batched GEMM), on 64-byte-aligned operands, keeps
    every sample's result bitwise identical to running that sample alone: BLAS libraries may
    sum in a different order for a batched call, and (MKL) for operands at a different memory
    alignment, which a slice of a batch can be. See the conventions in :mod:`tokenthin.ops.select`.
    """
    if torch.compiler.is_compiling():  # a trace has no data pointers: the same GEMMs on fresh (aligned) copies
        return torch.stack([torch.mm(a[i].clone(), b[i].clone().transpose(0, 1)) for i in range(a.shape[0])])
    if a.shape[0] == 1:
        return torch.mm(_aligned(a[0]), _aligned(b[0]).transpose(0, 1)).unsqueeze(0)
    out = torch.empty(a.shape[0], a.shape[1], b.shape[1], dtype=torch.float32, device=a.device)
    for i in range(a.shape[0]):  # loop over samples, not tokens
        out[i].copy_(torch.mm(_aligned(a[i]), _aligned(b[i]).transpose(0, 1)))
    return out


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` if it is contiguous and 64-byte aligned (as a fresh allocation is), else a copy."""
    if t.is_contiguous() and t.data_ptr() % 64 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def cosine_distance(x: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, N, N) float32 cosine distance ``1 - cos``; entry [i, j] = d(i, j)."""
    xn = normalize(x)
    return per_sample_matmul(xn, xn).neg_().add_(1.0)  # == 1 - cos, bit for bit, in place
