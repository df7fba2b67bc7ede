"""The additions of an official code's parity mode (:class:`tokenthin.methods.base.OrderedPlan`): slot values that
are not a size-weighted mean, and the order in which the language model reads the slots. Pure tensor code on an
:class:`~tokenthin.ops.assign.Assignment` (slots in positional order)."""

from __future__ import annotations

from typing import Any

import torch

from . import assign


def slot_values(x_out: torch.Tensor, a: assign.Assignment, values: torch.Tensor | None) -> torch.Tensor:
    """``x_out`` (B, n_out, D) with each used slot replaced by ``values`` (B, N, D) at its representative."""
    if values is None:
        return x_out
    new = assign.rows(values.to(x_out.dtype), a.slot_src)
    used = assign.slot_valid(a)
    return new if used is None else torch.where(used.unsqueeze(-1), new, x_out)


def slot_order(a: assign.Assignment, order: torch.Tensor | None) -> torch.Tensor | None:
    """(B, n_out) long: the slot read at each output place, slots sorted by ascending ``order`` (B, N) of their
    representative (ties and padding slots: positional, padding last); None for positional order."""
    if order is None or a.n_out == 0:
        return None
    key = order.to(torch.float64).gather(1, a.slot_src)
    used = assign.slot_valid(a)
    if used is not None:
        key = key.masked_fill(~used, float("inf"))
    return torch.sort(key, dim=1, stable=True).indices


def parts(plan: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(order, values) of a plan; (None, None) for a plain ``(keep, target)`` tuple."""
    return getattr(plan, "order", None), getattr(plan, "values", None)


def apply(x: torch.Tensor, size: torch.Tensor, plan: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A plan applied to ``x`` (B, N, D) as a language model would read it: (x_out (B, n_out, D), size_out),
    with an :class:`~tokenthin.methods.base.OrderedPlan`'s values and order honoured."""
    keep, target = plan
    a = assign.build(keep, target)
    order, values = parts(plan)
    out, size_out = assign.merge(x, size, a)
    out = slot_values(out, a, values)
    perm = slot_order(a, order)
    if perm is not None:
        out = assign.rows(out, perm)
        size_out = size_out.gather(1, perm)
    return out, size_out


def ranks(a: assign.Assignment, order: torch.Tensor | None) -> torch.Tensor | None:
    """(B, n_out) long: each slot's place when the slots are read by ascending ``order`` (B, N) of their
    representative (the inverse of :func:`slot_order`); None for positional order. An encoder runtime carries it
    from one reduction to the next as :attr:`~tokenthin.methods.base.ReduceInput.order`."""
    perm = slot_order(a, order)
    if perm is None:
        return None
    place = torch.arange(perm.shape[1], device=perm.device).expand_as(perm)
    return torch.empty_like(perm).scatter_(1, perm, place)


def places(order: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor:
    """(B, N) long: the place of every token in the order ``order`` (B, N) describes (ascending; None: positional),
    valid tokens first, padding after them (ties: positional)."""
    n = valid.shape[1]
    key = torch.arange(n, device=valid.device, dtype=torch.float64).expand(valid.shape)
    if order is not None:
        key = order.to(torch.float64)
    key = key.masked_fill(~valid, float("inf"))
    seq = torch.sort(key, dim=1, stable=True).indices  # place -> token
    place = torch.arange(n, device=valid.device).expand_as(seq)
    return torch.empty_like(seq).scatter_(1, seq, place)
