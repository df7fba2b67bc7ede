"""Signals at one reduction point of a vision-language model, laid out like the method's padded visual tokens:
the vision tower's keys and attention (captured on its query/key projections, before the language model only) and
the language model's attention (recomputed from a layer's captured queries and keys with its rotary embedding, at
``llm:k`` only; the adapter knows the host's attention, :meth:`~tokenthin.adapters.hf_vlm.VLMAdapter.lm_logits`)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..adapters.hf_vision import HFVisionAdapter
from ..adapters.hf_vlm import VLMAdapter
from ..errors import TokenThinError
from ..methods.base import SignalSource
from ..scores.attention import cls_attention, mean_attention
from .state import Call


def _allowed(c: Call, r: int, t: int, device: torch.device) -> torch.Tensor:
    """(B, 1, R, T) True where query row ``t - R + i`` may attend key j (causal, not padding)."""
    assert c.valid is not None
    qi = torch.arange(t - r, t, device=device).unsqueeze(1)
    allowed = (torch.arange(t, device=device).unsqueeze(0) <= qi).unsqueeze(0) & c.valid[:, None, :]
    return allowed.unsqueeze(1)


def _captured(c: Call, layer: int) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    lq, lk, pe = c.lm_q.get(layer), c.lm_k.get(layer), c.pos_emb.get(layer)
    if lq is None or lk is None or pe is None:
        raise TokenThinError("internal: language-model queries/keys were not captured")
    return lq, lk, pe


def lm_logits(adapter: VLMAdapter, c: Call, layer: int, last_only: bool) -> torch.Tensor:
    """Attention logits of language-model layer ``layer`` at prefill, (B, H, R, T) for R query rows (the last
    one, or all), recomputed from the layer's captured queries and keys with its rotary embedding (no eager
    pass); causal and padding entries are -inf."""
    lq, lk, pe = _captured(c, layer)
    logits = adapter.lm_logits(layer, lq, lk, pe, last_only)  # (B, H, R, T)
    return logits.masked_fill(~_allowed(c, logits.shape[2], lk.shape[1], logits.device), float("-inf"))


def lm_logit_blocks(adapter: VLMAdapter, c: Call, layer: int, floats: int) -> Iterator[torch.Tensor]:
    """The logits of :func:`lm_logits` (all query rows) a few heads at a time, (B, h, T, T) with
    ``B * h * T * T <= floats`` (at least one head): the rotary is applied once, and no (B, H, T, T) map exists."""
    lq, lk, pe = _captured(c, layer)
    qh, kh = adapter.lm_heads_qk(layer, lq, lk, pe, last_only=False)  # (B, H, T, d) each
    b, n_heads, t, _ = qh.shape
    blocked = ~_allowed(c, t, t, qh.device)
    step = max(1, floats // max(b * t * t, 1))
    for h in range(0, n_heads, step):
        logits = (qh[:, h : h + step].float() @ kh[:, h : h + step].float().transpose(-1, -2)) * adapter.lm_scale
        yield logits.masked_fill_(blocked, float("-inf"))


class VLMSignals(SignalSource):
    """Signals of one reduction point, laid out like the method's padded visual tokens (B, N)."""

    def __init__(
        self,
        adapter: VLMAdapter,
        call: Call,
        flat: torch.Tensor,
        rows: torch.Tensor | None = None,
        n: int | None = None,
    ) -> None:
        self.adapter, self.call, self.flat = adapter, call, flat  # flat: (B, N) index into the tower's tokens
        self.rows, self.n = rows, n  # planning one sample: its row, and its own token count
        v = adapter.vision
        self.has_cls = v is not None and v.num_protected >= 1

    def _sel(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.rows is None else t[self.rows][:, : self.n]

    def _pick(self, per_image: torch.Tensor) -> torch.Tensor:
        per_image = per_image[:, self.adapter.drops_protected :]
        flat = per_image.reshape(-1, *per_image.shape[2:])
        return flat[self.flat.clamp(max=flat.shape[0] - 1)]

    def _qk(self, layer: int, need_q: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        c = self.call
        if layer not in c.k or (need_q and layer not in c.q):
            raise TokenThinError(
                f"no vision-tower keys at layer {layer}: the vision tower's signals exist before the language "
                "model only (site 'output')"
            )
        return c.q.get(layer), c.k[layer]

    def _vision(self) -> HFVisionAdapter:
        v = self.adapter.vision
        assert v is not None  # the runtime refuses vision signals on hosts without a scorable tower
        return v

    def keys(self, layer: int) -> torch.Tensor:
        _, k = self._qk(layer, False)
        b, n, _ = k.shape
        return self._pick(k.view(b, n, self._vision().num_heads, -1).mean(2))

    def cls_attention(self, layer: int) -> torch.Tensor:
        q, k = self._qk(layer, True)
        v = self._vision()
        return self._pick(cls_attention(q, k, v.num_heads, v.scale))

    def mean_attention(self, layer: int) -> torch.Tensor:
        q, k = self._qk(layer, True)
        v = self._vision()
        return self._pick(mean_attention(q, k, v.num_heads, v.scale))

    def last_token_attention(self, layer: int) -> torch.Tensor:
        """(B, N) attention the last prompt token pays each visual token in language-model layer ``layer``,
        averaged over heads (the softmax runs over the whole prompt)."""
        logits = lm_logits(self.adapter, self.call, layer, last_only=True)[:, :, 0]  # (B, H, T)
        att = logits.softmax(-1).mean(1)
        assert self.call.vis_pos is not None
        return self._sel(att.gather(1, self.call.vis_pos))

    def lm_attention_logits(self, layer: int) -> torch.Tensor:
        """(B, H, T, T) attention logits of language-model layer ``layer`` over the current sequence (scaled,
        causal and padding masked with -inf); ``ReduceInput.prompt_pos`` says where the visual tokens are."""
        logits = lm_logits(self.adapter, self.call, layer, last_only=False)
        return logits if self.rows is None else logits[self.rows]

    def lm_attention_blocks(self, layer: int, floats: int = 1 << 20) -> Iterator[torch.Tensor]:
        """The logits of :meth:`lm_attention_logits`, a few heads at a time ((B, h, T, T), about ``floats``
        values each), for scores that reduce each head on its own (AIM's PageRank)."""
        for logits in lm_logit_blocks(self.adapter, self.call, layer, floats):
            yield logits if self.rows is None else logits[self.rows]
