"""Running a method on the current visual tokens of a sequence (before the language model or inside it) and
turning its plan into the sequence positions that stay. The method reads typed inputs
(:class:`~tokenthin.methods.base.ReduceInput`: the tokens, their views, rows and columns from the host's token
map, the prompt's text); samples whose counts or grids differ are planned one at a time (a selection takes one k).
"""

from __future__ import annotations

from typing import Any

import torch

from ..adapters.hf_vlm import VLMAdapter
from ..budget import keep_count
from ..errors import BudgetError
from ..methods.base import Method, ReduceInput
from ..ops import assign, ordered
from .sequence import pack
from .signals import VLMSignals
from .state import Call, Carry
from .tower import tower_groups


def keep_counts(per: torch.Tensor, spec: float | int, entered: torch.Tensor | None) -> torch.Tensor:
    """Visual tokens each sample keeps. Before the language model (``entered`` None) a fraction is of the sample's
    visual tokens; inside it, of those that entered it (and may round to 0)."""
    out = []
    for i, n in enumerate(per.tolist()):
        if entered is None:
            k = keep_count(spec, n)
        elif isinstance(spec, float):
            k = min(n, round(spec * int(entered[i])))
        else:
            k = int(spec)
        if k > n:
            raise BudgetError(
                f"keep={spec} asks for {k} visual tokens but a prompt holds only {n} here; use a smaller count "
                "or a fraction"
            )
        out.append(k)
    return torch.tensor(out, dtype=torch.long, device=per.device)


def plan(
    c: Call,
    adapter: VLMAdapter,
    method: Method,
    carry: Carry,
    x_seq: torch.Tensor,
    *,
    layer: int,
    num_layers: int,
    spec: float | int,
    stage: str,
    collapse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``method`` on the current visual tokens of ``x_seq`` (B, T, D) at ``stage`` ("output" or "llm");
    returns the new sequence (merged slots written at their representatives' places) and ``keep_seq`` (B, T), the
    positions that stay. ``collapse``: the method is :class:`~tokenthin.vlm.tower.CollapseSlots` after a reduction
    inside the vision tower (every token is a candidate; the budget was the tower's). Updates ``c.src``,
    ``c.size`` and ``c.vis_pos``."""
    assert c.vis is not None and c.valid is not None and c.src is not None and c.size is not None
    vis = c.vis & c.valid
    vpos, vvalid = pack(vis, left=False)  # (B, N) sequence position of each visual token
    c.vis_pos = vpos
    x = assign.rows(x_seq, vpos)
    b = vvalid.shape[0]
    per = vvalid.sum(1)
    out_stage = stage == "output"
    rows = cols = None
    if out_stage:
        assert c.flat is not None and c.view is not None and c.tm is not None
        flat = c.flat.gather(1, vpos).masked_fill(~vvalid, 0)
        view = c.view.gather(1, vpos).masked_fill(~vvalid, -1)
        if c.rows is not None and c.cols is not None:
            rows = c.rows.gather(1, vpos).masked_fill(~vvalid, -1)
            cols = c.cols.gather(1, vpos).masked_fill(~vvalid, -1)
        grids = c.tm.grids
        keep_n = keep_counts(per, spec, None) if not collapse else per
    else:
        flat = torch.zeros_like(vpos)
        view = torch.zeros_like(vpos).masked_fill(~vvalid, -1)
        grids = [(0, 0)] * b
        keep_n = keep_counts(per, spec, c.n_in)
    size = c.size if c.size.shape[1] == vvalid.shape[1] else vvalid.float()
    assert c.struct is not None
    tpos, tvalid = pack(c.valid & ~c.vis & ~c.struct, left=False)
    text = assign.rows(x_seq, tpos)
    group = None
    if carry.tower_source is not None and out_stage:
        group = tower_groups(carry.tower_source, adapter.drops_protected, flat, vvalid)

    def run(i: int | None) -> Any:
        one = None if i is None else torch.tensor([i], device=x.device)
        n_i = vvalid.shape[1] if i is None else int(per[i])

        def sel(t: torch.Tensor) -> torch.Tensor:
            # one sample: its row, and its own visual tokens only (grid-based methods need exactly its h x w)
            return t if one is None else t[one][:, :n_i]

        def opt(t: torch.Tensor | None, visual: bool = True) -> torch.Tensor | None:
            if t is None or one is None:
                return t
            return t[one][:, :n_i] if visual else t[one]

        inp = ReduceInput(
            x=sel(x),
            size=sel(size),
            valid=sel(vvalid),
            num_protected=0,
            layer=layer,
            num_layers=num_layers,
            grid=grids[0] if i is None else grids[i],
            pristine=out_stage,
            signals=VLMSignals(adapter, c, sel(flat), one, None if i is None else int(per[i])),
            site=stage,
            view=sel(view),
            rows=opt(rows),
            cols=opt(cols),
            prompt_pos=sel(vpos),
            text=opt(text, visual=False),
            text_valid=opt(tvalid, visual=False),
            tower_slot=opt(group),
        )
        return method.reduce(inp, keep_n if one is None else keep_n[one])

    order = values = None  # an OrderedPlan's additions (official parity modes): slot order, slot values
    if bool((keep_n == keep_n[0]).all()) and bool((per == per[0]).all()) and len(set(grids)) == 1:
        p = run(None)
        keep, target = p
        order, values = ordered.parts(p)
    else:  # samples keep different counts: plan each alone (a selection takes one k)
        n = vvalid.shape[1]
        keep = torch.zeros_like(vvalid)
        target = None
        for i in range(b):
            p = run(i)
            kk, tt = p
            oo, vv = ordered.parts(p)
            keep[i, : kk.shape[1]] = kk[0]
            if tt is not None:
                if target is None:
                    target = torch.full((b, n), -1, dtype=torch.long, device=x.device)
                target[i, : tt.shape[1]] = tt[0]
            if oo is not None:
                if order is None:
                    order = torch.zeros(b, n, dtype=torch.float64, device=x.device)
                order[i, : oo.shape[1]] = oo[0]
            if vv is not None:
                if values is None:
                    values = x.new_zeros(b, n, vv.shape[-1], dtype=vv.dtype)
                values[i, : vv.shape[1]] = vv[0]
    keep = keep & vvalid
    if target is not None:
        target = target.masked_fill(keep | ~vvalid, -1)
    return _apply(c, x_seq, x, size, vis, vpos, vvalid, keep, target, order, values)


def _apply(
    c: Call,
    x_seq: torch.Tensor,
    x: torch.Tensor,
    size: torch.Tensor,
    vis: torch.Tensor,
    vpos: torch.Tensor,
    vvalid: torch.Tensor,
    keep: torch.Tensor,
    target: torch.Tensor | None,
    order: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the visual tokens ``x`` by the plan, write each slot at its representative's sequence position and
    return (sequence, positions that stay); the call's source map and slot sizes follow. An
    :class:`~tokenthin.methods.base.OrderedPlan`'s ``values`` replace the slots' means and its ``order`` permutes
    the slots over the same positions (the language model reads them in that order)."""
    assert c.valid is not None and c.src is not None
    b = vvalid.shape[0]
    plan_ = assign.build(keep, target)
    x_new, size_new = assign.merge(x, size, plan_)
    x_new = ordered.slot_values(x_new, plan_, values)
    dst = plan_.dst
    perm = ordered.slot_order(plan_, order)
    if perm is not None:  # place j reads slot perm[j]: slot s moves to place inv[s]
        x_new, size_new = assign.rows(x_new, perm), size_new.gather(1, perm)
        inv = torch.argsort(perm, 1)
        dst = torch.where(dst >= 0, inv.gather(1, dst.clamp(min=0)), dst)
    slot_valid = torch.arange(plan_.n_out, device=x.device).unsqueeze(0) < plan_.counts.unsqueeze(1)
    rep = vpos.gather(1, plan_.slot_src)  # (B, n_out) sequence position of each slot's representative
    seq = x_seq
    bi = torch.arange(b, device=x.device).unsqueeze(1).expand_as(rep)
    if plan_.merges or values is not None or perm is not None:
        seq = x_seq.clone()
        seq[bi[slot_valid], rep[slot_valid]] = x_new[slot_valid].to(seq.dtype)
    is_rep = torch.zeros_like(vis)
    is_rep[bi[slot_valid], rep[slot_valid]] = True
    keep_seq = c.valid & (~vis | is_rep)  # text, structure tokens and the slots' representatives
    dst = dst.masked_fill(~vvalid, -1)
    c.src = torch.where(c.src >= 0, dst.gather(1, c.src.clamp(min=0)), c.src)
    c.size = size_new.masked_fill(~slot_valid, 0)
    return seq, keep_seq
