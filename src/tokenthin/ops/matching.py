"""Bipartite soft matching (ToMe, arXiv 2210.09461), batched, with protected and padded tokens.

Tokens are split into a source set A and a destination set B. Every A token finds its most similar B token
(cosine similarity of a metric, e.g. the keys averaged over heads); the ``r`` A tokens with the strongest edges
are merged into their B match. The result is returned as an assignment (keep mask + merge targets, see
:mod:`tokenthin.ops.assign`), so merging, size tracking and unmerging are shared with every other reduction.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .assign import rows
from .similarity import normalize


def alternate_split(n: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's split: even positions form A, odd positions form B. Returns index vectors (na,), (nb,)."""
    idx = torch.arange(n, device=device)
    return idx[0::2], idx[1::2]


def similarities(
    metric: torch.Tensor, a_idx: torch.Tensor | slice, b_idx: torch.Tensor | slice, b_ok: torch.Tensor
) -> torch.Tensor:
    """(B, na, nb) cosine similarity of every A token to every B token; B tokens that may not take part get -inf."""
    m = normalize(metric)
    if isinstance(a_idx, slice) and isinstance(b_idx, slice):  # ToMe's split: strided views, no copies
        scores = m[:, a_idx] @ m[:, b_idx].transpose(-1, -2)
    else:
        bi = torch.arange(m.shape[0], device=m.device).unsqueeze(1)
        scores = m[bi, a_idx] @ m[bi, b_idx].transpose(-1, -2)
    if torch.compiler.is_compiling() or not bool(b_ok.all()):  # no data-dependent branch inside a trace
        scores = scores.masked_fill(~b_ok.unsqueeze(1), -torch.inf)
    return scores


def edge_scores(
    metric: torch.Tensor,
    a_idx: torch.Tensor | slice,
    b_idx: torch.Tensor | slice,
    a_ok: torch.Tensor,
    b_ok: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best B match of every A token.

    metric (B, N, C); a_idx (B, na) / b_idx (B, nb) token indices; a_ok / b_ok (B, na) / (B, nb) which of them may
    take part (protected and padded tokens may not). Returns (best similarity (B, na), index into b_idx (B, na));
    A tokens that may not merge get -inf.
    """
    best, best_j = similarities(metric, a_idx, b_idx, b_ok).max(dim=-1)
    return best.masked_fill(~a_ok, -torch.inf), best_j


def match(
    metric: torch.Tensor,
    r: int | torch.Tensor,
    candidates: torch.Tensor,
    a_idx: torch.Tensor | None = None,
    b_idx: torch.Tensor | None = None,
    threshold: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the ``r`` strongest A->B edges per sample; returns (keep (B, N), target (B, N)).

    ``candidates`` (B, N): tokens that may be merged or receive merges (False: protected or padding; such
    tokens are kept untouched unless padding, which stays invalid downstream). ``r`` is an int or a (B,) tensor.
    With ``threshold`` only edges whose similarity exceeds it are merged (at most ``r``), so samples merge
    different counts (DyMU). ``a_idx``/``b_idx`` default to ToMe's alternating split.
    """
    bsz, n, _ = metric.shape
    dev = metric.device
    split = a_idx is None or b_idx is None  # ToMe's alternate split: A = 2i, B = 2j + 1
    if split:
        a_ok, b_ok = candidates[:, 0::2], candidates[:, 1::2]
        sa: torch.Tensor | slice = slice(0, None, 2)
        sb: torch.Tensor | slice = slice(1, None, 2)
    else:
        assert a_idx is not None and b_idx is not None
        a_ok, b_ok = candidates.gather(1, a_idx), candidates.gather(1, b_idx)
        sa, sb = a_idx, b_idx
    scores = similarities(metric, sa, sb, b_ok)
    keep = torch.ones(bsz, n, dtype=torch.bool, device=dev)
    target = torch.full((bsz, n), -1, dtype=torch.long, device=dev)
    if isinstance(r, int) and threshold is None:
        # one r for the batch: the r strongest edges (top-k of each A token's best similarity; ties: lowest index,
        # as a stable sort), and the best B match looked up for those r A tokens only (an argmax over every row
        # costs more than the rest of the matching on CPU): their rows copied whole, then ``max``, whose index is
        # the first maximum as ``argmax``'s is (and twice as fast on CPU)
        best = scores.amax(dim=-1).masked_fill(~a_ok, -torch.inf)
        top = best.topk(min(r, best.shape[1]), dim=-1, sorted=False).indices  # (B, r)
        ok = torch.isfinite(best.gather(1, top))
        j = rows(scores, top).max(dim=-1).indices  # (B, r) into B
        if split:
            src, dst = top * 2, j * 2 + 1
        else:
            assert a_idx is not None and b_idx is not None
            src, dst = a_idx.gather(1, top), b_idx.gather(1, j)
        keep.scatter_(1, src, ~ok)
        target.scatter_(1, src, torch.where(ok, dst, -1))
        return keep, target
    if split:
        a1, b1 = alternate_split(n, dev)
        a_idx, b_idx = a1.expand(bsz, -1), b1.expand(bsz, -1)
    assert a_idx is not None and b_idx is not None
    best, best_j = scores.max(dim=-1)
    best = best.masked_fill(~a_ok, -torch.inf)
    if isinstance(r, int):
        chosen = torch.zeros_like(best, dtype=torch.bool)
        if r > 0:
            chosen.scatter_(1, best.topk(min(r, best.shape[1]), dim=-1, sorted=False).indices, True)
        chosen &= torch.isfinite(best)
    else:
        order = best.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=dev).expand(bsz, -1))
        chosen = (rank < torch.as_tensor(r, device=dev).reshape(-1, 1)) & torch.isfinite(best)
    if threshold is not None:
        thr = torch.as_tensor(threshold, device=dev, dtype=best.dtype).reshape(-1, 1)
        chosen = chosen & (best > thr)
    keep.scatter_(1, a_idx, ~chosen)
    dst_tok = b_idx.gather(1, best_j)
    target.scatter_(1, a_idx, torch.where(chosen, dst_tok, torch.full_like(dst_tok, -1)))
    return keep, target


def merge_in_rounds(
    valid: torch.Tensor,
    candidates: torch.Tensor,
    r: torch.Tensor | int,
    one_round: Callable[[torch.Tensor, torch.Tensor | int, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
    count: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``r`` (B,) tokens per sample with a matching that merges at most half of its candidates per round.

    ``one_round(cur, step, alive)`` merges ``step`` (B,) of the candidates ``cur`` (B, N) (``alive``: every token
    not merged yet) and returns (keep, target) on the original token indices. The rounds are composed into one
    plan: each merged token's target is its final surviving representative.

    ``count``: the fixed-count case, every sample has ``count`` candidates and merges the int ``r``; each round
    then merges ``min(r, count // 2)`` (a matching merges exactly that many when every candidate has a finite
    similarity), planned in Python ints with no read-back of the data.
    """
    b, n = candidates.shape
    owner = torch.arange(n, device=candidates.device).expand(b, n).clone()  # token -> its representative
    alive = valid.clone()

    def apply(cur: torch.Tensor, keep_s: torch.Tensor, target_s: torch.Tensor | None) -> None:
        nonlocal owner, alive
        assert target_s is not None
        gone = cur & ~keep_s
        owner = torch.where(gone.gather(1, owner), target_s.gather(1, owner), owner)
        alive = alive & ~gone

    if count is not None:
        assert isinstance(r, int)
        left, c = r, count
        while left > 0 and c // 2 > 0:
            step = min(left, c // 2)
            cur = candidates & alive
            apply(cur, *one_round(cur, step, alive))
            left, c = left - step, c - step
    else:
        assert isinstance(r, torch.Tensor)
        r = r.clone()
        while int(r.max()) > 0:
            cur = candidates & alive
            step = torch.minimum(r, cur.sum(1) // 2)
            if int(step.max()) == 0:
                break
            apply(cur, *one_round(cur, step, alive))
            r = r - step
    return alive, torch.where(alive | ~valid, torch.full_like(owner, -1), owner)
