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

from ..ops.matching import match
from .base import Method, Plan, ReduceInput, register


def merge_rounds(inp: ReduceInput, keep: torch.Tensor, metric: torch.Tensor) -> Plan:
    """Bipartite matching repeated until each sample keeps ``keep`` candidates; one combined plan."""
    cand = inp.candidates
    r_left = inp.counts - keep
    r_max = int(r_left.max())
    if r_max <= int(inp.counts.min()) // 2:  # one round suffices
        return match(metric, r_max if r_max == int(r_left.min()) else r_left, cand)
    # several rounds: compose the partial assignments into one keep/target pair on the original tokens
    b, n = cand.shape
    owner = torch.arange(n, device=cand.device).expand(b, n).clone()  # token -> its representative token
    alive = torch.ones_like(cand)
    while int(r_left.max()) > 0:
        cur = alive & inp.valid
        cur_cand = cur & cand
        r_now = torch.minimum(r_left, cur_cand.sum(1) // 2)
        if int(r_now.max()) == 0:
            break
        big = torch.where(cur.unsqueeze(-1), metric, torch.zeros_like(metric))
        order = torch.argsort((~cur).long(), dim=1, stable=True)  # alive tokens first, original order
        packed = big.gather(1, order.unsqueeze(-1).expand_as(big))
        keep_p, target_p = match(packed, r_now, cur_cand.gather(1, order))
        gone = ~keep_p & cur.gather(1, order)
        to = order.gather(1, target_p.clamp(min=0))
        alive.scatter_(1, order, keep_p & cur.gather(1, order))
        merged_into = torch.where(gone, to, order)
        owner_map = torch.arange(n, device=cand.device).expand(b, n).clone()
        owner_map.scatter_(1, order, merged_into)
        owner = owner_map.gather(1, owner)
        r_left = r_left - r_now
    keep_mask = alive
    target = torch.where(keep_mask, torch.full_like(owner, -1), owner)
    return keep_mask, target


@register
class ToMe(Method):
    name = "tome"
    title = "Token Merging: Your ViT But Faster"
    arxiv = "2210.09461"
    summary = "bipartite soft matching on keys; merge r tokens per layer with proportional attention"
    kind = "merge"
    sites = ("layers", "layer", "output")
    default_site = "layers"
    signals = frozenset({"keys"})

    def reduce(self, inp: ReduceInput, keep: torch.Tensor) -> Plan:
        return merge_rounds(inp, keep, inp.keys())
