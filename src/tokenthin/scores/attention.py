"""Attention-derived token scores, computed from a layer's own queries and keys.

The attention a layer paid is recomputed for the rows we need only: [CLS] -> all is one query row (O(N) per
head), so no N x N matrix is materialised and the host may keep running SDPA or any other attention kernel.
Mean attention (for models without [CLS]) needs every row; it is computed in row blocks to bound memory.
``bias`` is the additive key bias the layer itself saw (log-size for proportional attention, a large negative
number for padding), so the scores match the attention the model actually computed.
"""

from __future__ import annotations

import torch


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
    block: int = 256,
) -> torch.Tensor:
    """Attention each token receives, averaged over (valid) queries and heads: (B, N)."""
    b, n, _ = q.shape
    total = torch.zeros(b, n, dtype=torch.float32, device=q.device)
    for start in range(0, n, block):
        att = query_attention(q, k, num_heads, scale, slice(start, start + block), bias)
        if query_valid is not None:
            att = att * query_valid[:, start : start + block, None].float()
        total += att.sum(1)
    denom = query_valid.sum(1, keepdim=True).clamp_min(1).float() if query_valid is not None else float(n)
    return total / denom
