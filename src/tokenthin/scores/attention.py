"""Attention-derived token scores, computed from a layer's own queries and keys.

The attention a layer paid is recomputed for the rows we need only: [CLS] -> all is one query row (O(N) per
head), so no N x N matrix is materialised and the host may keep running SDPA or any other attention kernel.
Mean attention (for models without [CLS]) needs every row; it is accumulated over cache-sized slabs of query rows,
one sample at a time, so memory stays bounded and the softmax never leaves the cache.
``bias`` is the additive key bias the layer itself saw (log-size for proportional attention, a large negative
number for padding), so the scores match the attention the model actually computed.
"""

from __future__ import annotations

import torch

_SLAB = 1 << 18  # floats in one slab of attention rows (1 MB): small enough to stay in cache


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, _ = x.shape
    return x.reshape(b, n, num_heads, -1).transpose(1, 2).float()  # (B, H, N, d)


def query_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    num_heads: int,
    scale: float,
    rows: torch.Tensor | slice,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of the query rows ``rows`` over all keys, averaged over heads: (B, R, N)."""
    qh = _heads(q[:, rows], num_heads)
    kh = _heads(k, num_heads)
    logits = (qh @ kh.transpose(-1, -2)) * scale  # (B, H, R, N)
    if bias is not None:
        logits = logits + bias.float().view(bias.shape[0], 1, 1, -1)
    return logits.softmax(-1).mean(1)


def cls_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    num_heads: int,
    scale: float,
    bias: torch.Tensor | None = None,
    cls_index: int = 0,
) -> torch.Tensor:
    """[CLS] -> token attention averaged over heads: (B, N)."""
    return query_attention(q, k, num_heads, scale, slice(cls_index, cls_index + 1), bias)[:, 0]


def mean_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    num_heads: int,
    scale: float,
    bias: torch.Tensor | None = None,
    query_valid: torch.Tensor | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """Attention each token receives, averaged over (valid) queries and heads: (B, N).

    Column sums of the softmax attention, accumulated over slabs of query rows, one sample at a time: a slab is
    (heads, ``block`` rows, N) float32, about 1 MB by default (``block`` None), so it stays in cache, and no
    heads x N x N map (nor a batch of them) is ever held. Padded query rows (``query_valid`` False) weigh 0.
    No data-dependent control flow (``torch.compile`` traces it without a graph break).
    """
    b, n, _ = q.shape
    qh, kh = _heads(q, num_heads), _heads(k, num_heads)  # (B, H, N, d) views
    rows = block if block is not None else max(1, _SLAB // (num_heads * n))
    w = None if query_valid is None else query_valid.to(torch.float32)  # (B, N) weight of each query row
    out = torch.zeros(b, n, dtype=torch.float32, device=q.device)
    for i in range(b):
        ki = kh[i].contiguous()
        bi = None if bias is None else bias[i].float().view(1, 1, n)
        for start in range(0, n, rows):
            logits = torch.matmul(qh[i, :, start : start + rows], ki.transpose(-1, -2)).mul_(scale)  # (H, r, N)
            if bi is not None:
                logits.add_(bi)
            att = logits.softmax(-1).sum(0)  # (r, N): summed over heads
            out[i] += att.sum(0) if w is None else w[i, start : start + rows] @ att
    denom = float(n) if w is None else w.sum(1, keepdim=True).clamp_min(1.0)
    return out / denom / num_heads
