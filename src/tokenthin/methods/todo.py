"""ToDo: Token Downsampling for Efficient Generation of High-Resolution Images (Smith, Saxena & Saha, IJCAI 2024),
arXiv 2402.13573. Official code: github.com/ethansmith2000/ImprovedTokenMerge (``merge.py``: ``compute_merge``,
``up_or_downsample`` and ``TokenMergeAttentionProcessor``; ``utils.py``: ``patch_attention_proc`` and its defaults).

Algorithm (per chosen block call; the block's self-attention input is an h x w grid of tokens):
1. the queries are computed from every token, as without ToDo;
2. the keys and values are computed from the grid downsampled by ``downsample_factor`` f to
   ``(h // f) x (w // f)`` tokens: ``F.interpolate(grid, size=(h // f, w // f), mode=downsample_method)``
   (``"nearest-exact"``, the official default: the token at ``floor((i + 0.5) * h / (h // f))``, i.e. the
   bottom-right token of each 2 x 2 cell at f = 2; ``"nearest"``: ``floor(i * h / (h // f))``, the top-left one,
   the official demo's choice) or ``F.avg_pool2d(grid, f, f)`` (``"avg_pool"``: the mean of each whole f x f cell,
   rows and columns beyond the last whole cell unused);
3. attention runs with all queries against the fewer keys / values; nothing is unmerged;
4. blocks with ``2 ** level <= max_downsample`` are chosen (official: the first level only by default).
The budget is the factor: each chosen block's attention reads ``1 / f**2`` of the keys (``block_ratio``); ``ratio=``
and ``keep=`` do not apply. A nearest downsampling is a selection and the pooling is a merge by mean over a
partition, so both are assignments (:mod:`tokenthin.ops.assign`) applied to the key / value projections' input
(block mode ``"kv"``); the grid the queries see is untouched.

Deviations from the official code:
* Bilinear / bicubic / max-pool downsampling (accepted by the official ``up_or_downsample``) are not one-token-per-
  slot assignments and are refused; so is ``"area"`` (equal to ``"avg_pool"`` on divisible grids: use that).
* The official ``timestep_threshold_switch`` (default 0.2: below ``t / 1000 = 0.2`` switch to the secondary merge
  method, tomesd-style similarity merging of the keys) is not implemented: ToDo here always downsamples, as the
  official demo (both thresholds 0). ``timestep_threshold_stop`` (no downsampling once ``t / 1000 <= stop``) is
  implemented per sample; its default is None (never stop) instead of the official 0.0, because a denoiser's
  timestep need not lie in [0, 1000) (a consistency model's ``250 log sigma`` is negative below sigma 1). A batch
  whose samples disagree is refused (attention cannot take different key counts per sample without a mask).
* One factor for every chosen level (official: ``downsample_factor`` at the first level and
  ``downsample_factor_level_2``, default 1, at the second; use ``max_downsample=2`` for the same factor at both).
* Levels come from the host (the block's resolution), not from the channel width (official: 320 -> level 1,
  640 -> level 2, SD 1.x only); ``UNet2DModel`` attention blocks are supported too (official: only
  ``BasicTransformerBlock.attn1`` of ``UNet2DConditionModel``).
* The grid is the host's exact grid per block (official: ``original_h // ceil(sqrt(N0 / N))``), equal on even sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import TokenThinError
from .base import Method, Param, Plan, ReduceInput, register

MODES = ("nearest-exact", "nearest", "avg_pool")


def _factor(v: object) -> str | None:
    ok = isinstance(v, int) and not isinstance(v, bool) and v >= 1
    return None if ok else "must be an int >= 1 (1: no downsampling; 2: a quarter of the keys; 3: a ninth)"


def _pow2(v: object) -> str | None:
    ok = isinstance(v, int) and not isinstance(v, bool) and v >= 1 and v & (v - 1) == 0
    return None if ok else "must be 1, 2, 4 or 8 (a power of two: the most downsampling a reduced block may have)"


def _mode(v: object) -> str | None:
    if v in MODES:
        return None
    return (
        f"must be one of {', '.join(MODES)} (bilinear, bicubic, area and max_pool are weighted or per-channel "
        "combinations, not token assignments)"
    )


def _stop(v: object) -> str | None:
    ok = v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
    return None if ok else "must be None (never stop) or a number (stop once timestep / 1000 <= it)"


def nearest_index(size: int, out: int, mode: str) -> torch.Tensor:
    """The source index F.interpolate's ``nearest`` / ``nearest-exact`` picks for each of ``out`` outputs."""
    grid = torch.arange(size, dtype=torch.float64).view(1, 1, size)
    return F.interpolate(grid, size=out, mode=mode).view(out).long()


def downsample_plan(b: int, h: int, w: int, f: int, mode: str, device: torch.device) -> Plan:
    """The assignment of an h x w grid downsampled by f: (keep (B, N), target (B, N) or None)."""
    nh, nw = h // f, w // f
    n = h * w
    keep = torch.zeros(n, dtype=torch.bool)
    if mode == "avg_pool":
        rows = torch.arange(nh * f).view(nh, f, 1, 1)
        cols = torch.arange(nw * f).view(1, 1, nw, f)
        pos = (rows * w + cols).permute(0, 2, 1, 3).reshape(nh * nw, f * f)  # each cell's tokens, row-major
        rep = pos[:, 0]  # the cell's top-left token holds its slot
        keep[rep] = True
        target = torch.full((n,), -1, dtype=torch.long)
        target[pos.reshape(-1)] = rep.repeat_interleave(f * f)
        target[rep] = -1
        return keep.to(device).expand(b, n).clone(), target.to(device).expand(b, n).clone()
    ri, ci = nearest_index(h, nh, mode), nearest_index(w, nw, mode)
    keep[(ri.view(-1, 1) * w + ci.view(1, -1)).reshape(-1)] = True
    return keep.to(device).expand(b, n).clone(), None


@register
class ToDo(Method):
    name = "todo"
    title = "ToDo: Token Downsampling for Efficient Generation of High-Resolution Images"
    arxiv = "2402.13573"
    summary = "self-attention keys / values from the grid downsampled by a factor; all queries kept, no unmerge"
    kind = "merge"
    sites = ("block",)
    default_site = "block"
    signals = frozenset({"keys"})
    runtimes = frozenset({"denoiser"})
    block_mode = "kv"
    params = {
        "downsample_factor": Param(2, "keys / values from the grid downsampled by this factor per side", _factor),
        "downsample_method": Param("nearest-exact", "nearest-exact, nearest or avg_pool", _mode),
        "max_downsample": Param(1, "reduce in blocks with 2**level <= this (1, 2, 4, 8)", _pow2),
        "timestep_threshold_stop": Param(None, "no downsampling for samples with timestep / 1000 <= this", _stop),
    }

    def block_ratio(self) -> float:
        f = self.p["downsample_factor"]
        return 1.0 - 1.0 / (f * f)

    def reduce(self, inp: ReduceInput, keep: torch.Tensor) -> Plan:
        b, n, _ = inp.x.shape
        h, w = inp.grid
        if h * w != n:
            raise TokenThinError(f"'todo' needs one {h} x {w} token grid per sample, got {n} tokens")
        f, dev = self.p["downsample_factor"], inp.x.device
        if f == 1 or h < f or w < f:
            return torch.ones(b, n, dtype=torch.bool, device=dev), None
        keep_mask, target = downsample_plan(b, h, w, f, self.p["downsample_method"], dev)
        stop = self.p["timestep_threshold_stop"]
        if stop is not None:
            if inp.step is None:
                raise TokenThinError("'todo' with timestep_threshold_stop needs the denoiser's timestep")
            off = (inp.step / 1000 <= stop).to(dev)  # these samples attend to every key
            keep_mask = keep_mask | off.unsqueeze(1)
        return keep_mask, target
