"""AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning (Zhong et al., ICCV 2025),
arXiv 2412.03248.

Algorithm, two stages:
1. before the language model: iterative bipartite merging of the visual tokens by the cosine similarity of their
   embeddings (the projector output): alternate tokens form sets A and B, each A token's most similar B token is
   its edge, the strongest edges are merged (averaged), repeated until ``keep`` tokens are left;
2. inside the language model: progressive pruning. After every layer ``l >= start`` the visual tokens are ranked by
   a PageRank importance computed on that layer's attention and only a fraction ``1 - (l - start + 1) * step`` of
   the visual tokens that entered the language model is kept (text tokens always stay), down to none.

   PageRank (as in the released code, LaVi-Lab/AIM ``get_importance``): ``M = softmax(logits / tau)`` per head
   over the causal, scaled attention logits, ``tau = 0.1``; a distribution starts uniform and is multiplied by
   ``M`` five times (no damping); the importance of a token is the root-mean-square of its mass over heads.

Choices left open, and ours:
* the released schedule is written for 32-layer LLaMA (``start = 13``, ``step = 0.125``: no visual token is left
  after layer 20). ``start`` defaults to ``round(13/32 * L)`` for an L-layer language model; both are parameters;
* padding: the released code runs one prompt at a time. Here padded positions start with no mass and pass none
  on, so a padded batch ranks exactly as its prompts alone would;
* the attention is recomputed from the layer's own queries and keys (with its rotary embedding) instead of an
  eager ``output_attentions`` pass, so the host keeps SDPA. It is an N x N matrix per head, as in the paper, built
  a few heads at a time (about 4 MB) and dropped once that head's PageRank is done: no heads x N x N map is held;
* merged tokens keep the position of the token they merged into; ties go to the lowest index.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ..ops.select import topk_by_score
from .base import Method, Param, Plan, ReduceInput, keep_indices, register, uniform_keep
from .tome import merge_rounds


def _start(v: Any) -> str | None:
    return None if v is None or (isinstance(v, int) and v >= 0) else "must be None (scaled) or a layer index >= 0"


def _step(v: Any) -> str | None:
    return None if isinstance(v, (int, float)) and 0 < v <= 1 else "must be in (0, 1]"


def _pos(v: Any) -> str | None:
    return None if isinstance(v, (int, float)) and v > 0 else "must be > 0"


def _iters(v: Any) -> str | None:
    return None if isinstance(v, int) and v >= 1 else "must be an integer >= 1"


def head_mass(logits: torch.Tensor, valid: torch.Tensor, tau: float, iters: int) -> torch.Tensor:
    """(B, h, T, T) masked attention logits of h heads -> (B, h, T) PageRank mass of every head."""
    m = torch.softmax(logits.float() / tau, dim=-1)
    m = m.nan_to_num_(nan=0.0).mul_(valid[:, None, :, None])  # padded rows pass on nothing
    dist = valid.float() / valid.sum(1, keepdim=True).clamp_min(1)
    dist = dist[:, None, None, :].expand(-1, m.shape[1], 1, -1)  # (B, h, 1, T)
    for _ in range(iters):
        dist = dist @ m
    return dist.squeeze(2)


def pagerank(logits: torch.Tensor, valid: torch.Tensor, tau: float, iters: int) -> torch.Tensor:
    """(B, H, T, T) masked attention logits -> (B, T) importance (RMS over heads of the stationary-ish mass)."""
    return head_mass(logits, valid, tau, iters).pow(2).mean(1).sqrt()


def blocked_pagerank(blocks: Iterator[torch.Tensor], tau: float, iters: int) -> torch.Tensor:
    """:func:`pagerank` over head blocks (B, h, T, T) of the masked logits, one block in memory at a time: each
    head's PageRank only reads its own map, so a head block is built, iterated on and dropped before the next."""
    mass, valid = [], None
    for logits in blocks:
        if valid is None:
            valid = torch.isfinite(logits[:, 0].diagonal(dim1=-2, dim2=-1))  # a valid token sees itself
        mass.append(head_mass(logits, valid, tau, iters))
    return torch.cat(mass, dim=1).pow(2).mean(1).sqrt()


@register
class AIM(Method):
    name = "aim"
    title = "AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning"
    arxiv = "2412.03248"
    summary = (
        "merge similar visual tokens before the LLM, then prune them progressively inside it by PageRank importance"
    )
    kind = "merge"
    sites = ("output+llm",)
    default_site = "output+llm"
    signals = frozenset({"lm_attn"})
    params = {
        "start": Param(None, "first language-model layer after which to prune (None: round(13/32 * layers))", _start),
        "step": Param(0.125, "fraction of the entering visual tokens dropped after each layer from start on", _step),
        "tau": Param(0.1, "PageRank softmax temperature", _pos),
        "iters": Param(5, "PageRank iterations", _iters),
    }

    def llm_points(self, num_layers: int) -> list[tuple[int, float | int]]:
        start = self.p["start"] if self.p["start"] is not None else round(13 / 32 * num_layers)
        out: list[tuple[int, float | int]] = []
        for k in range(start, num_layers - 1):
            frac = max(0.0, 1.0 - (k - start + 1) * self.p["step"])
            out.append((k, frac))
            if frac == 0.0:
                break
        return out

    def reduce(self, inp: ReduceInput, keep: torch.Tensor) -> Plan:
        if inp.site == "output":
            return merge_rounds(inp, keep, inp.x)
        k = uniform_keep(keep, self.name)
        imp = blocked_pagerank(inp.signals.lm_attention_blocks(inp.layer), self.p["tau"], self.p["iters"])
        score = imp.gather(1, inp.positions_in_prompt(self.name))
        return keep_indices(inp, topk_by_score(score, k, inp.candidates)), None
