"""ToMe: Token Merging: Your ViT But Faster (Bolya et al., ICLR 2023), arXiv 2210.09461.

Algorithm (per reduction point):
1. metric = the layer's keys averaged over heads (the paper's choice, Sec. 3);
2. split tokens alternately into A (even positions) and B (odd positions); protected tokens ([CLS], registers)
   never merge and are never merged into;
3. every A token draws an edge to its most similar B token (cosine); keep the ``r`` strongest edges;
4. merge each chosen A token into its B match by size-weighted average, tracking sizes;
5. proportional attention: later layers add log(size) to the attention logits (the adapters do this as an
   additive attention mask, so SDPA keeps working).

Choices the paper leaves open or that differ from the official code:
* The merge happens at the layer boundary (after the layer's MLP) using that layer's keys, instead of between
  attention and MLP inside the layer: no forward body is copied. The last layer's MLP therefore runs on
  unmerged tokens; FLOPs are counted for what really runs.
* At a single site (``layer:k`` / ``output``) with a keep count larger than one round can remove (at most half
  of the candidates), matching is repeated on the merged tokens until the count is reached.
* ``r`` larger than what a layer can merge raises an error instead of being clamped silently (official:
  ``r = min(r, (t - protected) // 2)``).
* Token order: tokens keep their positional order after a merge. The official code (facebookresearch/ToMe,
  ``tome/merge.py`` ``bipartite_soft_matching``) returns ``[unmerged A, B]`` (with a [CLS] token the unmerged A
  tokens in their order; without one by descending edge strength; a distillation token second), so the next
  layer's alternate split pairs different tokens.
* The r strongest edges: ties go to the lowest index (official: ``argsort``, unspecified on ties).
* Merge point: at the layer boundary (see above); the official timm patch merges between attention and MLP. No
  seam of an HF or timm layer can change the token count between its attention residual and its MLP without a
  copied forward (which the official patch has, and which skips LayerScale on newer timm), so this is not
  reproduced in either mode.
* Pooled heads: the timm adapter averages merged tokens weighted by size; the official patch takes the plain mean
  over the merged tokens (``global_pool="avg"``). [CLS]-token heads are the same.

``official=True`` reproduces the official token order at site ``layers``: each point splits the current tokens
alternately in the order the official code would hold them (``ReduceInput.order``, carried by the encoder
runtime across the points of one call), and returns that order after its merge (an
:class:`~tokenthin.methods.base.OrderedPlan`). Selection and merged values (size-weighted means, the official
``merge_wavg``) then equal the official algorithm's, merged at the layer boundary. The encoder's output stays in
positional order (so sizes, padding, the source map and unmerge keep working); ``tokenthin.info(model).order``
gives the official order (``out.gather(1, order[..., None].expand_as(out))`` is [CLS] + the re-ordered tokens as
the official timm patch returns them); at a vision-language model's ``output`` site the language model reads the
official order. One matching merges at most half of the candidates; the official code has no single-site mode,
so at ``layer:k`` / ``output`` a keep count below half is refused in this mode (the default repeats the matching).
Protected tokens beyond [CLS] and a distillation token (registers) are handled like them: never merged, first.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import BudgetError
from ..ops.matching import edge_scores, match, merge_in_rounds
from ..ops.ordered import places
from .base import Method, OrderedPlan, Param, Plan, ReduceInput, register


def merge_rounds(inp: ReduceInput, keep: torch.Tensor | int, metric: torch.Tensor) -> Plan:
    """Bipartite matching repeated until each sample keeps ``keep`` candidates; one combined plan. In the
    fixed-count case (``keep`` an int, ``inp.fixed`` set) the rounds are planned from the counts alone."""
    cand = inp.candidates

    def one_round(cur: torch.Tensor, step: torch.Tensor | int, alive: torch.Tensor) -> Plan:
        # pack the surviving tokens to the front (original order) so the alternate A/B split is re-drawn
        present = alive & inp.valid
        order = torch.argsort((~present).to(torch.int8), dim=1, stable=True)
        packed = metric.gather(1, order.unsqueeze(-1).expand_as(metric))
        keep_p, target_p = match(packed, step, cur.gather(1, order))
        keep_o = torch.empty_like(keep_p).scatter_(1, order, keep_p)
        to = torch.where(target_p >= 0, order.gather(1, target_p.clamp(min=0)), target_p)
        return keep_o, torch.empty_like(to).scatter_(1, order, to)

    if isinstance(keep, int) and inp.fixed is not None:
        r = inp.fixed - keep
        if r <= inp.fixed // 2:  # one round suffices
            return match(metric, r, cand)
        return merge_in_rounds(inp.valid, cand, r, one_round, count=inp.fixed)
    r_left = inp.counts - keep
    r_max = int(r_left.max())
    if r_max <= int(inp.counts.min()) // 2:  # one round suffices
        return match(metric, r_max if r_max == int(r_left.min()) else r_left, cand)
    return merge_in_rounds(inp.valid, cand, r_left, one_round)


def official_round(inp: ReduceInput, keep: torch.Tensor | int, metric: torch.Tensor) -> OrderedPlan:
    """One official bipartite matching (``tome/merge.py``), restated on the current tokens: A / B alternate in the
    official token order (``inp.order``), each A candidate's best B match (cosine of ``metric``), the r strongest
    edges merged; the plan's order is the official output order [protected, unmerged A, B]."""
    cand, valid = inp.candidates, inp.valid
    b, n = valid.shape
    r = (inp.fixed - keep) if isinstance(keep, int) and inp.fixed is not None else inp.counts - keep
    half = inp.fixed // 2 if inp.fixed is not None else inp.counts // 2
    too_many = r > half if isinstance(r, int) else bool((r > half).any())
    if too_many:
        raise BudgetError(
            "'tome' with official=True merges at most half of the candidates at one point, as one official "
            "matching does; keep at least half of them here, or use the default official=False (repeated matching)"
        )
    place = places(inp.order, valid)  # (B, N) place of each token in the official order
    seq = torch.argsort(place, dim=1)  # place -> token
    a_idx, b_idx = seq[:, 0::2], seq[:, 1::2]
    a_ok, b_ok = cand.gather(1, a_idx), cand.gather(1, b_idx)
    best, best_j = edge_scores(metric, a_idx, b_idx, a_ok, b_ok)  # (B, na): best B match of every A token
    edge = torch.argsort(best, dim=1, descending=True, stable=True)  # A places by edge strength
    rank = torch.empty_like(edge).scatter_(1, edge, torch.arange(edge.shape[1], device=edge.device).expand_as(edge))
    r_col = r if isinstance(r, int) else r.reshape(-1, 1)
    chosen = (rank < r_col) & a_ok & torch.isfinite(best)
    keep_m = torch.ones(b, n, dtype=torch.bool, device=valid.device).scatter(1, a_idx, ~chosen)
    to = torch.where(chosen, b_idx.gather(1, best_j), torch.full_like(best_j, -1))
    target = torch.full((b, n), -1, dtype=torch.long, device=valid.device).scatter(1, a_idx, to)
    # the official output order: protected tokens first, then the unmerged A tokens (in their order where a [CLS]
    # token exists, by descending edge strength where none does), then the B tokens in their order
    a_key = (place.gather(1, a_idx) if inp.num_protected > 0 else rank).to(torch.float64)
    key = torch.full((b, n), 0.0, dtype=torch.float64, device=valid.device).scatter(1, a_idx, a_key)
    key = key.scatter(1, b_idx, place.gather(1, b_idx).to(torch.float64) + n)
    prot = ~cand & valid
    key = torch.where(prot, place.to(torch.float64) - 3 * n, key)
    return OrderedPlan(keep_m & valid, target, key)


def _flag(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be True (the official code's token order) or False"


@register
class ToMe(Method):
    name = "tome"
    title = "Token Merging: Your ViT But Faster"
    arxiv = "2210.09461"
    summary = "bipartite soft matching on keys; merge r tokens per layer with proportional attention"
    kind = "merge"
    sites = ("layers", "layer", "output", "block")
    default_site = "layers"
    signals = frozenset({"keys"})
    params = {
        "official": Param(
            False,
            "reproduce the official token order: after each merge the tokens are [unmerged A, B], and the next "
            "point's alternate split follows that order (one matching per point)",
            _flag,
        ),
    }

    def reduce(self, inp: ReduceInput, keep: torch.Tensor) -> Plan:
        if self.p["official"]:
            return official_round(inp, keep, inp.keys())
        return merge_rounds(inp, keep, inp.keys())
