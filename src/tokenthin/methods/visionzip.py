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

What the official code (dvlab-research / JIA-Lab-research VisionZip, ``visionzip/clip_encoder.py``, ``main.py``)
fixes:
* layer: LLaVA's feature layer (the penultimate, ``attentions[-2]``, ``hidden_states[-2]``); keys of the same
  layer (``raw_key_states.mean(1)``). Here: the layer at the site (``site="layer:-2"`` reproduces LLaVA);
* heads summed (``cls_attention.sum(dim=1)``), the same ranking as their mean;
* budgets: ``visionzip(model, dominant=54, contextual=10)`` for 64 tokens (108 + 20 for 128, 162 + 30 for 192),
  and ``main.py`` passes ``dominant - 1`` to the tower: [CLS] is one of the 54, so the language model reads
  [CLS] + 53 patch tokens + 10 contextual tokens, in that order (dominant tokens in their original order, then the
  contextual ones in theirs). The default ``dominant = 54 / 64``.

Where the default differs from the official code, and why:
* [CLS]: the default counts patch tokens only; protected tokens ([CLS], registers) are kept on top of ``k``
  (``keep=64``: 54 dominant + 10 contextual patches, plus [CLS] where the host keeps it; a LLaVA host drops it);
* the merge is the library's size-weighted mean (:mod:`tokenthin.ops.assign`): each contextual token is
  ``(target + sum(assigned)) / (1 + n)`` for unit sizes. The released code computes ``target + mean(assigned)``
  (``counts`` excludes the target), which is not a mean: such a token has about twice the norm of a patch
  token. We take the mean the paper's "merge" suggests, which also keeps token sizes and the source map exact
  (proportional attention, unmerge);
* order: the kept tokens stay in their original (positional) order; the released code puts the dominant tokens
  first and the contextual tokens after them;
* dominant ties go to the lowest index (``torch.topk`` leaves them unspecified);
* encoders without [CLS] (SigLIP): the paper scores dominant tokens by the attention each token receives
  (averaged over queries and heads), as does the official Qwen2.5-VL port; that is ``score="mean"``. The default
  ``score="cls"`` refuses such models with a message naming the option instead of switching silently.

``official=True`` reproduces the released tower output: with ``score="cls"`` on a model with [CLS] the dominant
count ``round(dominant * k)`` includes [CLS] (``k - 1`` patch tokens are kept: 53 + 10 for ``keep=64``), the
contextual tokens are ``target + mean(assigned)`` and the order is [CLS], dominant, contextual (an
:class:`~tokenthin.methods.base.OrderedPlan`). The vision-language runtime honours values and order; encoder hosts
apply the selection and merge assignment only (size-weighted means, positional order). What it cannot give: a
LLaVA host drops [CLS] before the projector, so there the language model reads the 53 + 10 patch tokens without
the [CLS] row the released code adds.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import TokenThinError
from ..ops.assign import rows as assign_rows
from ..ops.select import topk_by_score
from ..ops.similarity import normalize
from .base import Method, OrderedPlan, Param, Plan, ReduceInput, keep_indices, register, uniform_keep


def _share(v: Any) -> str | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1
    return None if ok else "must be a fraction in [0, 1] (0: contextual tokens only, 1: dominant tokens only)"


def _flag(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be True (the official code's behaviour) or False"


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
        "official": Param(
            False,
            "reproduce the official code: [CLS] counts among the dominant tokens, contextual tokens are "
            "target + mean(assigned), order [dominant, contextual]",
            _flag,
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
        official = self.p["official"]
        if official and self.p["score"] == "cls" and inp.has_cls:
            d = max(d - 1, 0)  # the official dominant count includes [CLS]
        if d > 0:
            dom_idx = topk_by_score(self._score(inp), d, cand)
        else:
            dom_idx = torch.empty(cand.shape[0], 0, dtype=torch.long, device=cand.device)
        keep_mask = keep_indices(inp, dom_idx)
        if c == 0:
            return OrderedPlan(keep_mask, None, self._order(keep_mask, None)) if official else (keep_mask, None)
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
        if not official:
            return keep_mask | is_target, target
        # the released merge: target + mean(assigned), the mean over the assigned tokens alone (0 if none)
        hot = torch.nn.functional.one_hot(best, c).to(torch.float32) * movers.unsqueeze(-1)  # (B, N, c)
        agg = torch.bmm(hot.transpose(1, 2), inp.x.float()) / hot.sum(1).clamp_min(1).unsqueeze(-1)
        values = inp.x.float().scatter(
            1, tgt_idx.unsqueeze(-1).expand(-1, -1, inp.x.shape[-1]), assign_rows(inp.x.float(), tgt_idx) + agg
        )
        return OrderedPlan(keep_mask | is_target, target, self._order(keep_mask, is_target), values.to(inp.x.dtype))

    @staticmethod
    def _order(dominant: torch.Tensor, contextual: torch.Tensor | None) -> torch.Tensor:
        """The released output order: [CLS] and dominant tokens in their original order, then contextual ones."""
        n = dominant.shape[1]
        key = torch.arange(n, dtype=torch.float64, device=dominant.device).expand(dominant.shape[0], n)
        return key if contextual is None else key + n * contextual.double()
