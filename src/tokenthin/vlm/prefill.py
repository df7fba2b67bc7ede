"""The prefill (an image in the prompt, an empty cache): the prompt as the language model receives it.

:func:`start_prefill` reads the host's token map of the prompt's image tokens (which tower token, which view, which
row and column each one is; structure tokens such as LLaVA-NeXT's row ends stay like text) into the call.
:func:`shorten_prompt` plans the ``output``-site reduction and hands the language model a shorter prompt: text
tokens stay, each kept or merged visual slot takes the place of its representative token, and samples are
re-padded on the **left** (generation reads the last column). The attention mask and positions are rebuilt to
match; a 1-D rotary host (``adapter.shift_positions``) numbers the shorter prompt 0..T'-1."""

from __future__ import annotations

from typing import Any

import torch

from ..adapters.hf_vlm import LMCall, VLMAdapter
from ..methods.base import Method
from ..ops import assign
from .plan import plan
from .schedule import VLMSchedule
from .sequence import narrow, pack
from .state import Call, Carry, Prefix


def start_prefill(c: Call, adapter: VLMAdapter, carry: Carry, emb: torch.Tensor, am: torch.Tensor | None) -> None:
    """Fill the call from the prompt's embeddings ``emb`` (B, T, D) and the caller's mask ``am`` (B, T)."""
    assert c.vis is not None
    b, t = c.vis.shape
    c.t0 = t
    c.valid = am.bool() if am is not None else torch.ones_like(c.vis)
    img = c.vis & c.valid
    tm = adapter.token_map(emb[img], img.sum(1).tolist(), carry.layout, carry.projected)
    c.tm = tm
    c.flat = torch.zeros(b, t, dtype=torch.long, device=emb.device)
    c.view = torch.zeros_like(c.flat)
    c.rows = torch.full_like(c.flat, -1)
    c.cols = torch.full_like(c.flat, -1)
    c.flat[img] = tm.flat
    c.view[img] = tm.view
    c.rows[img] = tm.row
    c.cols[img] = tm.col
    c.struct = torch.zeros_like(img)
    if bool(tm.newline.any()):  # structure tokens (LLaVA-NeXT row ends) stay, like text
        c.struct[img] = tm.newline
        img = img & ~c.struct
    c.vis = img
    per = img.sum(1)
    c.n_vis = per.tolist()
    n = int(per.max())
    c.src = (
        torch.arange(n, device=emb.device)
        .expand(b, n)
        .masked_fill(torch.arange(n, device=emb.device).unsqueeze(0) >= per.unsqueeze(1), -1)
    )
    c.size = (c.src >= 0).float()


def keep_prompt(c: Call) -> None:
    """No reduction before the language model: it reads the prompt as given."""
    assert c.vis is not None and c.valid is not None
    c.n_in = c.vis.sum(1)
    c.prefix = Prefix(t0=c.t0, mask=c.valid, shift=None, last_pos=None)


def shorten_prompt(
    c: Call,
    adapter: VLMAdapter,
    method: Method,
    carry: Carry,
    schedule: VLMSchedule,
    collapse: bool,
    lc: LMCall,
    kwargs: dict[str, Any],
) -> dict[str, Any]:
    """The language model's keyword arguments for the shortened prompt (``lc``: its call as given)."""
    emb = lc.embeds
    assert emb is not None and schedule.output_keep is not None and c.valid is not None and c.vis is not None
    b, t, _ = emb.shape
    seq, keep_seq = plan(
        c,
        adapter,
        method,
        carry,
        emb,
        layer=adapter.feature_layer,
        num_layers=adapter.vision_layers,
        spec=schedule.output_keep,
        stage="output",
        collapse=collapse,
    )
    idx, valid = pack(keep_seq, left=True)
    am = lc.mask
    padded = not bool(valid.all())
    changes: dict[str, Any] = {
        "embeds": assign.rows(seq, idx).masked_fill(~valid.unsqueeze(-1), 0),
        "mask": valid.to(am.dtype) if am is not None else (valid.long() if padded else None),
    }
    pos0 = lc.positions
    if pos0 is None:
        pos0 = torch.arange(t, device=emb.device).unsqueeze(0)
    dropped = c.valid & ~keep_seq
    shift = last = None
    if pos0.dim() == 2 and adapter.shift_positions:
        before = dropped.long().cumsum(1) - dropped.long()
        pos = adapter.select_positions(pos0.expand(b, -1) - before, idx).masked_fill(~valid, 0)
        shift = dropped.sum(1)
        last = pos[:, -1]
    else:
        pos = adapter.select_positions(pos0, idx)
    changes["positions"] = pos
    if lc.cache_slots is not None:
        changes["cache_slots"] = torch.arange(idx.shape[1], device=emb.device)
    narrow(c, idx, valid)
    assert c.vis is not None
    c.n_in = c.vis.sum(1)
    c.prefix = Prefix(t0=t, mask=valid, shift=shift, last_pos=last)
    return adapter.with_lm_call(kwargs, **changes)
