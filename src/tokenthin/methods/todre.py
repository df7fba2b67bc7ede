"""ToDRE: Visual Token Pruning via Diversity and Task Awareness for Efficient Large Vision-Language Models
(Li, Yang, Lu, 2025), arXiv 2505.18757 (v1).

Algorithm, two stages:
1. after the vision encoder (the projector output the language model reads): keep a diverse subset of the visual
   tokens with a greedy k-center cover (farthest-first traversal on cosine distance, :func:`~tokenthin.ops.diversity.
   k_center_greedy`, the ``kcenter`` method);
2. inside the language model: once the visual information has migrated into the text tokens ("information
   migration"), drop the task-irrelevant visual tokens at one decoder layer: rank them by the attention the text
   tokens pay them in that layer and keep a fraction ``llm_keep``; the paper's headline setting drops all of them.

Choices left open, and ours:
* the k-center seed: the token nearest the mean of the candidates (the most central one), as ``kcenter``;
* task relevance: the attention paid by the prompt's text tokens (every text query row, softmax over the prompt,
  averaged over text rows and heads), recomputed from the layer's queries and keys with its rotary embedding;
* the layer: the paper picks it per model from where the migration has happened; we default to the middle of the
  language model (``llm_layer=None`` -> ``L // 2``) and keep none of the visual tokens there (``llm_keep=0``).
  v2 of the paper (Nov 2025) replaces k-center by greedy max-sum diversification; this file follows v1.
"""

from __future__ import annotations

from typing import Any

import torch

from ..ops.diversity import k_center_greedy
from ..ops.select import topk_by_score
from .base import Method, Param, Plan, ReduceInput, keep_indices, register, uniform_keep


def _layer(v: Any) -> str | None:
    return None if v is None or (isinstance(v, int) and v >= 0) else "must be None (the middle) or a layer index"


def _frac(v: Any) -> str | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1
    return None if ok else "must be a fraction in [0, 1]"


@register
class ToDRE(Method):
    name = "todre"
    title = "ToDRE: Visual Token Pruning via Diversity and Task Awareness for Efficient Large VLMs"
    arxiv = "2505.18757"
    summary = "k-center cover of the visual tokens before the LLM, then drop task-irrelevant ones inside it"
    kind = "prune"
    sites = ("output+llm",)
    default_site = "output+llm"
    signals = frozenset({"lm_attn"})
    params = {
        "llm_layer": Param(None, "language-model layer after which visual tokens are dropped (None: L // 2)", _layer),
        "llm_keep": Param(0.0, "fraction of the entering visual tokens kept after that layer (paper: 0)", _frac),
    }

    llm_search = {"llm_layer": "layers", "llm_keep": (0.0, 0.25, 0.5)}  # tokenthin.calibrate on a VLM

    def llm_points(self, num_layers: int) -> list[tuple[int, float | int]]:
        k = self.p["llm_layer"] if self.p["llm_layer"] is not None else num_layers // 2
        if not 0 <= k < num_layers - 1:
            from ..errors import SiteError

            raise SiteError(f"todre: llm_layer={k} must be in 0..{num_layers - 2} for this language model")
        return [(k, float(self.p["llm_keep"]))]

    def reduce(self, inp: ReduceInput, keep: torch.Tensor) -> Plan:
        k = uniform_keep(keep, self.name)
        if inp.site == "output":
            return keep_indices(inp, k_center_greedy(inp.x, k, inp.candidates)), None
        if k == 0:
            return torch.zeros_like(inp.valid), None
        logits = inp.signals.lm_attention_logits(inp.layer)  # (B, H, T, T), -inf where masked
        seq_valid = torch.isfinite(logits[:, 0].diagonal(dim1=-2, dim2=-1))  # a valid token sees itself
        att = torch.nan_to_num(logits.softmax(-1), nan=0.0).mean(1)  # (B, T, T); padded rows are 0
        del logits
        vis_pos = inp.positions_in_prompt(self.name)
        t = att.shape[1]
        is_vis = torch.zeros(att.shape[0], t, dtype=torch.bool, device=att.device)
        is_vis.scatter_(1, vis_pos, inp.valid)
        text_rows = (seq_valid & ~is_vis).float()  # (B, T)
        relevance = (att * text_rows.unsqueeze(-1)).sum(1) / text_rows.sum(1, keepdim=True).clamp_min(1)
        score = relevance.gather(1, vis_pos)
        return keep_indices(inp, topk_by_score(score, k, inp.candidates)), None
