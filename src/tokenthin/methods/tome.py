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
* ``r`` larger than what a layer can merge raises an error instead of being clamped silently.
"""

from __future__ import annotations

import torch

from ..ops.matching import match, merge_in_rounds
from .base import Method, Plan, ReduceInput, register


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

    def reduce(self, inp: ReduceInput, keep: torch.Tensor) -> Plan:
        return merge_rounds(inp, keep, inp.keys())
