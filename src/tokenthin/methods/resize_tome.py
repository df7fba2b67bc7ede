"""Resize + ToMe: a smaller input image and token merging, chosen together under one FLOPs budget. Ours.

No published training-free method chooses the input resolution and a merge schedule jointly for a pretrained ViT
(searched for this file: ToMe, arXiv 2210.09461, merges at the given resolution; resolution-adaptive works such as
APT, arXiv 2510.18091, need fine-tuning), so this is tokenthin's own combination of two things the benchmark
shows: a smaller image is the strongest baseline at low budgets on DINOv2-S (every token there is a clean,
full-resolution-trained patch), and merging keeps fine detail better than resizing at moderate budgets.

Algorithm, for ``flops=t`` (solved for each input shape, cached by the runtime):
1. resize the image (bilinear, antialiased, aspect ratio kept, the ``downsample`` baseline's sizes) to the size
   whose unreduced encoder costs about ``t ** input_share`` of the FLOPs, never below ``t``;
2. on the smaller image's patches, merge after every layer with ToMe (:mod:`tokenthin.methods.tome`: bipartite
   matching on the layer's keys, proportional attention), the schedule solved for the remaining budget by
   :func:`tokenthin.solver.solve` with its default rule (``hold``: the largest token count the last layers keep);
3. with ``unmerge=True`` every original patch maps to the small-grid token covering it, then through the merges.

Choices (each measured on the real DINOv2-S, ``benchmarks/bench_solver.py``, see the README's "Budgets and sites"):
* ``input_share`` 0.5 (default): half the budget, in log space, to the resolution; MEASUREMENTS-PENDING
* ``r=`` (no FLOPs target) merges at the given resolution, exactly as ``tome``; ``flops=1.0`` resizes nothing and
  merges nothing.
* Hosts without site ``input`` (text, audio, inside a vision-language model) refuse it: use ``tome`` there.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Method, Param, Plan, ReduceInput, register
from .downsample import scaled_size
from .tome import merge_rounds


def _share(v: Any) -> str | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0
    return None if ok else "must be a number in [0, 1] (0: resizing only, 0.5: merging wherever it can)"


@register
class ResizeToMe(Method):
    name = "resize-tome"
    title = "Resize + ToMe: input resolution and token merging under one FLOPs budget (ours)"
    summary = "a smaller image and ToMe merging, the FLOPs budget split between them (flops=)"
    kind = "merge"
    sites = ("layers",)
    default_site = "layers"
    signals = frozenset({"keys"})
    resizes_input = True
    params = {
        "max_merge": Param(0.15, "largest share of a layer's tokens one merge takes before the image shrinks", _share),
    }

    def input_size(self, height: int, width: int, patch: int, keep: float) -> tuple[int, int]:
        return scaled_size(height, width, patch, keep)

    def reduce(self, inp: ReduceInput, keep: torch.Tensor | int) -> Plan:
        return merge_rounds(inp, keep, inp.keys())
