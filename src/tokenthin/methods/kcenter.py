"""Greedy k-center selection as in ToDRE, "Does Visual Token Diversity Matter? ... Token Diversity and
Task Relevance" (arXiv 2505.18757), its token-selection stage after the vision encoder.

Algorithm: farthest-first traversal (Gonzalez) on cosine distance: start from one token, then repeatedly add the
token whose distance to its nearest selected token is largest. Compared with ``divprune`` only the start differs
(see :func:`tokenthin.ops.diversity.k_center_greedy`).

Choices left open: features are the hidden states at the site; the start token is the one nearest the mean of the
candidates (our choice where the paper does not fix one); protected tokens are kept and not part of the objective.
"""

from __future__ import annotations

import torch

from ..ops.diversity import k_center_greedy
from .base import Method, Plan, ReduceInput, keep_indices, register, uniform_keep


@register
class KCenter(Method):
    name = "kcenter"
    title = "ToDRE: greedy k-center visual token selection"
    arxiv = "2505.18757"
    summary = "keep a k-center cover of the tokens (farthest-first traversal on cosine distance)"
    kind = "prune"
    sites = ("layer", "output")
    default_site = "output"

    def reduce(self, inp: ReduceInput, keep: torch.Tensor) -> Plan:
        k = uniform_keep(keep, self.name)
        return keep_indices(inp, k_center_greedy(inp.x, k, inp.candidates)), None
