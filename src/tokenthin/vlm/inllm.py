"""Inside the language model (``llm:k``): after decoder layer k the visual tokens are reduced again
(:func:`reduce_at_point`); kept tokens keep their original positions (layers 0..k already used them, and their
keys in layers 0..k stay in the cache at full length), so each later layer is handed the matching positions,
rotary embeddings and mask (:func:`prefill_layer`). A fractional keep is of the visual tokens that entered the
language model."""

from __future__ import annotations

from typing import Any

import torch

from ..adapters.hf_vlm import LMCall, VLMAdapter
from ..methods.base import Method
from ..ops import assign
from .plan import plan
from .sequence import narrow, pack
from .state import Call, Carry


def reduce_at_point(
    c: Call, adapter: VLMAdapter, method: Method, carry: Carry, k: int, spec: float | int, hs: torch.Tensor
) -> torch.Tensor:
    """Layer k's output hidden states ``hs`` (B, T, D) with the visual tokens reduced: (B, T', D), left-padded."""
    assert c.valid is not None and c.vis is not None and c.prefix is not None
    seq, keep_seq = plan(
        c,
        adapter,
        method,
        carry,
        hs,
        layer=k,
        num_layers=len(adapter.lm_layers),
        spec=spec,
        stage="llm",
        collapse=False,
    )
    idx, valid = pack(keep_seq, left=True)
    c.gather = idx if c.gather is None else c.gather.gather(1, idx)
    narrow(c, idx, valid)
    c.prefix.deep[k] = valid
    return assign.rows(seq, idx).masked_fill(~valid.unsqueeze(-1), 0)


def prefill_layer(
    c: Call, adapter: VLMAdapter, j: int, is_point: bool, lc: LMCall, kwargs: dict[str, Any]
) -> dict[str, Any] | None:
    """Decoder layer ``j``'s keyword arguments at prefill after a reduction before it (None: unchanged). At a
    reduction point (``is_point``) the rotary embeddings the layer applies are kept for scores."""
    out = None
    rotary = lc.rotary
    if c.gather is not None:
        idx, valid = c.gather, c.valid
        assert valid is not None and lc.embeds is not None
        changes: dict[str, Any] = {}
        if rotary is not None:
            rotary = adapter.select_rotary(rotary, idx)
            changes["rotary"] = rotary
        if lc.positions is not None:
            changes["positions"] = adapter.select_positions(lc.positions, idx)
        if lc.cache_slots is not None:
            changes["cache_slots"] = torch.arange(idx.shape[1], device=idx.device)
        changes["mask"] = adapter.layer_mask(valid, idx.shape[1], lc.mask, lc.embeds.dtype)
        out = adapter.with_lm_call(kwargs, **changes)
    if is_point:
        c.pos_emb[j] = rotary
    return out
