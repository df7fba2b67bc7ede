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
