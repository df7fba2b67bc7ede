"""Assignments: the one representation behind prune, merge, recycle and unmerge.

A reduction of N current tokens is described per sample by

* ``keep`` (B, N) bool: the tokens that become output slots, in their original order;
* ``target`` (B, N) long: for a token that is not kept, the index (into the current tokens) of the kept token
  it is merged into, or -1 to drop it.

:func:`build` turns that into ``dst`` (B, N): the output slot of every current token, or -1. :func:`merge` applies
it: each slot is the size-weighted mean of the tokens assigned to it, and its size is their summed size.
Samples may keep different counts; the output is padded to the largest count and padded slots have size 0.
``source`` (B, N0) maps every original token to its current slot (-1: dropped); :func:`compose_source` keeps it
up to date and :func:`unmerge` uses it to return a full per-original-token tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Assignment:
    """Where every current token goes: ``dst`` (B, N) slot index or -1; ``n_out`` slots (padded)."""

    dst: torch.Tensor
    slot_src: torch.Tensor  # (B, n_out): index of the kept token that represents each slot (0 for padding)
    counts: torch.Tensor  # (B,): slots used per sample
    n_out: int
    merges: bool  # whether any token is merged into another (False: a pure selection)


def build(keep: torch.Tensor, target: torch.Tensor | None = None) -> Assignment:
    """Build the slot map from a keep mask and merge targets (see module docstring)."""
    if keep.dtype != torch.bool or keep.dim() != 2:
        raise ValueError("keep must be a (B, N) bool tensor")
    b, n = keep.shape
    counts = keep.sum(1)
    n_out = int(counts.max()) if b > 0 else 0
    slot = keep.long().cumsum(1) - 1  # slot index of kept tokens
    dst = torch.where(keep, slot, torch.full_like(slot, -1))
    merges = False
    if target is not None:
        moving = (~keep) & (target >= 0)
        if bool(moving.any()):
            merges = True
            tgt = target.clamp(min=0)
            if not bool(keep.gather(1, tgt)[moving].all()):
                raise ValueError("a merge target must be a kept token")
            dst = torch.where(moving, slot.gather(1, tgt), dst)
    slot_src = torch.zeros(b, n_out, dtype=torch.long, device=keep.device)
    if n_out:
        pos = torch.arange(n, device=keep.device).expand(b, n)
        idx = torch.where(keep, slot, torch.full_like(slot, n_out))  # dump non-kept into an overflow column
        buf = torch.zeros(b, n_out + 1, dtype=torch.long, device=keep.device)
        buf.scatter_(1, idx, pos)
        slot_src = buf[:, :n_out]
    return Assignment(dst=dst, slot_src=slot_src, counts=counts, n_out=n_out, merges=merges)


def select(keep_idx: torch.Tensor, n: int) -> torch.Tensor:
    """Keep mask (B, n) from sorted or unsorted index lists (B, k)."""
    mask = torch.zeros(keep_idx.shape[0], n, dtype=torch.bool, device=keep_idx.device)
    return mask.scatter_(1, keep_idx, True)


def merge(x: torch.Tensor, size: torch.Tensor, a: Assignment) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply an assignment: returns (x_out (B, n_out, D), size_out (B, n_out)).

    Slots holding one token are copied exactly; merged slots are the size-weighted mean (accumulated in float32).
    Padded slots (beyond a sample's count) are zero with size 0.
    """
    b, _, d = x.shape
    gathered = x.gather(1, a.slot_src.unsqueeze(-1).expand(b, a.n_out, d))
    acc_t = torch.promote_types(x.dtype, torch.float32)  # half inputs accumulate in float32
    w = torch.where(a.dst >= 0, size, torch.zeros_like(size)).to(acc_t)
    idx = a.dst.clamp(min=0)
    size_out = torch.zeros(b, a.n_out, dtype=acc_t, device=x.device).scatter_add_(1, idx, w)
    if a.merges:
        acc = torch.zeros(b, a.n_out, d, dtype=acc_t, device=x.device)
        acc.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, d), x.to(acc_t) * w.unsqueeze(-1))
        mean = (acc / size_out.clamp_min(1e-12).unsqueeze(-1)).to(x.dtype)
        own = size.gather(1, a.slot_src).to(acc_t)
        merged = (size_out != own).unsqueeze(-1)
        gathered = torch.where(merged, mean, gathered)
    pad = torch.arange(a.n_out, device=x.device).unsqueeze(0) >= a.counts.unsqueeze(1)
    if bool(pad.any()):
        gathered = gathered.masked_fill(pad.unsqueeze(-1), 0)
        size_out = size_out.masked_fill(pad, 0)
    return gathered, size_out.to(size.dtype)


def compose_source(source: torch.Tensor, a: Assignment) -> torch.Tensor:
    """Update the original-token -> current-slot map after applying ``a``."""
    moved = a.dst.gather(1, source.clamp(min=0))
    return torch.where(source >= 0, moved, source)


def unmerge(x: torch.Tensor, source: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Scatter current tokens back to every original token: (B, N, D) -> (B, N0, D); dropped tokens get ``fill``."""
    b, _, d = x.shape
    out = x.gather(1, source.clamp(min=0).unsqueeze(-1).expand(b, source.shape[1], d))
    dropped = (source < 0).unsqueeze(-1)
    if bool(dropped.any()):
        out = out.masked_fill(dropped, fill)
    return out
