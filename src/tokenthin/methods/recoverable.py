"""Recoverable Compression: A Multimodal Vision Token Recovery Mechanism Guided by Text Information (Chen et al.,
AAAI 2025), arXiv 2409.01179.

Algorithm (before the language model, keeping ``k`` visual tokens):
1. visual pruning: the tokens the vision encoder itself finds important, by the [CLS] attention of the feature
   layer LLaVA reads;
2. text-guided recovery: of the tokens step 1 dropped, recover those most similar to the prompt's text;
3. merging: every token that is neither kept nor recovered is merged into its most similar surviving token (a
   size-weighted mean), so its information is not lost.

Choices left open, and ours:
* counts: the paper picks the important and the recovered tokens as outliers (interquartile-range rule) of their
  scores, so their number varies per image. A budget here is exact: ``round(visual_share * k)`` tokens by [CLS]
  attention, the rest recovered by text similarity (``visual_share=0.5`` by default);
* text similarity: the paper compares the visual tokens with the CLIP text encoder's embedding of the question.
  Here both sides are what the language model reads: each visual token's best cosine similarity to any of the
  prompt's text-token input embeddings (``ReduceInput.text``, the sample's own prompt);
* merging: by cosine similarity of the same (projected) visual tokens; ties go to the lowest index;
* encoders without [CLS]: ``score="mean"`` (attention received) instead of refusing.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import TokenThinError
from ..ops.select import topk_by_score
from ..ops.similarity import normalize, per_sample_matmul
from .base import Method, Param, Plan, ReduceInput, keep_indices, register, uniform_keep


def _share(v: Any) -> str | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1
    return None if ok else "must be a fraction in [0, 1] (0: text recovery only, 1: visual pruning only)"


def _score_kind(v: Any) -> str | None:
    return None if v in ("cls", "mean") else "must be 'cls' ([CLS] attention) or 'mean' (attention received)"


@register
class Recoverable(Method):
    name = "recoverable"
    title = "Recoverable Compression: A Multimodal Vision Token Recovery Mechanism Guided by Text Information"
    arxiv = "2409.01179"
    summary = "keep tokens by [CLS] attention, recover text-relevant ones, merge the rest into their nearest"
    kind = "prune"
    sites = ("output",)
    default_site = "output"
    signals = frozenset({"cls_attn"})
    needs_prompt = True
    params = {
        "visual_share": Param(0.5, "fraction of the kept tokens chosen by [CLS] attention (the rest: by text)", _share),
        "score": Param("cls", "visual score: 'cls' ([CLS] attention) or 'mean' (attention received)", _score_kind),
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.p["score"] == "mean":
            self.signals = frozenset({"mean_attn"})

    def reduce(self, inp: ReduceInput, keep: torch.Tensor) -> Plan:
        k = uniform_keep(keep, self.name)
        cand = inp.candidates
        if self.p["score"] == "cls" and not inp.has_cls:
            raise TokenThinError("this model has no [CLS] token; pass score='mean' (attention each token receives)")
        visual = inp.cls_attention() if self.p["score"] == "cls" else inp.mean_attention()
        d = min(k, round(self.p["visual_share"] * k))
        kept = keep_indices(inp, topk_by_score(visual, d, cand))
        xn = normalize(inp.x)
        text, text_valid = inp.prompt_text(self.name)
        sim = per_sample_matmul(xn, normalize(text)).masked_fill(~text_valid.unsqueeze(1), float("-inf"))
        relevance = sim.max(-1).values  # (B, N) best cosine to any text token
        kept = kept | keep_indices(inp, topk_by_score(relevance, k - d, cand & ~kept))
        # every other token joins its most similar survivor
        to_kept = per_sample_matmul(xn, xn).masked_fill(~kept.unsqueeze(1), float("-inf"))
        target = to_kept.argmax(-1).masked_fill(kept | ~cand, -1)
        return kept, target
