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
    drop = ~keep
    dst = slot.masked_fill(drop, -1)
    merges, moving, max_moving = False, None, None
    if target is not None:
        moving = drop & (target >= 0)
        if static or bool(moving.any()):  # fixed count: assume merges (an empty merge changes nothing)
            merges = True
            tgt = target.clamp(min=0)
            check(keep.gather(1, tgt) | ~moving, "a merge target must be a kept token")
            dst = torch.where(moving, slot.gather(1, tgt), dst)
            max_moving = n - n_out if static else None
        else:
            moving = None
    if n_out:
        idx = slot.masked_fill(drop, n_out)  # dump non-kept into an overflow column
        buf = torch.zeros(b, n_out + 1, dtype=torch.long, device=keep.device)
        buf.scatter_(1, idx, torch.arange(n, device=keep.device).expand(b, n))
        slot_src = buf[:, :n_out]
    else:
        slot_src = torch.zeros(b, 0, dtype=torch.long, device=keep.device)
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


def _moving(a: Assignment, size: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The moving tokens as flat row indices: (into the current tokens (M,), into the slots (M,), their sizes (M,)).
    Eager mode lists exactly the moving tokens (``nonzero``); inside a ``torch.compile`` trace, where shapes may not
    depend on the data, every sample lists ``max_moving`` entries (moving tokens first, in token order, by a stable
    sort), and the rest point at the spare slot row ``B * n_out`` with size 0. Both keep the order (sample, token),
    so every slot sums its tokens in the same order and eager and compiled results agree."""
    assert a.moving is not None
    b, k = a.dst.shape[0], a.n_out
    if torch.compiler.is_compiling() and a.max_moving is not None:
        idx = torch.argsort((~a.moving).to(torch.int8), dim=1, stable=True)[:, : a.max_moving]  # (B, m)
        present = a.moving.gather(1, idx)
        off = torch.arange(b, device=idx.device).unsqueeze(1)
        src = (idx + off * n).reshape(-1)
        dst = torch.where(present, a.dst.gather(1, idx) + off * k, b * k).reshape(-1)
        return src, dst, (size.gather(1, idx) * present).reshape(-1)
    src = a.moving.reshape(-1).nonzero().squeeze(1)  # flat (sample, token) index of every moving token
    dst = torch.div(src, n, rounding_mode="floor") * k + a.dst.reshape(-1).index_select(0, src)
    return src, dst, size.reshape(-1).index_select(0, src)


def merge(x: torch.Tensor, size: torch.Tensor, a: Assignment) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply an assignment: returns (x_out (B, n_out, D), size_out (B, n_out)).

    Kept rows are copied exactly; a slot that receives merged tokens becomes the size-weighted mean of its tokens,
    ``x_s * own_s / total + sum_j x_j * w_j / total``, accumulated in at least float32, on the receiving rows of the
    copy only (half inputs: in a float32 buffer). Padded slots (beyond a sample's count) are zero with size 0.
    Nothing is read back from the data inside a ``torch.compile`` trace.
    """
    b, n, d = x.shape
    k = a.n_out
    x_flat = x.reshape(b * n, d)
    pick = (a.slot_src + torch.arange(b, device=x.device).unsqueeze(1) * n).reshape(-1)
    if not a.merges:
        out, size_out = x_flat.index_select(0, pick).view(b, k, d), size.gather(1, a.slot_src)
    else:
        pick = torch.cat([pick, pick[:1]])  # a spare row after the slots: where a compiled plan's padding goes
        out_flat = x_flat.index_select(0, pick)
        acc_t = torch.promote_types(x.dtype, torch.float32)
        own = size.reshape(-1).index_select(0, pick).to(acc_t)
        src, dst, w = _moving(a, size, n)
        w = w.to(acc_t)
        total = own.index_add(0, dst, w)  # (B * n_out + 1,) summed size of every slot
        inv = 1.0 / total.index_select(0, dst).unsqueeze(-1)
        moved = x_flat.index_select(0, src).to(acc_t) * (w.unsqueeze(-1) * inv)
        base = out_flat.index_select(0, dst).to(acc_t) * (own.index_select(0, dst).unsqueeze(-1) * inv)
        if x.dtype == acc_t:  # in place on the receiving rows: own share first, then every moving token's
            out_flat.index_copy_(0, dst, base).index_add_(0, dst, moved)
        else:  # half: the sums in float32
            acc = torch.zeros(b * k + 1, d, dtype=acc_t, device=x.device).index_copy_(0, dst, base)
            out_flat.index_copy_(0, dst, acc.index_add_(0, dst, moved).index_select(0, dst).to(x.dtype))
        out, size_out = out_flat[: b * k].view(b, k, d), total[: b * k].view(b, k).to(size.dtype)
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
