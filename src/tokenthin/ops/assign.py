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

CHECKS = True  # validate plans (cheap; the benchmarks leave it on; skipped inside torch.compile)


def check(ok: torch.Tensor, msg: str) -> None:
    """Raise ``ValueError(msg)`` unless ``ok`` (a bool tensor) is all True, without waiting for the device: on CUDA
    the check is queued (``torch._assert_async``); inside a ``torch.compile`` trace it is skipped (a data-dependent
    branch would break the graph; the plans it checks are built by the same code that eager mode validates)."""
    if not CHECKS or torch.compiler.is_compiling():
        return
    if ok.device.type == "cuda":
        torch._assert_async(ok.all(), msg)
    elif not bool(ok.all()):
        raise ValueError(msg)


@dataclass
class Assignment:
    """Where every current token goes: ``dst`` (B, N) slot index or -1; ``n_out`` slots (padded)."""

    dst: torch.Tensor
    slot_src: torch.Tensor  # (B, n_out): index of the kept token that represents each slot (0 for padding)
    counts: torch.Tensor  # (B,): slots used per sample
    n_out: int
    merges: bool  # whether any token may be merged into another (False: a pure selection)
    moving: torch.Tensor | None = None  # (B, N) the tokens merged into another one (when ``merges``)
    uniform: bool = True  # every sample keeps n_out slots (no padding)
    max_moving: int | None = None  # an upper bound on the moving tokens of a sample (None: count them)


def _compact(mask: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the True entries of each row of ``mask`` (B, N), in order, padded to ``width`` columns:
    (index (B, width), present (B, width)). Linear time (a cumulative sum and one scatter), static shapes."""
    b, n = mask.shape
    pos = mask.long().cumsum(1) - 1
    col = torch.where(mask, pos, torch.full_like(pos, width)).clamp(max=width)  # overflow column for the rest
    buf = torch.zeros(b, width + 1, dtype=torch.long, device=mask.device)
    buf.scatter_(1, col, torch.arange(n, device=mask.device).expand(b, n))
    present = torch.arange(width, device=mask.device).unsqueeze(0) < mask.sum(1, keepdim=True)
    return buf[:, :width], present


def build(keep: torch.Tensor, target: torch.Tensor | None = None, n_out: int | None = None) -> Assignment:
    """Build the slot map from a keep mask and merge targets (see module docstring).

    ``n_out``: the slots every sample keeps, when the caller knows it from the shapes (the fixed-count case); the
    plan is then built with static shapes only (no count read back from the data: what ``torch.compile`` traces)
    and, where checks are on, verified to keep that many tokens in every sample."""
    if keep.dtype != torch.bool or keep.dim() != 2:
        raise ValueError("keep must be a (B, N) bool tensor")
    b, n = keep.shape
    counts = keep.sum(1)
    static = n_out is not None
    if n_out is not None:
        uniform = True
        msg = f"internal: a fixed-count plan keeps {n_out} tokens per sample, but the method's plan keeps another count"
        check(counts == n_out, msg + " (its Method.output_count() disagrees with its reduce())")
    else:
        lo_hi = torch.aminmax(counts) if b > 0 else None
        n_out = int(lo_hi.max) if lo_hi is not None else 0
        uniform = lo_hi is None or int(lo_hi.min) == n_out
    slot = keep.long().cumsum(1) - 1  # slot index of kept tokens
    dst = slot.masked_fill(~keep, -1)
    merges, moving, max_moving = False, None, None
    if target is not None:
        moving = (~keep) & (target >= 0)
        if static or bool(moving.any()):  # fixed count: assume merges (an empty merge changes nothing)
            merges = True
            tgt = target.clamp(min=0)
            check(keep.gather(1, tgt) | ~moving, "a merge target must be a kept token")
            dst = torch.where(moving, slot.gather(1, tgt), dst)
            max_moving = n - n_out if static else None
        else:
            moving = None
    slot_src = torch.zeros(b, n_out, dtype=torch.long, device=keep.device)
    if n_out:
        idx = torch.where(keep, slot, torch.full_like(slot, n_out))  # dump non-kept into an overflow column
        buf = torch.zeros(b, n_out + 1, dtype=torch.long, device=keep.device)
        buf.scatter_(1, idx, torch.arange(n, device=keep.device).expand(b, n))
        slot_src = buf[:, :n_out]
    return Assignment(
        dst=dst,
        slot_src=slot_src,
        counts=counts,
        n_out=n_out,
        merges=merges,
        moving=moving,
        uniform=uniform,
        max_moving=max_moving,
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
    accumulated in at least float32, and only the rows of moving tokens and their slots are computed. Padded slots
    (beyond a sample's count) are zero with size 0. Shapes depend on the data only where the plan's
    ``max_moving`` is unknown (then the moving tokens are counted).
    """
    b, _, d = x.shape
    out = rows(x, a.slot_src)
    own = size.gather(1, a.slot_src)
    size_out = own
    if a.merges:
        assert a.moving is not None
        acc_t = torch.promote_types(x.dtype, torch.float32)  # half inputs accumulate in float32
        m = a.max_moving if a.max_moving is not None else int(a.moving.sum(1).max())
        src, present = _compact(a.moving, m)  # (B, m) the moving tokens of each sample, padded
        slot = a.dst.gather(1, src).clamp(min=0)  # their slots (padding entries: slot 0, weight 0)
        w = size.gather(1, src).to(acc_t) * present  # (B, m)
        flat = (slot + torch.arange(b, device=x.device).unsqueeze(1) * a.n_out).reshape(-1)
        own_flat = own.reshape(-1).to(acc_t)
        total = own_flat.index_add(0, flat, w.reshape(-1))  # (B * n_out,) summed size of every slot
        acc = torch.zeros(b * a.n_out, d, dtype=acc_t, device=x.device)
        acc.index_add_(0, flat, (rows(x, src).to(acc_t) * w.unsqueeze(-1)).reshape(-1, d))
        out_flat = out.view(b * a.n_out, d)
        base = out_flat.index_select(0, flat).to(acc_t)  # the receiving slots' own rows (once per moving token)
        new = (base * own_flat[flat].unsqueeze(-1) + acc.index_select(0, flat)) / total[flat].unsqueeze(-1)
        received = (total[flat] > own_flat[flat]).unsqueeze(-1)  # padding entries leave their slot's row alone
        out_flat.index_copy_(0, flat, torch.where(received, new.to(x.dtype), base.to(x.dtype)))
        size_out = total.view(b, a.n_out).to(size.dtype)
    if not a.uniform:
        valid = slot_valid(a)
        assert valid is not None
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
    return out.masked_fill((source < 0).unsqueeze(-1), fill)  # unconditional: no read-back of the data
