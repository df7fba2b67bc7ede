"""ToFu: Token Fusion: Bridging the Gap between Token Pruning and Token Merging (Kim, Gao, Hsu, Shen & Jin,
WACV 2024), arXiv 2312.01026. No official code release was found (none is linked from the paper's pages); this file
restates the method from the paper's abstract and its description of the Stable Diffusion setting.

The idea: averaging tokens is harmless where a layer responds almost linearly to interpolated inputs (its output
for the mean is the mean of its outputs) and harmful where it does not; there pruning (dropping a token, keeping the
representative as it is) is better. And a plain average of vectors that point apart is shorter than each of them
(a shift of the norm distribution the next layers never saw), so ToFu merges with MLERP, a many-token SLERP that
keeps the norm: ``mean / |mean| * max_i |x_i|`` (:mod:`tokenthin.ops.mlerp`).

Algorithm on diffusion denoisers (on top of tomesd's block-local scheme, as the paper applies it to Stable Diffusion;
per chosen block call, on the block's input tokens, an h x w grid):
1. tomesd's partition and matching (:mod:`tokenthin.methods.tomesd`): one destination per ``sy`` x ``sx`` cell at a
   seeded random offset, each source's most similar destination (cosine on the block's input), the ``r =
   int(N * ratio)`` best-matched sources are reduced;
2. fusion by depth: in the blocks before ``prune_after`` (a fraction of the denoiser's blocks in running order: the
   down path of a UNet at 0.5, where features are close to linear in their inputs) the sources are merged into
   their destination with MLERP (``merge_op="mlerp"``; ``"mean"``: tomesd's average); in the later blocks (the up
   path) they are pruned: the destination keeps its own value;
3. the chosen parts compute on the reduced tokens and are unmerged as in tomesd: every reduced source receives its
   destination's output (a pruned token is dropped from the computation, not from the output grid).

Deviations / choices left open by the paper (stated, since there is no official code to follow):
* The merge-or-prune rule per block is the fraction ``prune_after`` of the block order (default 0.5); the paper
  decides by the model's linearity per layer, which this file does not measure.
* MLERP's norm is the largest norm among the merged tokens, and the direction their size-weighted mean (every
  token has size 1 inside a block); kept tokens that receive nothing are copied bit for bit.
* Everything else (seeded offsets per sample and step, float32 matching, raster order) is tomesd's here, see
  :mod:`tokenthin.methods.tomesd`.
"""

from __future__ import annotations

import torch

from ..ops import assign, mlerp
from ..ops.assign import Assignment
from .base import Param, register
from .tomesd import ToMeSD


def _fraction(v: object) -> str | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1
    return None if ok else "must be in [0, 1] (0: prune in every block; 1: merge in every block)"


def _op(v: object) -> str | None:
    return None if v in ("mlerp", "mean") else "must be 'mlerp' (norm-preserving) or 'mean' (tomesd's average)"


@register
class ToFu(ToMeSD):
    name = "tofu"
    title = "Token Fusion: Bridging the Gap between Token Pruning and Token Merging"
    arxiv = "2312.01026"
    summary = "tomesd's matching; MLERP merging in early blocks, pruning in late blocks; unmerge after"
    params = {
        **ToMeSD.params,
        "prune_after": Param(0.5, "blocks from this fraction of the block order on prune, not merge", _fraction),
        "merge_op": Param("mlerp", "how merging blocks merge: mlerp (norm-preserving) or mean", _op),
    }

    def prunes(self, layer: int, num_layers: int) -> bool:
        """Whether block ``layer`` (of ``num_layers``, in running order) prunes rather than merges."""
        return layer >= self.p["prune_after"] * num_layers

    def block_merge(self, x: torch.Tensor, a: Assignment, layer: int, num_layers: int) -> torch.Tensor:
        if self.prunes(layer, num_layers):
            return assign.rows(x, a.slot_src)  # every slot is its kept token; reduced sources are left out
        ones = torch.ones(x.shape[:2], dtype=torch.float32, device=x.device)
        op = mlerp.merge if self.p["merge_op"] == "mlerp" else assign.merge
        return op(x, ones, a)[0]
