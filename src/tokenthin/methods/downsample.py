"""Baseline: fewer patches from a smaller image.

The image is resized (bilinear, antialiased) so that its patch grid has about ``keep`` times as many patches,
keeping the aspect ratio; the encoder then runs unmodified on the smaller input (position embeddings are
interpolated by the host). With ``unmerge`` every original patch maps to the small-grid patch covering it.
"""

from __future__ import annotations

import math

from .base import Method, register


@register
class Downsample(Method):
    name = "downsample"
    title = "Baseline: downsampled input image"
    summary = "run the encoder on a smaller image with about `keep` x the patches"
    kind = "input"
    sites = ("input",)
    default_site = "input"

    def input_size(self, height: int, width: int, patch: int, keep: float) -> tuple[int, int]:
        return scaled_size(height, width, patch, keep)


def scaled_size(height: int, width: int, patch: int, keep: float) -> tuple[int, int]:
    """The image size whose patch grid has about ``keep`` x the patches of (height, width)'s, same aspect ratio."""
    s = math.sqrt(keep)
    gh = max(1, round(height // patch * s))
    gw = max(1, round(width // patch * s))
    return gh * patch, gw * patch
