"""PiToMe's energy score (Tran et al., NeurIPS 2024, arXiv 2405.16148): how crowded a token's neighbourhood is.

Tokens are nodes of a complete graph weighted by cosine similarity. A token's energy is the mean over all nodes j
(itself included) of ``f(cos(x_i, x_j))`` with ``f(s) = ELU(s - margin, alpha)``: similarities above the margin
count linearly, those below contribute a bounded negative amount (at most ``-alpha``). Tokens inside large clusters
of similar tokens (background) get high energy and are merged first; isolated tokens get low energy and are kept.

The paper's Eq. 4 writes the positive branch as ``s`` instead of ``s - margin``; the official code (and this
function) uses ``torch.nn.functional.elu(s - margin, alpha)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.similarity import cosine

_SLAB = 1 << 18  # floats per slab of the symmetrised matrix (1 MB)


def energy(
    metric: torch.Tensor,
    margin: float | torch.Tensor,
    alpha: float = 1.0,
    candidates: torch.Tensor | None = None,
) -> torch.Tensor:
    """Energy score per token: (B, N, C) -> (B, N), float32.

    ``margin`` is a float or a (B,) tensor. ``candidates`` (B, N) bool restricts the graph to the tokens that may
    be merged: other tokens (protected [CLS]/registers, padding) neither count in anyone's mean nor get a score
    (theirs is ``-inf``, so they sort last). A sample without candidates gets ``-inf`` everywhere.
    """
    sim = cosine(metric)  # (B, N, N) float32
    b, n, _ = sim.shape
    m = torch.as_tensor(margin, dtype=sim.dtype, device=sim.device).reshape(-1, 1, 1)
    f = F.elu(sim.sub_(m), alpha=alpha, inplace=True)  # in place: the same values as elu(sim - m), one N x N buffer
    self_term = F.elu(1.0 - m.reshape(-1, 1), alpha=alpha).expand(b, 1)  # f(cos(x_i, x_i)) = f(1), exactly
    cols = None if candidates is None else candidates.unsqueeze(1).to(f.dtype)  # (B, 1, N)
    e = torch.empty(b, n, dtype=f.dtype, device=f.device)
    rows = max(1, _SLAB // max(b * n, 1))
    for s in range(0, n, rows):
        # rows s: of the symmetrised f, (f + f^T) / 2: exactly symmetric (vectorised kernels round by memory
        # position, and structural ties, e.g. the last two tokens of a multi-round merge, must stay ties so that
        # batched and single runs agree), built one slab of rows at a time instead of as a second N x N tensor
        g = f[:, s : s + rows] + f[:, :, s : s + rows].transpose(-1, -2)
        g.div_(2)
        r = g.shape[1]
        g.diagonal(offset=s, dim1=-2, dim2=-1).copy_(self_term.expand(b, r))
        e[:, s : s + r] = g.mean(-1) if cols is None else (g * cols).sum(-1)
    if cols is None:
        return e
    e = e / cols.sum(-1).clamp_min(1.0)
    return e.masked_fill(~candidates, -torch.inf)
