"""VisionZip: Longer is Better but Not Necessary in Vision Language Models (Yang et al., CVPR 2025),
arXiv 2412.04467.

Algorithm (one reduction point after encoder layer ``l``, keeping ``k`` patch tokens):
1. dominant tokens: the ``d = round(dominant * k)`` patch tokens with the highest [CLS] attention in layer ``l``
   (heads averaged);
2. contextual tokens: of the remaining ``M`` patch tokens (original order), every ``step = max(1, M // c)``-th
   one, the first ``c = k - d`` of them, becomes a target;
3. every other remaining token is assigned to the target whose key is most similar: cosine similarity of
   layer ``l``'s keys averaged over heads, L2-normalised; ties go to the first target;
4. each target becomes the mean of itself and the tokens assigned to it; output = dominant + contextual tokens.

What the official code (dvlab-research / JIA-Lab-research VisionZip, ``visionzip/clip_encoder.py``) fixes:
* layer: LLaVA's feature layer (the penultimate, ``attentions[-2]``, ``hidden_states[-2]``); keys of the same
  layer (``raw_key_states.mean(1)``). Here: the layer at the site (``site="layer:-2"`` reproduces LLaVA);
* heads summed (``cls_attention.sum(dim=1)``), the same ranking as their mean;
* budgets: 54 dominant + 10 contextual for 64 tokens (108 + 20 for 128, 162 + 30 for 192), [CLS] kept on top:
  the default ``dominant = 54 / 64``.

Where we differ, and why:
* the merge is the library's size-weighted mean (:mod:`tokenthin.ops.assign`): each contextual token is
  ``(target + sum(assigned)) / (1 + n)`` for unit sizes. The released code computes
  ``target + mean(assigned)`` (``counts`` excludes the target), which is not a mean: such a token has about twice
  the norm of a patch token. We take the mean the paper's "merge" suggests, which also keeps token sizes and
  the source map exact (proportional attention, unmerge);
* protected tokens ([CLS], registers) are always kept on top of ``k``; dominant ties go to the lowest index;
* encoders without [CLS] (SigLIP): the paper scores dominant tokens by the attention each token receives
  (averaged over queries and heads), as does the official Qwen2.5-VL port; that is ``score="mean"``. The default
  ``score="cls"`` refuses such models with a message naming the option instead of switching silently.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import TokenThinError
from ..ops.select import topk_by_score
from ..ops.similarity import normalize
from .base import Method, Param, Plan, ReduceInput, keep_indices, register, uniform_keep


def _share(v: Any) -> str | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1
    return None if ok else "must be a fraction in [0, 1] (0: contextual tokens only, 1: dominant tokens only)"


def _score_kind(v: Any) -> str | None:
    return None if v in ("cls", "mean") else "must be 'cls' ([CLS] attention) or 'mean' (attention received)"


@register
class VisionZip(Method):
    name = "visionzip"
    title = "VisionZip: Longer is Better but Not Necessary in Vision Language Models"
    arxiv = "2412.04467"
    summary = (
        "keep dominant tokens by [CLS] attention; merge the rest into evenly spaced contextual tokens by key similarity"
    )
    kind = "prune"
    sites = ("layer", "output")
    default_site = "output"
    signals = frozenset({"cls_attn", "mean_attn", "keys"})
    params = {
        "dominant": Param(54 / 64, "fraction of the kept patch tokens that are dominant (the rest contextual)", _share),
        "score": Param(
            "cls",
            "dominant-token score: 'cls' ([CLS] attention, the paper) or 'mean' (attention received, the paper's "
            "choice for encoders without [CLS] such as SigLIP)",
            _score_kind,
        ),
    }

    def _score(self, inp: ReduceInput) -> torch.Tensor:
        if self.p["score"] == "mean":
            return inp.mean_attention()
        if not inp.has_cls:
            raise TokenThinError(
                "this model has no [CLS] token; VisionZip then scores dominant tokens by the attention they "
                "receive, as the paper does for SigLIP: pass score='mean'"
            )
        return inp.cls_attention()

    def reduce(self, inp: ReduceInput, keep: torch.Tensor) -> Plan:
        k = uniform_keep(keep, self.name)
        cand = inp.candidates
        d = min(k, int(k * self.p["dominant"] + 0.5))
        c = k - d
        if d > 0:
            dom_idx = topk_by_score(self._score(inp), d, cand)
        else:
            dom_idx = torch.empty(cand.shape[0], 0, dtype=torch.long, device=cand.device)
        keep_mask = keep_indices(inp, dom_idx)
        if c == 0:
            return keep_mask, None
        rest = cand & ~keep_mask
        step = (rest.sum(1, keepdim=True) // c).clamp_min(1)  # (B, 1); every sample has >= c remaining tokens
        rank = rest.long().cumsum(1) - 1  # position among the remaining tokens
        is_target = rest & (rank % step == 0) & (rank // step < c)
        tgt_idx = torch.sort(is_target.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :c]
        metric = normalize(inp.keys())  # (B, N, d_head) float32
        tgt_keys = metric.gather(1, tgt_idx.unsqueeze(-1).expand(-1, -1, metric.shape[-1]))
        best = torch.bmm(metric, tgt_keys.transpose(1, 2)).argmax(-1)  # (B, N) most similar target
        movers = rest & ~is_target
        target = torch.where(movers, tgt_idx.gather(1, best), torch.full_like(best, -1))
        return keep_mask | is_target, target
