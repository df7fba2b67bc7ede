"""DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models (Alvar et al., CVPR 2025),
arXiv 2503.02175.

Algorithm: treat pruning as a Max-Min Diversity Problem over the tokens' features: keep the subset whose smallest
pairwise cosine distance is largest, solved greedily (start from the most isolated token, then repeatedly add the
token farthest from everything kept; see :func:`tokenthin.ops.diversity.max_min_diversity`).

Choices left open: the features are the hidden states at the site (the paper uses the visual tokens the language
model receives, i.e. the projector output; inside an encoder the closest equivalent is the layer output). Protected
tokens are kept and take no part in the diversity objective.
"""

from __future__ import annotations

import torch

from ..ops.diversity import max_min_diversity
from .base import Method, Plan, ReduceInput, keep_indices, register, uniform_keep


@register
class DivPrune(Method):
    name = "divprune"
    title = "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models"
    arxiv = "2503.02175"
    summary = "keep the most mutually diverse tokens (greedy max-min cosine distance)"
    kind = "prune"
    sites = ("layer", "output")
    default_site = "output"

    def reduce(self, inp: ReduceInput, keep: torch.Tensor) -> Plan:
        k = uniform_keep(keep, self.name)
        return keep_indices(inp, max_min_diversity(inp.x, k, inp.candidates)), None
