"""Sequence bookkeeping shared by the prefill and in-LLM stages: packing the positions that stay, and narrowing a
call's per-position state to them. Pure tensor code; the host's formats (positions, rotary, masks) are the
adapter's (:mod:`tokenthin.adapters.hf_vlm`)."""

from __future__ import annotations

import torch

from .state import Call


def pack(mask: torch.Tensor, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the True entries of ``mask`` (B, T) in order, padded to the largest count: (idx, valid), both
    (B, T'). ``left``: padding goes first (generation layout); else last. Padding indices point at position 0."""
    b, t = mask.shape
    counts = mask.sum(1)
    n = int(counts.max()) if b else 0
    rank = mask.long().cumsum(1) - 1
    if left:
        rank = rank + (n - counts).unsqueeze(1)
    slot = torch.where(mask, rank, torch.full_like(rank, n))
    buf = torch.zeros(b, n + 1, dtype=torch.long, device=mask.device)
    buf.scatter_(1, slot, torch.arange(t, device=mask.device).expand(b, t))
    ar = torch.arange(n, device=mask.device).unsqueeze(0)
    valid = ar >= (n - counts).unsqueeze(1) if left else ar < counts.unsqueeze(1)
    return buf[:, :n], valid


def narrow(c: Call, idx: torch.Tensor, valid: torch.Tensor) -> None:
    """Make the call's visual / structure / valid masks follow the sequence narrowed to ``idx`` (B, T')."""
    assert c.vis is not None
    c.vis = c.vis.gather(1, idx) & valid
    c.struct = c.struct.gather(1, idx) & valid if c.struct is not None else None
    c.valid = valid
