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

CHECKS = True  # validate plans (cheap; the benchmarks leave it on)


@dataclass
class Assignment:
    """Where every current token goes: ``dst`` (B, N) slot index or -1; ``n_out`` slots (padded)."""

    dst: torch.Tensor
    slot_src: torch.Tensor  # (B, n_out): index of the kept token that represents each slot (0 for padding)
    counts: torch.Tensor  # (B,): slots used per sample
    n_out: int
    merges: bool  # whether any token is merged into another (False: a pure selection)
    moving: torch.Tensor | None = None  # (B, N) the tokens merged into another one (when ``merges``)
    uniform: bool = True  # every sample keeps n_out slots (no padding)


def build(keep: torch.Tensor, target: torch.Tensor | None = None) -> Assignment:
    """Build the slot map from a keep mask and merge targets (see module docstring)."""
    if keep.dtype != torch.bool or keep.dim() != 2:
        raise ValueError("keep must be a (B, N) bool tensor")
    b, n = keep.shape
    counts = keep.sum(1)
    lo_hi = torch.aminmax(counts) if b > 0 else None
    n_out = int(lo_hi.max) if lo_hi is not None else 0
    uniform = lo_hi is None or int(lo_hi.min) == n_out
    slot = keep.long().cumsum(1) - 1  # slot index of kept tokens
    dst = slot.masked_fill(~keep, -1)
    merges, moving = False, None
    if target is not None:
        moving = (~keep) & (target >= 0)
        if bool(moving.any()):
            merges = True
            tgt = target.clamp(min=0)
            if CHECKS and not bool((keep.gather(1, tgt) | ~moving).all()):
                raise ValueError("a merge target must be a kept token")
            dst = torch.where(moving, slot.gather(1, tgt), dst)
        else:
            moving = None
    slot_src = torch.zeros(b, n_out, dtype=torch.long, device=keep.device)
    if n_out:
        pos = torch.arange(n, device=keep.device).expand(b, n)
        idx = torch.where(keep, slot, torch.full_like(slot, n_out))  # dump non-kept into an overflow column
        buf = torch.zeros(b, n_out + 1, dtype=torch.long, device=keep.device)
        buf.scatter_(1, idx, pos)
        slot_src = buf[:, :n_out]
    return Assignment(
        dst=dst, slot_src=slot_src, counts=counts, n_out=n_out, merges=merges, moving=moving, uniform=uniform
    )


def select(keep_idx: torch.Tensor, n: int) -> torch.Tensor:
    """Keep mask (B, n) from sorted or unsorted index lists (B, k)."""
    mask = torch.zeros(keep_idx.shape[0], n, dtype=torch.bool, device=keep_idx.device)
    return mask.scatter_(1, keep_idx, True)


def rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, idx[b, j]]`` for (B, N, D) and (B, K) -> (B, K, D): whole-row copies (much faster than a
    ``gather`` with an index expanded over D)."""
    b, n, d = x.shape
    flat = (idx + torch.arange(b, device=x.device).unsqueeze(1) * n).reshape(-1)
    return x.reshape(b * n, d).index_select(0, flat).view(b, idx.shape[1], d)


def merge(x: torch.Tensor, size: torch.Tensor, a: Assignment) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply an assignment: returns (x_out (B, n_out, D), size_out (B, n_out)).

    Kept rows are copied exactly; a slot that receives merged tokens becomes the size-weighted mean of its tokens,
    accumulated in at least float32, and only those rows are computed. Padded slots (beyond a sample's count) are
    zero with size 0.
    """
    b, _, d = x.shape
    out = rows(x, a.slot_src)
    own = size.gather(1, a.slot_src)
    size_out = own.clone()
    if a.merges:
        # only the slots that receive merged tokens change: work on those rows alone
        acc_t = torch.promote_types(x.dtype, torch.float32)  # half inputs accumulate in float32
        assert a.moving is not None
        bi, ti = a.moving.nonzero(as_tuple=True)  # every merged token: (sample, token)
        flat_dst = bi * a.n_out + a.dst[bi, ti]
        hit, where = torch.unique(flat_dst, return_inverse=True)  # receiving slots, and each token's one
        out_flat, own_flat = out.view(b * a.n_out, d), own.reshape(-1)
        w = size[bi, ti].to(acc_t)
        w_hit = own_flat[hit].to(acc_t).index_add(0, where, w)
        num = (out_flat[hit].to(acc_t) * own_flat[hit].to(acc_t).unsqueeze(-1)).index_add_(
            0, where, x[bi, ti].to(acc_t) * w.unsqueeze(-1)
        )
        out_flat[hit] = (num / w_hit.unsqueeze(-1)).to(x.dtype)
        size_out.view(-1)[hit] = w_hit.to(size.dtype)
    valid = slot_valid(a)
    if valid is not None:
        out = out.masked_fill(~valid.unsqueeze(-1), 0)
        size_out = size_out.masked_fill(~valid, 0)
    return out, size_out


def slot_valid(a: Assignment) -> torch.Tensor | None:
    """(B, n_out) True for the slots a sample uses, False for its padding; None when every sample uses all."""
    if a.uniform:
        return None
    return torch.arange(a.n_out, device=a.counts.device).unsqueeze(0) < a.counts.unsqueeze(1)


def compose_source(source: torch.Tensor, a: Assignment) -> torch.Tensor:
    """Update the original-token -> current-slot map after applying ``a``."""
    moved = a.dst.gather(1, source.clamp(min=0))
    return torch.where(source >= 0, moved, source)


def unmerge(x: torch.Tensor, source: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Scatter current tokens back to every original token: (B, N, D) -> (B, N0, D); dropped tokens get ``fill``."""
    out = rows(x, source.clamp(min=0))
    dropped = (source < 0).unsqueeze(-1)
    if bool(dropped.any()):
        out = out.masked_fill(dropped, fill)
    return out
