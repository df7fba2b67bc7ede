"""Decoding steps (a cache this runtime filled): the caller's attention mask and positions still number the
original prompt; they are translated to the shorter one the cache holds (:func:`translate`, at the language
model's entry), and, after an ``llm:k`` reduction, each later decoder layer gets a mask over its own shorter cache
(:func:`deep_layer`). The host's formats are the adapter's (:class:`~tokenthin.adapters.hf_vlm.VLMAdapter`)."""

from __future__ import annotations

from typing import Any

import torch

from ..adapters.hf_vlm import LMCall, VLMAdapter
from .state import Prefix


def translate(p: Prefix, adapter: VLMAdapter, lc: LMCall, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The language model's keyword arguments for a decoding step after a prompt shortened as ``p`` says."""
    emb = lc.embeds
    assert emb is not None
    b, q = emb.shape[0], emb.shape[1]
    t1 = p.mask.shape[1]
    past = adapter.cache_len(lc.cache)
    am = lc.mask
    changes: dict[str, Any] = {}
    if am is not None:
        adapter.check_decode_mask(am, p.t0)
        changes["mask"] = torch.cat([p.mask.to(am.dtype), am[:, p.t0 :]], 1)
    elif not bool(p.mask.all()):
        changes["mask"] = torch.cat(
            [p.mask.long(), torch.ones(b, past - t1 + q, dtype=torch.long, device=p.mask.device)], 1
        )
    pos = lc.positions
    if p.shift is not None:
        if pos is not None:
            changes["positions"] = pos.expand(b, -1) - p.shift.unsqueeze(1)
        elif p.last_pos is not None:
            changes["positions"] = p.last_pos.unsqueeze(1) + 1 + (past - t1) + torch.arange(q, device=emb.device)
    if lc.cache_slots is not None:
        changes["cache_slots"] = lc.cache_slots - (p.t0 - t1)
    return adapter.with_lm_call(kwargs, **changes)


def deep_layer(
    p: Prefix | None, adapter: VLMAdapter, j: int, lc: LMCall, kwargs: dict[str, Any]
) -> dict[str, Any] | None:
    """Decoder layer ``j``'s keyword arguments for a decoding step when an ``llm:k`` point before it (k < j)
    shortened its cache; None when none did."""
    done = [k for k in (p.deep if p is not None else {}) if k < j]
    if p is None or not done:
        return None
    deep = p.deep[max(done)]
    hs = lc.embeds
    assert hs is not None
    q = hs.shape[1]
    past = adapter.cache_len(lc.cache, j)
    gen = past - deep.shape[1]
    am = lc.mask
    changes: dict[str, Any] = {}
    if am is not None or not bool(deep.all()):
        tail = torch.ones(hs.shape[0], gen + q, dtype=torch.bool, device=hs.device)
        changes["mask"] = adapter.layer_mask(torch.cat([deep, tail], 1), q, am, hs.dtype)
    if lc.cache_slots is not None:
        changes["cache_slots"] = torch.arange(past, past + q, device=hs.device)
    return adapter.with_lm_call(kwargs, **changes)
