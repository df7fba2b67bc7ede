"""Baseline: keep a random subset of the patch tokens.

Choice: the subset is drawn from ``seed`` once per call and is the same for every sample of the call, so that a
sample's result does not depend on what else is in its batch (batch == per-sample). It is a random pattern that
knows nothing of the image, which is what the baseline is for.
"""

from __future__ import annotations

import torch

from ..ops.select import topk_by_score
from .base import Method, Param, Plan, ReduceInput, keep_indices, register, uniform_keep


def _int(v: object) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) else "must be an int"


@register
class RandomPrune(Method):
    name = "random"
    title = "Baseline: random token pruning"
    summary = "keep a random subset of patch tokens (same positions for every sample of a call)"
    kind = "prune"
    sites = ("layer", "output", "block")
    default_site = "output"
    params = {"seed": Param(0, "random seed", _int)}

    def reduce(self, inp: ReduceInput, keep: torch.Tensor) -> Plan:
        k = uniform_keep(keep, self.name)
        g = torch.Generator().manual_seed(self.p["seed"])
        keys = torch.rand(inp.x.shape[1], generator=g).to(inp.x.device)
        return keep_indices(inp, topk_by_score(keys.expand_as(inp.valid), k, inp.candidates)), None
