"""PiToMe's energy score (Tran et al., NeurIPS 2024, arXiv 2405.16148): how crowded a token's neighbourhood is.

Tokens are nodes of a complete graph weighted by cosine similarity. A token's energy is the mean over all nodes j
(itself included) of ``f(cos(x_i, x_j))`` with ``f(s) = ELU(s - margin, alpha)``: similarities above the margin
count linearly, those below contribute a bounded negative amount (at most ``-alpha``). Tokens inside large clusters
of similar tokens (background) get high energy and are merged first; isolated tokens get low energy and are kept.

The paper's Eq. 4 writes the positive branch as ``s`` instead of ``s - margin``; the official code (and this
function) uses ``torch.nn.functional.elu(s - margin, alpha)``.

Computation (not the official code's, which takes the ELU of the whole N x N matrix): the graph is symmetric, so
the ELU (the costly part on CPU: an ``expm1`` per value) is taken of its upper triangle only, one slab of rows at a
time, in place in the cosine matrix, and mirrored into the lower triangle; each diagonal block is symmetrised as
``(f + f^T) / 2``. Every pair therefore gets one value, exactly symmetric by construction (structural ties, e.g. the
last two tokens of a multi-round merge, stay ties, so batched and single runs agree), and every row is then summed
in token order. Where the matrix product is itself exactly symmetric (it is with the CPU BLAS measured here) the
values equal those of the full matrix symmetrised, ``(f + f^T) / 2``, bit for bit; elsewhere they differ by rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.similarity import normalize

_SLAB = 1 << 18  # floats per slab of rows (1 MB)
# Elementwise CPU kernels run whole vectors and finish a row's last few values with the scalar function (std::expm1
# and SLEEF's vector expm1 can differ in the last bit): every row part the ELU is taken of is a multiple of this
# many values, so every value takes the vector path wherever it sits (a batched and a single run agree bitwise)
_LANES = 64


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
    u = normalize(metric)  # (B, N, C) float32
    b, n, c = u.shape
    w = -(-n // _LANES) * _LANES  # row stride of the matrix: every row part the ELU sees is a whole number of lanes
    pad = u if w == n else torch.cat([u, u.new_zeros(b, w - n, c)], 1)
    f = u @ pad.transpose(-1, -2)  # (B, N, w) cosine similarities; columns n: are zero padding
    m = torch.as_tensor(margin, dtype=f.dtype, device=f.device).reshape(-1, 1, 1)
    self_term = F.elu(1.0 - m.reshape(-1, 1), alpha=alpha).expand(b, 1)  # f(cos(x_i, x_i)) = f(1), exactly
    cols = None if candidates is None else candidates.unsqueeze(1).to(f.dtype)  # (B, 1, N)
    e = torch.empty(b, n, dtype=f.dtype, device=f.device)
    rows = max(_LANES, _SLAB // max(b * w, 1) // _LANES * _LANES)
    for s in range(0, n, rows):
        t = min(s + rows, n)
        g = f[:, s:t, s:]  # rows s:t from column s on: the diagonal block and the upper triangle right of it
        F.elu(g.sub_(m), alpha=alpha, inplace=True)  # the same values as elu(sim - m), on this part only
        d = g[:, :, : t - s]
        d.copy_((d + d.transpose(-1, -2)).div_(2))  # the diagonal block, exactly symmetric
        d.diagonal(dim1=-2, dim2=-1).copy_(self_term.expand(b, t - s))
        f[:, t:, s:t] = g[:, :, t - s : n - s].transpose(-1, -2)  # mirrored below the diagonal
        row = f[:, s:t, :n]  # complete now (its columns left of s were mirrored from the earlier slabs), last read
        e[:, s:t] = row.mean(-1) if cols is None else row.mul_(cols).sum(-1)
    if cols is None:
        return e
    e = e / cols.sum(-1).clamp_min(1.0)
    return e.masked_fill(~candidates, -torch.inf)
