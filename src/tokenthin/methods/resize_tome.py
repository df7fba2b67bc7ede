"""Resize + ToMe: a smaller input image and token merging, chosen together under one FLOPs budget. Ours.

No published training-free method chooses the input resolution and a merge schedule jointly for a pretrained ViT
(searched for this file: ToMe, arXiv 2210.09461, merges at the given resolution; resolution-adaptive works such as
APT, arXiv 2510.18091, need fine-tuning), so this is tokenthin's own combination of two things the benchmark
shows: a smaller image is the strongest baseline at low budgets on DINOv2-S (every token there is a clean,
full-resolution-trained patch), and merging keeps fine detail better than resizing at moderate budgets.

Algorithm for ``flops=t`` (per input shape, cached by the runtime; :func:`tokenthin.solver.solve_resized`):
1. among the ``downsample`` baseline's sizes (bilinear, antialiased, aspect ratio kept; position embeddings
   interpolated by the host) that cost at least ``t`` unreduced, take the largest image on which ToMe's merge
   schedule for ``t`` (:func:`tokenthin.solver.solve`, default rule ``smooth``) still keeps at least ``min_keep``
   of the image's patches after the last merge;
2. resize the image to it and merge after every layer with ToMe (:mod:`tokenthin.methods.tome`: bipartite matching
   on the layer's keys, proportional attention) by that schedule;
3. with ``unmerge=True`` every original patch maps to the small-grid token covering it, then through the merges.

Choices, measured on the real DINOv2-S (``benchmarks/bench_solver.py``: the bench's 16 images at 224 px; [CLS]
cosine / saliency r):
* ``min_keep`` 0.2 (default): at 50% and 75% FLOPs merging alone keeps enough (54 of 256, 144 of 256 tokens), so
  nothing is resized: 0.979 / 0.959 and 0.997 / 0.992 (any resize there scored lower: 0.955-0.972 at 50%,
  0.973-0.975 at 75%); at 25% the image becomes 11x11 patches and merging takes it to 32 tokens: 0.913 / 0.783,
  against 0.902 / 0.850 for ``downsample`` and 0.637 / -0.002 for ToMe before the solver fix. ``min_keep`` 0.35
  gives 0.931 / 0.809 at 25% (10x10 patches) but also resizes at 50%, where that loses.
* Saliency after unmerge stays below ``downsample``'s at 25%: merged tokens unmerge to blocks of irregular shape.
* ``tokenthin.calibrate(model, "resize-tome", flops=t, images=...)`` replaces step 1's fixed rule by a joint search on
  calibration images: every candidate size with its merge schedule, and plain downsampling, scored by fidelity
  (:mod:`tokenthin.calibration`); ``apply(model, "resize-tome", schedule=...)`` reuses the size share and the ``r``.
  On the real DINOv2-S at 25% it picks 10x10 patches merged to 43 tokens: 0.931 / 0.809 on the evaluation images;
  at 50% and 75% the full size (README, issue 10 figures).
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
    return None if ok else "must be a number in [0, 1] (0: no resize, merging only; 1: resizing only, no merging)"


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
        "min_keep": Param(0.2, "share of the (resized) input's patches merging keeps to the end", _share),
    }

    def input_size(self, height: int, width: int, patch: int, keep: float) -> tuple[int, int]:
        return scaled_size(height, width, patch, keep)

    def reduce(self, inp: ReduceInput, keep: torch.Tensor | int) -> Plan:
        return merge_rounds(inp, keep, inp.keys())
