"""Baseline: keep a random subset of the patch tokens.

Choice: the subset is drawn from ``seed`` once per call and is the same for every sample of the call, so that a
sample's result does not depend on what else is in its batch (batch == per-sample). It is a random pattern that
knows nothing of the image, which is what the baseline is for. The keys come from a counter-based integer hash of
(seed, token position) (:func:`hash_keys`) rather than a ``torch.Generator``: the same on every device, and
traceable by ``torch.compile`` (a generator is an opaque object a trace cannot create).
"""

from __future__ import annotations

import torch

from ..ops.select import topk_by_score
from .base import Method, Param, Plan, ReduceInput, keep_indices, register, uniform_keep

_MASK = 0xFFFFFFFF


def _mix(x):  # torch.Tensor (int64) or int
    """A 32-bit integer hash (two multiply-xorshift rounds, constant 0x45d9f3b), on int64 tensors or Python ints;
    every product stays below 2**59, so nothing overflows and every device computes the same bits."""
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK
    return (x >> 16) ^ x


def hash_keys(n: int, seed: int, device: torch.device | None = None) -> torch.Tensor:
    """(n,) float64 keys in [0, 1), a fixed pseudo-random function of (seed, position)."""
    s = _mix((seed + 0x6A09E667) & _MASK)  # the seed's own hash, in Python ints: a constant in a trace
    pos = torch.arange(n, device=device, dtype=torch.int64)
    return _mix((pos * 0x9E3779B1 + s) & _MASK).double() / 2.0**32


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

    def reduce(self, inp: ReduceInput, keep: torch.Tensor | int) -> Plan:
        k = uniform_keep(keep, self.name)
        keys = hash_keys(inp.x.shape[1], self.p["seed"], inp.x.device)
        return keep_indices(inp, topk_by_score(keys.expand_as(inp.valid), k, inp.candidates)), None
