"""Planning a batch whose samples keep different counts: one method call per group of equal counts."""

from __future__ import annotations

import torch

from ..methods.base import Method, OrderedPlan, ReduceInput
from ..ops import ordered
from .state import _Sub, _trimmed


def plan_grouped(
    method: Method, inp: ReduceInput, keep_n: torch.Tensor, trim: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The method's plan; where samples keep different counts (the caller's padding, a dynamic method before)
    and the method needs one count per batch, it plans each group of equal counts apart. ``trim``: nothing was
    reduced yet and the caller padded; each group is then planned on its real tokens alone (:func:`_trimmed`),
    so grid and sequence methods see what the sample run alone, unpadded, shows them."""
    uniform = bool((keep_n == keep_n[0]).all() and (inp.counts == inp.counts[0]).all())
    if method.dynamic or (uniform and not trim):
        return method.reduce(inp, keep_n)
    b, n = inp.valid.shape
    keep = torch.zeros(b, n, dtype=torch.bool, device=inp.x.device)
    target: torch.Tensor | None = None
    order: torch.Tensor | None = None  # an OrderedPlan's order, assembled over the groups
    groups = torch.stack([keep_n, inp.counts], 1).unique(dim=0)
    for g in groups:
        idx = ((keep_n == g[0]) & (inp.counts == g[1])).nonzero().squeeze(1)
        sub = ReduceInput(
            x=inp.x[idx],
            size=inp.size[idx],
            valid=inp.valid[idx],
            num_protected=inp.num_protected,
            layer=inp.layer,
            num_layers=inp.num_layers,
            grid=inp.grid,
            pristine=inp.pristine,
            signals=_Sub(inp.signals, rows=idx),
            calibrating=inp.calibrating,
            layout=inp.layout,
            order=None if inp.order is None else inp.order[idx],
        )
        trimmed = _trimmed(sub) if trim else None
        got = method.reduce(sub if trimmed is None else trimmed, keep_n[idx])
        k, t = got
        o = ordered.parts(got)[0]
        if o is not None:
            order = torch.zeros(b, n, dtype=torch.float64, device=inp.x.device) if order is None else order
            order[idx, : o.shape[1]] = o.to(torch.float64)
        if k.shape[1] < n:  # planned on the real tokens: the padding is neither kept nor merged
            k = torch.cat([k, k.new_zeros(k.shape[0], n - k.shape[1])], 1)
            t = None if t is None else torch.cat([t, t.new_full((t.shape[0], n - t.shape[1]), -1)], 1)
        keep[idx] = k
        if t is not None:
            if target is None:
                target = torch.full((b, n), -1, dtype=torch.long, device=inp.x.device)
            target[idx] = t
    return (keep, target) if order is None else OrderedPlan(keep, target, order)
