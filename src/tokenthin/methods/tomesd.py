"""ToMeSD: Token Merging for Fast Stable Diffusion (Bolya & Hoffman, CVPR-W 2023), arXiv 2303.17604.
Official code: github.com/dbolya/tomesd (``tomesd/merge.py``: ``bipartite_soft_matching_random2d``;
``tomesd/patch.py``: ``compute_merge`` and the patched ``BasicTransformerBlock``).

Algorithm (per chosen block call, on the block's input tokens x, an h x w grid):
1. destinations: one token per ``sy`` x ``sx`` cell of the grid (the top-left cells that fit whole; rows and
   columns beyond the last whole cell are all sources), at a random offset in each cell when ``use_rand``, else
   the cell's top-left token; sources: every other token;
2. cosine similarity of each source to each destination on x; each source's best destination;
3. the ``r = int(N * ratio)`` sources with the strongest best edge (at most every source) merge into their best
   destination: the destination becomes the unweighted mean of itself and its sources (tomesd's
   ``scatter_reduce(mean)`` including the destination);
4. the chosen parts (self-attention by default; ``merge_crossattn``, ``merge_mlp``) run on the merged tokens and
   their outputs are unmerged: every source gets its destination's value;
5. blocks with ``2 ** level <= max_downsample`` are chosen (level 0: the finest resolution carrying tokens).
No proportional attention (tomesd uses none).

Deviations from the official code (each leaves the fp32 selection and outputs of a given offset draw unchanged):
* Random offsets are drawn per sample from a generator seeded by (``seed``, that sample's timestep value, the
  block's grid), not from a fork of the global RNG advanced once per block: a sample gets the same offsets in
  whatever batch it runs (classifier-free guidance's cond + uncond batch equals separate runs, batch == singles),
  and runs are reproducible. Every block at the same grid and step shares its draw (official: a new draw per
  block). The official code also switches randomness off for odd batch sizes (a CFG heuristic); here the batch
  never matters, so ``use_rand`` means the same at any batch size.
* Similarities and the ordering of edges are computed in at least float32 (official: the model's dtype), with a
  stable sort (ties: the earlier token in raster order first).
* Kept tokens stay in raster order while merged (official: unmerged sources by edge strength, then the
  destinations); self-attention, cross-attention and the MLP are order-equivariant, so outputs agree to rounding.
* A grid smaller than one cell has no destinations and is not merged (official: an error).
* ``level`` counts from the finest token-carrying resolution, which on SDXL / UNet2DModel is below the latent's:
  there ``max_downsample=1`` merges in the first attention level (official tomesd: nothing, or, via the latent's
  downsampling, only with ``max_downsample=2``).
"""

from __future__ import annotations

import struct

import torch

from ..errors import TokenThinError
from ..ops import assign
from .base import Method, Param, Plan, ReduceInput, register, uniform_keep


def _ratio(v: object) -> str | None:
    ok = v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1)
    return None if ok else "must be a fraction in [0, 1) (the share of each block's tokens merged away)"


def _pow2(v: object) -> str | None:
    ok = isinstance(v, int) and not isinstance(v, bool) and v >= 1 and v & (v - 1) == 0
    return None if ok else "must be 1, 2, 4 or 8 (a power of two: the most downsampling a merged block may have)"


def _pos(v: object) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else "must be a positive int"


def _flag(v: object) -> str | None:
    return None if isinstance(v, bool) else "must be True or False"


def _int(v: object) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) else "must be an int"


def step_seed(seed: int, step: float, grid: tuple[int, int]) -> int:
    """A 63-bit seed from (seed, a timestep value's exact float64 bits, the grid): the same for the same sample."""
    bits = struct.unpack("<q", struct.pack("<d", float(step)))[0]
    s = (seed * 0x9E3779B97F4A7C15 + bits * 0xBF58476D1CE4E5B9 + grid[0] * 1000003 + grid[1]) % (2**63 - 1)
    return s


def destinations(inp: ReduceInput, sy: int, sx: int, use_rand: bool, seed: int) -> torch.Tensor:
    """(B, h, w) bool: the destination tokens of each sample (one per whole sy x sx cell)."""
    b = inp.x.shape[0]
    h, w = inp.grid
    hs, ws = h // sy, w // sx
    off = torch.zeros(b, hs, ws, dtype=torch.long)
    if use_rand:
        if inp.step is None:
            raise TokenThinError("'tomesd' needs the denoiser's timestep to seed its offsets (use_rand=False: none)")
        draws: dict[int, torch.Tensor] = {}
        for i, t in enumerate(inp.step.tolist()):
            s = step_seed(seed, t, (h, w))
            if s not in draws:
                draws[s] = torch.randint(sy * sx, (hs, ws), generator=torch.Generator().manual_seed(s))
            off[i] = draws[s]
    off = off.to(inp.x.device)
    rows = torch.arange(hs, device=off.device).view(1, hs, 1) * sy + off // sx
    cols = torch.arange(ws, device=off.device).view(1, 1, ws) * sx + off % sx
    dst = torch.zeros(b, h, w, dtype=torch.bool, device=off.device)
    flat = (rows * w + cols).reshape(b, -1)
    return dst.view(b, -1).scatter_(1, flat, True).view(b, h, w)


@register
class ToMeSD(Method):
    name = "tomesd"
    title = "Token Merging for Fast Stable Diffusion"
    arxiv = "2303.17604"
    summary = "merge each block's tokens into one destination per 2x2 cell (random offset), unmerge after"
    kind = "merge"
    sites = ("block",)
    default_site = "block"
    signals = frozenset({"keys"})
    runtimes = frozenset({"denoiser"})
    params = {
        "ratio": Param(None, "fraction of each block's tokens merged away (default 0.5, or 1 - keep=)", _ratio),
        "max_downsample": Param(1, "merge in blocks with 2**level <= this (1, 2, 4, 8)", _pow2),
        "sx": Param(2, "destination cell width (tokens)", _pos),
        "sy": Param(2, "destination cell height (tokens)", _pos),
        "use_rand": Param(True, "random destination offset per cell (seeded per sample and step)", _flag),
        "merge_attn": Param(True, "self-attention on merged tokens", _flag),
        "merge_crossattn": Param(False, "cross-attention queries merged", _flag),
        "merge_mlp": Param(False, "feed-forward on merged tokens", _flag),
        "seed": Param(0, "seed of the random offsets", _int),
    }

    def reduce(self, inp: ReduceInput, keep: torch.Tensor) -> Plan:
        b, n, _ = inp.x.shape
        h, w = inp.grid
        if inp.num_protected or h * w != n:
            raise TokenThinError(f"'tomesd' needs one {h} x {w} token grid per sample, got {n} tokens")
        p = self.p
        sy, sx = p["sy"], p["sx"]
        if h < sy or w < sx:  # no whole cell: nothing to merge into
            return torch.ones(b, n, dtype=torch.bool, device=inp.x.device), None
        dst = destinations(inp, sy, sx, p["use_rand"], p["seed"]).view(b, n)
        nd = (h // sy) * (w // sx)
        order = torch.argsort((~dst).to(torch.int8), dim=1, stable=True)  # destinations | sources, raster order
        d_idx, s_idx = order[:, :nd], order[:, nd:]
        r = min(n - uniform_keep(keep, self.name), n - nd)
        metric = inp.keys()
        acc = torch.promote_types(metric.dtype, torch.float32)
        a, d = (
            assign.rows(metric, s_idx).to(acc),
            assign.rows(metric, d_idx).to(acc),
        )  # whole-row copies, then normalised
        a, d = a.div_(a.norm(dim=-1, keepdim=True)), d.div_(d.norm(dim=-1, keepdim=True))
        best, best_j = torch.bmm(a, d.transpose(1, 2)).max(dim=-1)  # each source's strongest destination
        edge = torch.argsort(best, dim=1, descending=True, stable=True)[:, :r]  # the r merged sources
        merged = s_idx.gather(1, edge)
        into = d_idx.gather(1, best_j.gather(1, edge))
        keep_mask = torch.ones(b, n, dtype=torch.bool, device=inp.x.device)
        keep_mask.scatter_(1, merged, False)
        target = torch.full((b, n), -1, dtype=torch.long, device=inp.x.device)
        target.scatter_(1, merged, into)
        return keep_mask, target
