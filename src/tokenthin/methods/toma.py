"""ToMA: Token Merge with Attention for Diffusion Models (Lu, Zheng, Xia & Wang, ICML 2025), arXiv 2509.10918.
Official code: github.com/WenboLuu/ToMA (not readable from here: this file follows the paper's description, and
every choice below that the description leaves open is ours and said so).

Algorithm (per chosen block call, on the block's input tokens x, an h x w grid, keeping ``k = N - int(N * ratio)``):
1. locality: the grid is cut into ``tile`` x ``tile`` tiles (edge tiles smaller); tile g with n_g tokens keeps
   ``k_g = round(n_g * k / N)`` destinations (at least 1), chosen and merged within the tile;
2. destinations by submodular maximisation: in each tile, the greedy maximiser of the facility-location function
   ``F(D) = sum_i max_{j in D} s(i, j)`` with ``s = (1 + cos(x_i, x_j)) / 2`` (cosine similarity of the block's
   input tokens, shifted to be non-negative): k_g rounds, each adding the token of largest marginal gain (ties,
   within a relative 1e-9, go to the first position in the tile, row-major: two mutually nearest tokens tie
   exactly), i.e. destinations that are diverse and cover their tile;
3. merge with attention: ``A = softmax_j(cos(x_i, d_j) / tau)`` over the tile's destinations j for every token i
   (each token distributes itself over its destinations, like an attention map of tokens onto destinations);
   merged token j = ``sum_i A[j, i] x_i / sum_i A[j, i]`` (a row-normalised linear map, :mod:`tokenthin.ops.soft`);
4. the chosen parts compute on the k merged tokens; unmerge with the transpose: token i = ``sum_j A[j, i] y_j``
   (the columns of A sum to 1, so every token is a convex combination of its tile's outputs);
5. pattern reuse: with ``reuse_steps = s > 1`` a block's plan (destinations and A) is computed at one denoiser call
   and reused for the next s - 1 calls of the same block with inputs of the same shape (a cache owned by the
   runtime, emptied by ``remove()``); blocks with ``2 ** level <= max_downsample`` are chosen, as in tomesd.

Choices and deviations (vs the paper's description; the official code could not be compared):
* Similarities are cosine on the block's input hidden states (tomesd's metric), in float64 (the greedy's gains tie
  within float32 rounding; the merge weights are float32, the merged tokens at least float32); the facility-location
  similarity is shifted to [0, 1]; merge weights are computed against the tile's tokens only, so merge and unmerge
  cost O(N * tile^2 * C) as batched matrix products (no sort or scatter).
* The unmerge is A's transpose (the columns of a softmax over destinations are a partition of unity), not a
  pseudo-inverse.
* Reuse is per block across denoiser calls; the paper also shares patterns across the layers of one step, which
  is not done here (each block plans its own). With reuse a plan is reused for whatever batch of the same shape
  comes next: reuse only across the steps of one generation (the default ``reuse_steps=1`` plans every call).
* Per-sample plans do not depend on the batch (batch == singles; a CFG batch equals separate runs) unless reused.
"""

from __future__ import annotations

import math

import torch

from ..errors import TokenThinError
from ..ops.soft import SoftPlan
from .base import Method, Param, ReduceInput, register, uniform_keep
from .tomesd import _flag, _pos, _pow2, _ratio

TIE = 1e-9  # gains this close (relative) are equal: two mutually nearest tokens tie exactly in exact arithmetic


def _tau(v: object) -> str | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
    return None if ok else "must be a positive number (the softmax temperature of the merge weights)"


def tiles(h: int, w: int, t: int) -> torch.Tensor:
    """(T, t*t) token index of every position of the t x t tiles covering an h x w grid (row-major tiles), -1 off
    the grid."""
    th, tw = math.ceil(h / t), math.ceil(w / t)
    r = torch.arange(th).view(th, 1, 1, 1) * t + torch.arange(t).view(1, 1, t, 1)
    c = torch.arange(tw).view(1, tw, 1, 1) * t + torch.arange(t).view(1, 1, 1, t)
    idx = torch.where((r < h) & (c < w), r * w + c, -1)
    return idx.reshape(th * tw, t * t)


def facility_location(sim: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Greedy facility location in every tile: sim (B, T, n, n) >= 0, valid (T, n), k (T,) destinations per tile.
    Returns (B, T, m) the chosen positions in selection order (m = max k; -1 past a tile's k)."""
    b, t, n, _ = sim.shape
    m = int(k.max())
    cur = torch.zeros(b, t, n, dtype=sim.dtype, device=sim.device)
    blocked = (~valid).unsqueeze(0).expand(b, t, n).clone()
    out = torch.full((b, t, m), -1, dtype=torch.long, device=sim.device)
    for s in range(m):
        gain = (sim - cur.unsqueeze(-1)).clamp(min=0).sum(2)  # (B, T, n): marginal gain of each candidate
        gain = gain.masked_fill(blocked, -1.0)
        top = gain.amax(-1, keepdim=True)
        c = (gain >= top - TIE * top.clamp(min=1)).to(torch.int8).argmax(-1)  # (B, T): the first of the largest
        active = (s < k).unsqueeze(0).expand(b, t)
        out[..., s] = torch.where(active, c, -1)
        col = sim.gather(3, c.view(b, t, 1, 1).expand(b, t, n, 1)).squeeze(-1)  # s(i, c) for every token i
        cur = torch.where(active.unsqueeze(-1), torch.maximum(cur, col), cur)
        blocked.scatter_(2, c.unsqueeze(-1), True)  # (a finished tile's pick is never used)
    return out


@register
class ToMA(Method):
    name = "toma"
    title = "ToMA: Token Merge with Attention for Diffusion Models"
    arxiv = "2509.10918"
    summary = "facility-location destinations per tile; attention-like soft merge, transpose unmerge; pattern reuse"
    kind = "merge"
    sites = ("block",)
    default_site = "block"
    signals = frozenset({"keys"})
    runtimes = frozenset({"denoiser"})
    block_mode = "soft"
    params = {
        "ratio": Param(None, "fraction of each block's tokens merged away (default 0.5, or 1 - keep=)", _ratio),
        "max_downsample": Param(1, "merge in blocks with 2**level <= this (1, 2, 4, 8)", _pow2),
        "tile": Param(8, "side of the square tiles (tokens) destinations are chosen and merged in", _pos),
        "tau": Param(0.1, "softmax temperature of the merge weights (smaller: harder assignments)", _tau),
        "reuse_steps": Param(1, "reuse a block's plan for this many denoiser calls (1: plan every call)", _pos),
        "merge_attn": Param(True, "self-attention on merged tokens", _flag),
        "merge_crossattn": Param(False, "cross-attention queries merged", _flag),
        "merge_mlp": Param(False, "feed-forward on merged tokens", _flag),
    }

    def soft_plan(self, inp: ReduceInput, keep: torch.Tensor) -> SoftPlan:
        b, n, _ = inp.x.shape
        h, w = inp.grid
        if inp.num_protected or h * w != n:
            raise TokenThinError(f"'toma' needs one {h} x {w} token grid per sample, got {n} tokens")
        k_all = uniform_keep(keep, self.name)
        dev = inp.x.device
        tok = tiles(h, w, min(self.p["tile"], max(h, w))).to(dev)
        valid = tok >= 0
        per = valid.sum(1)
        k = torch.clamp(torch.round(per.double() * k_all / n).long(), min=1)
        k = torch.minimum(k, per)
        metric = inp.keys().to(torch.float64)  # greedy gains tie within float32 rounding: decide in float64
        metric = metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        t_, nt = tok.shape
        f = metric[:, tok.clamp(min=0).reshape(-1)].view(b, t_, nt, -1) * valid.view(1, t_, nt, 1)
        cos = f @ f.transpose(-1, -2)  # (B, T, n, n); zero at padding
        pair = (valid.unsqueeze(-1) & valid.unsqueeze(-2)).unsqueeze(0)
        dst = facility_location(((1 + cos) / 2) * pair, valid, k)  # (B, T, m)
        has = dst >= 0  # (B, T, m), the same for every sample
        logits = cos.gather(2, dst.clamp(min=0).unsqueeze(-1).expand(*dst.shape, nt)) / self.p["tau"]  # (B,T,m,n)
        logits = logits.masked_fill(~has.unsqueeze(-1), float("-inf"))
        a = torch.softmax(logits, dim=2) * valid.view(1, t_, 1, nt)  # each token over its tile's destinations
        merge_w = (a / a.sum(-1, keepdim=True).clamp(min=1e-12)).float()
        a = a.float()
        offs = torch.cumsum(k, 0) - k
        m = dst.shape[-1]
        slot = torch.where(has[0], offs.unsqueeze(1) + torch.arange(m, device=dev), -1)
        flat = has[0].reshape(-1)
        centres = torch.gather(  # the destination token of every slot, in slot order
            tok.unsqueeze(0).expand(b, -1, -1), 2, dst.clamp(min=0)
        ).reshape(b, -1)[:, flat]
        return SoftPlan(
            tok_idx=tok,
            slot=slot,
            merge_w=merge_w,
            unmerge_w=a.transpose(-1, -2),
            n_tokens=n,
            k=int(k.sum()),
            dst=centres,
        )
