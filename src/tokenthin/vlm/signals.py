"""Signals at one reduction point of a vision-language model, laid out like the method's padded visual tokens:
the vision tower's keys and attention (captured on its query/key projections, before the language model only) and
the language model's attention (recomputed from a layer's captured queries and keys with its rotary embedding, at
``llm:k`` only; the adapter knows the host's attention, :meth:`~tokenthin.adapters.hf_vlm.VLMAdapter.lm_logits`)."""

from __future__ import annotations

import torch

from ..adapters.hf_vision import HFVisionAdapter
from ..adapters.hf_vlm import VLMAdapter
from ..errors import TokenThinError
from ..methods.base import SignalSource
from ..scores.attention import cls_attention, mean_attention
from .state import Call


def lm_logits(adapter: VLMAdapter, c: Call, layer: int, last_only: bool) -> torch.Tensor:
    """Attention logits of language-model layer ``layer`` at prefill, (B, H, R, T) for R query rows (the last
    one, or all), recomputed from the layer's captured queries and keys with its rotary embedding (no eager
    pass); causal and padding entries are -inf."""
    lq, lk, pe = c.lm_q.get(layer), c.lm_k.get(layer), c.pos_emb.get(layer)
    if lq is None or lk is None or pe is None:
        raise TokenThinError("internal: language-model queries/keys were not captured")
    assert c.valid is not None
    t = lk.shape[1]
    logits = adapter.lm_logits(layer, lq, lk, pe, last_only)  # (B, H, R, T)
    r = logits.shape[2]
    qi = torch.arange(t - r, t, device=logits.device).unsqueeze(1)
    allowed = (torch.arange(t, device=logits.device).unsqueeze(0) <= qi).unsqueeze(0) & c.valid[:, None, :]
    return logits.masked_fill(~allowed.unsqueeze(1), float("-inf"))


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
