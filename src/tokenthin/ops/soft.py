"""Soft (many-to-many) merges: each merged token is a weighted mean of several tokens, each token is rebuilt as a
weighted mean of several merged tokens. An :class:`~tokenthin.ops.assign.Assignment` cannot say this (every token
goes to one slot), so it has its own small op here.

A :class:`SoftPlan` works on tiles: the N tokens of a sample are laid out as T tiles of ``n`` positions
(``tok_idx`` (T, n): the token at each tile position, -1 for padding), each tile has up to ``m`` merged tokens
(``slot`` (T, m): the index of each in the merged sequence of ``k`` tokens, -1 where the tile has fewer). Per
sample and tile:

* ``merge_w`` (B, T, m, n): merged token j = sum_i merge_w[j, i] x_i (rows sum to 1; zero at padding);
* ``unmerge_w`` (B, T, n, m): token i = sum_j unmerge_w[i, j] y_j (rows sum to 1; zero at padding).

One tile of all N tokens (T = 1) is a dense plan. Both ops are batched matrix products (no sort, no scatter), in at
least float32, and give (B, k, D) / (B, N, D) back in the input's dtype. Every sample has the same ``k``: the slots
are fixed by the tiles' geometry, not by content.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SoftPlan:
    tok_idx: torch.Tensor  # (T, n) long: token index at each tile position, -1 padding
    slot: torch.Tensor  # (T, m) long: merged-sequence index of each tile destination, -1 none
    merge_w: torch.Tensor  # (B, T, m, n) float
    unmerge_w: torch.Tensor  # (B, T, n, m) float
    n_tokens: int  # N
    k: int  # merged tokens per sample
    dst: torch.Tensor | None = None  # (B, k) long: the token each merged token is built around, where there is one

    def __post_init__(self) -> None:
        self._valid_slot = (self.slot >= 0).reshape(-1)  # flat (T*m) positions holding a merged token
        self._valid_tok = (self.tok_idx >= 0).reshape(-1)  # flat (T*n) positions holding a token


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def tiles_of(x: torch.Tensor, tok_idx: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, T, n, D) with zeros at padding."""
    b, _, d = x.shape
    t, n = tok_idx.shape
    out = x[:, tok_idx.clamp(min=0).reshape(-1)].view(b, t, n, d)
    return out.masked_fill((tok_idx < 0).view(1, t, n, 1), 0)


def merge(x: torch.Tensor, plan: SoftPlan) -> torch.Tensor:
    """(B, N, D) tokens -> (B, k, D) merged tokens."""
    b, _, d = x.shape
    acc = _acc(x)
    y = plan.merge_w.to(acc) @ tiles_of(x, plan.tok_idx).to(acc)  # (B, T, m, D)
    y = y.reshape(b, -1, d)[:, plan._valid_slot]  # (B, k, D) in flat tile order
    out = torch.empty_like(y)
    out[:, plan.slot.reshape(-1)[plan._valid_slot]] = y
    return out.to(x.dtype)


def unmerge(y: torch.Tensor, plan: SoftPlan) -> torch.Tensor:
    """(B, k, D) merged tokens -> (B, N, D): every token rebuilt from its tile's merged tokens."""
    b, _, d = y.shape
    t, m = plan.slot.shape
    acc = _acc(y)
    flat = torch.zeros(b, t * m, d, dtype=acc, device=y.device)
    flat[:, plan._valid_slot] = y.to(acc)[:, plan.slot.reshape(-1)[plan._valid_slot]]
    xt = plan.unmerge_w.to(acc) @ flat.view(b, t, m, d)  # (B, T, n, D)
    xt = xt.reshape(b, -1, d)[:, plan._valid_tok]  # valid positions in flat tile order
    out = torch.empty_like(xt)
    out[:, plan.tok_idx.reshape(-1)[plan._valid_tok]] = xt
    return out.to(y.dtype)


def dense(plan: SoftPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan as dense matrices: merge (B, k, N) and unmerge (B, N, k) (for tests and inspection)."""
    b = plan.merge_w.shape[0]
    t, n = plan.tok_idx.shape
    m = plan.slot.shape[1]
    rows = plan.slot.view(t, m, 1).expand(t, m, n)
    cols = plan.tok_idx.view(t, 1, n).expand(t, m, n)
    ok = (rows >= 0) & (cols >= 0)
    r, c = rows[ok], cols[ok]
    mw = torch.zeros(b, plan.k, plan.n_tokens, dtype=plan.merge_w.dtype, device=plan.merge_w.device)
    uw = torch.zeros(b, plan.n_tokens, plan.k, dtype=plan.merge_w.dtype, device=plan.merge_w.device)
    mw[:, r, c] = plan.merge_w[:, ok]
    uw[:, c, r] = plan.unmerge_w.transpose(-1, -2)[:, ok]
    return mw, uw
