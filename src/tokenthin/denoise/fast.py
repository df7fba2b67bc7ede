"""The denoiser runtime's merge and unmerge for block-local assignments, precomputed once per block call.

Inside a denoiser block every token stands for itself (size 1), every sample keeps the same number of slots and
no token is dropped (merging methods; tomesd always). Then :func:`tokenthin.ops.assign.merge` and
:func:`~tokenthin.ops.assign.unmerge` reduce to three row operations on the flattened (B * N, C) tokens, with
every index computed once per block from the assignment instead of once per part:

* merge: one ``index_select`` of each slot's representative row, one accumulation of the merged rows into
  their slot, one division by the slot's token count (1 for a slot that received nothing: exact);
* unmerge: one ``index_select`` of each token's slot row.

The sums run in the same order as :func:`~tokenthin.ops.assign.merge` (merged tokens in raster order per
sample on CUDA; CPU's sorted accumulation may add them in another order) and divide by the same counts, so fp32
results agree with it to rounding (tests hold them to 1e-6); half inputs accumulate in float32 as there.
Assignments with padding (samples keeping different counts) or dropped tokens (pruning methods) take the general
path in :mod:`tokenthin.ops.assign`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops import assign
from ..ops.assign import Assignment

ENABLED = True  # False: always the general path (tests compare the two)


@dataclass
class RowMerge:
    """Flat row indices of one block call's assignment (B samples, N tokens -> n_out slots each)."""

    b: int
    n: int
    n_out: int
    kept: torch.Tensor  # (B * n_out,) the row (into B * N) that represents each slot
    src: torch.Tensor | None  # (M,) rows merged into another one (None: a pure selection)
    dst: torch.Tensor | None  # (M,) their slot (into B * n_out)
    count: torch.Tensor | None  # (B * n_out, 1) float32 tokens per slot
    back: torch.Tensor  # (B * N,) each token's slot row (into B * n_out)


def plan(a: Assignment, source: torch.Tensor) -> RowMerge | None:
    """The row plan of ``a`` (``source``: (B, N) each token -> its slot), or None where the general path is
    needed (padding, or dropped tokens)."""
    b, n = a.dst.shape
    if not ENABLED or not a.uniform or bool((source < 0).any()):
        return None
    dev = a.dst.device
    base_in = torch.arange(b, device=dev).unsqueeze(1) * n
    base_out = torch.arange(b, device=dev).unsqueeze(1) * a.n_out
    kept = (a.slot_src + base_in).reshape(-1)
    back = (source + base_out).reshape(-1)
    src = dst = count = None
    if a.merges:
        assert a.moving is not None
        flat = a.moving.reshape(-1).nonzero().squeeze(1)  # merged tokens, raster order per sample
        src = flat
        dst = (a.dst + base_out).reshape(-1).index_select(0, flat)
        count = (torch.bincount(dst, minlength=b * a.n_out) + 1).to(torch.float32).unsqueeze(1)
    return RowMerge(b, n, a.n_out, kept, src, dst, count, back)


def merge(x: torch.Tensor, p: RowMerge) -> torch.Tensor:
    """(B, N, C) -> (B, n_out, C): each slot the mean of its tokens (unit sizes)."""
    c = x.shape[-1]
    flat = x.reshape(p.b * p.n, c)
    out = flat.index_select(0, p.kept)
    if p.src is not None:
        assert p.dst is not None and p.count is not None
        acc = torch.promote_types(x.dtype, torch.float32)
        moved = flat.index_select(0, p.src)
        if acc != x.dtype:
            out = _accumulate(out.to(acc), p.dst, moved.to(acc)).div_(p.count).to(x.dtype)
        else:
            _accumulate(out, p.dst, moved).div_(p.count)
    return out.view(p.b, p.n_out, c)


def _accumulate(out: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out[idx[j]] += rows[j]`` in place. CPU: ``index_put_(accumulate=True)``, one sort and one pass: its
    ``index_add_`` (a parallel scatter with several synchronisation rounds) took 200+ ms for 4096 rows of 320 on a
    loaded 2-core machine against 20 ms here (0.3 vs 1-10 ms on an idle core). CUDA: ``index_add_`` (atomics)."""
    if out.device.type == "cpu":
        return out.index_put_((idx,), rows, accumulate=True)
    return out.index_add_(0, idx, rows)


def unmerge(y: torch.Tensor, p: RowMerge) -> torch.Tensor:
    """(B, n_out, C) -> (B, N, C): every token gets its slot's row."""
    c = y.shape[-1]
    return y.reshape(p.b * p.n_out, c).index_select(0, p.back).view(p.b, p.n, c)


def general_merge(x: torch.Tensor, ones: torch.Tensor, a: Assignment) -> torch.Tensor:
    """The general path (padding, dropped tokens): :func:`tokenthin.ops.assign.merge` at unit sizes."""
    return assign.merge(x, ones, a)[0]
