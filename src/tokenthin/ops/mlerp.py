"""MLERP merging (Token Fusion, Kim et al., WACV 2024, arXiv 2312.01026): a slot that receives merged tokens becomes
their size-weighted mean rescaled to the largest norm among them, ``mean / |mean| * max_i |x_i|``, so merging does
not shrink features (an average of vectors pointing apart is shorter than each of them; SLERP keeps the norm of two,
MLERP of many). Slots that receive nothing are copied exactly, as in :func:`tokenthin.ops.assign.merge`."""

from __future__ import annotations

import torch

from .assign import Assignment
from .assign import merge as mean_merge

EPS = 1e-12


def merge(x: torch.Tensor, size: torch.Tensor, a: Assignment) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``a`` with MLERP: returns (x_out (B, n_out, D), size_out (B, n_out))."""
    out, size_out = mean_merge(x, size, a)
    if not a.merges:
        return out, size_out
    assert a.moving is not None
    b, _, d = x.shape
    acc = torch.promote_types(x.dtype, torch.float32)
    norms = x.to(acc).norm(dim=-1)  # (B, N)
    dst = a.dst.clamp(min=0) + torch.arange(b, device=x.device).unsqueeze(1) * a.n_out
    into = a.dst >= 0
    peak = torch.zeros(b * a.n_out, dtype=acc, device=x.device)
    peak.scatter_reduce_(0, dst[into], norms[into], reduce="amax")  # the largest norm of each slot's tokens
    hit = torch.zeros(b * a.n_out, dtype=torch.bool, device=x.device)
    hit[dst[a.moving]] = True  # slots that received merged tokens: only these change
    flat = out.view(b * a.n_out, d)
    rows = flat[hit].to(acc)
    flat[hit] = (rows / rows.norm(dim=-1, keepdim=True).clamp(min=EPS) * peak[hit].unsqueeze(-1)).to(x.dtype)
    return out, size_out
