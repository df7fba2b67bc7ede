"""Budgets over groups of tokens (views, crops, frames): ranks inside each group and integer apportionment."""

from __future__ import annotations

import torch

__all__ = ["apportion", "rank_in_groups"]


def rank_in_groups(score: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(B, N) rank of every token inside its group (0 = highest score; ties to the lower index)."""
    b, n = score.shape
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort(group.gather(1, order), dim=1, stable=True).indices)
    g_sorted = group.gather(1, order)
    sizes = torch.zeros(b, num_groups, dtype=torch.long, device=score.device)
    sizes.scatter_add_(1, group, torch.ones_like(group))
    start = (sizes.cumsum(1) - sizes).gather(1, g_sorted)
    pos = torch.arange(n, device=score.device).expand(b, n)
    return torch.empty_like(order).scatter_(1, order, pos - start)


def apportion(weight: torch.Tensor, cap: torch.Tensor, k: int) -> torch.Tensor:
    """(B, P) integer budgets summing to ``k``: proportional to ``weight`` (>= 0), at most ``cap`` each.

    Partitions whose share reaches their capacity are filled and the remaining budget is shared among the others
    (repeated until no share overflows; where the others' weights are all zero, by their sizes); the shares are then
    floored and the leftover tokens go, one each, to the partitions with the largest fractional parts (ties to the
    lower partition index). ``sum(cap) >= k`` per sample.
    """
    weight = weight.double()
    cap_f = cap.double()
    share = torch.zeros_like(weight)
    active = torch.ones_like(weight, dtype=torch.bool)
    left = torch.full_like(weight[:, 0], float(k))
    # every round fills at least one partition or changes nothing, so weight.shape[1] rounds suffice; eager mode
    # stops at the first round that fills none, a torch.compile trace runs them all (the same result)
    for _ in range(weight.shape[1]):
        w = weight * active
        w = torch.where(w.sum(1, keepdim=True) > 0, w, cap_f * active)  # no signal left: share by size
        q = left.unsqueeze(1) * w / w.sum(1, keepdim=True).clamp_min(1e-300)
        over = active & (q >= cap_f)
        if not torch.compiler.is_compiling() and not bool(over.any()):
            break
        share = torch.where(over, cap_f, share)
        left = left - (cap_f * over).sum(1)
        active = active & ~over
    else:  # no early stop: the shares of the partitions still active
        w = weight * active
        w = torch.where(w.sum(1, keepdim=True) > 0, w, cap_f * active)
        q = left.unsqueeze(1) * w / w.sum(1, keepdim=True).clamp_min(1e-300)
    share = torch.where(active, q, share)
    base = share.floor().long().minimum(cap)
    rest = k - base.sum(1, keepdim=True)  # (B, 1)
    frac = (share - base).masked_fill(base >= cap, -1.0)
    order = torch.sort(frac, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    return base + (rank < rest).long()
