"""Baseline: average pooling of the patch grid to a smaller grid.

Patches are grouped into the non-overlapping bins of an out_h x out_w grid that keeps the image's aspect ratio and
has at most ``keep`` cells (:func:`tokenthin.ops.grid.grid_shape_for_keep`); each bin becomes one token, the
size-weighted mean of its patches, standing for all of them (so unmerge restores a piecewise-constant grid).
Protected tokens pass through. Acts on the full grid only (before any other reduction).
"""

from __future__ import annotations

import torch

from ..errors import SiteError
from ..ops.grid import grid_pool_map, grid_shape_for_keep
from .base import Method, Plan, ReduceInput, register, uniform_keep


@register
class Pool(Method):
    name = "pool"
    title = "Baseline: grid average pooling"
    summary = "average-pool the patch grid to about `keep` cells"
    kind = "prune"
    sites = ("layer", "output", "block")
    default_site = "output"

    def output_count(self, keep: int, inp: ReduceInput) -> int:
        oh, ow = grid_shape_for_keep(inp.grid[0], inp.grid[1], keep)  # whole cells: at most ``keep``
        return oh * ow

    def reduce(self, inp: ReduceInput, keep: torch.Tensor | int) -> Plan:
        if not inp.pristine:
            raise SiteError("'pool' needs the full patch grid; apply it at the first reduction point only")
        k = uniform_keep(keep, self.name)
        h, w = inp.grid
        if h * w != inp.x.shape[1] - inp.num_protected:
            raise SiteError(
                f"'pool' needs one patch grid per sample, but the {inp.x.shape[1] - inp.num_protected} tokens here "
                f"are not a {h} x {w} grid (several images, or AnyRes views as in LLaVA-NeXT); use another method"
            )
        oh, ow = grid_shape_for_keep(h, w, k)
        cell = grid_pool_map(h, w, oh, ow, device=inp.x.device)  # (h*w,)
        P = inp.num_protected
        n = inp.x.shape[1]
        first = torch.full((oh * ow,), h * w, dtype=torch.long, device=cell.device)
        first.scatter_reduce_(0, cell, torch.arange(h * w, device=cell.device), reduce="amin")
        rep = first[cell] + P  # representative (first patch in raster order) of each patch's cell
        keep_mask = torch.zeros(n, dtype=torch.bool, device=cell.device)
        keep_mask[:P] = True
        keep_mask[first + P] = True
        target = torch.full((n,), -1, dtype=torch.long, device=cell.device)
        target[P:] = rep
        b = inp.x.shape[0]
        return keep_mask.expand(b, n).clone(), target.expand(b, n).clone()
