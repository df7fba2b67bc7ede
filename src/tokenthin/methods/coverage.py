"""MMTok: Multimodal Coverage Maximization for Efficient Inference of VLMs, arXiv 2508.18264 (visual-only
variant).

Algorithm: choose the tokens that best cover a reference set under a facility-location objective
f(S) = sum_j max_{i in S} sim(j, i), maximised greedily (a (1 - 1/e) approximation since f is submodular).
Here the references are the visual tokens themselves (MMTok's vision-vision term); the text term needs a prompt
and lives with the language-model hosts. Similarity follows MMTok's code: cosine, divided by a temperature and
softmax-normalised per reference (see :func:`tokenthin.ops.coverage.coverage_greedy`).

Choices left open: features are the hidden states at the site; protected tokens are kept and are not references.
"""

from __future__ import annotations

import torch

from ..ops.coverage import coverage_greedy
from .base import Method, Param, Plan, ReduceInput, keep_indices, register, uniform_keep


def _positive(v: object) -> str | None:
    return None if v is None or (isinstance(v, (int, float)) and v > 0) else "must be > 0 (or None for 0.2)"


@register
class Coverage(Method):
    name = "coverage"
    title = "MMTok: Multimodal Coverage Maximization for Efficient Inference of VLMs (visual-only)"
    arxiv = "2508.18264"
    summary = "keep the tokens that best cover all tokens (greedy facility-location maximisation)"
    kind = "prune"
    sites = ("layer", "output")
    default_site = "output"
    params = {"temperature": Param(None, "softmax temperature of the similarity (None: MMTok's 0.2)", _positive)}

    def reduce(self, inp: ReduceInput, keep: torch.Tensor) -> Plan:
        k = uniform_keep(keep, self.name)
        idx = coverage_greedy(inp.x, k, inp.candidates, temperature=self.p["temperature"])
        return keep_indices(inp, idx), None
