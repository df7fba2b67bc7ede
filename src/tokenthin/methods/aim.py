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

Where the default differs from the released code, and ``official=True``:
* merge stage (``llava/model/token_merge.py`` ``bipartite_soft_matching_merge``, called with ``r = N // 2`` then
  ``N // 4`` in ``get_2dPool``): each round returns ``[unmerged A by descending edge, B]`` and the next round splits
  that re-ordered output; it matches on the merged features (the default: on each token's own features, in
  positional order) and merges by an unweighted mean of the destination and its sources
  (``scatter_reduce(..., "mean")``, so a token standing for 2 counts as one; the default: size-weighted). The
  official mode reproduces all three, each round merging ``min(left, current // 2)`` (which gives the release's
  50% + 25% and the LLaVA-1.5 variant's 288 + 36), and hands the language model the release's values in its order
  (an :class:`~tokenthin.methods.base.OrderedPlan`). Not reproduced: the LLaVA-1.5 variant
  (``other_packages/LLaVA-PruMerge``) merges the vision tower's features *before* the projector, matching on the
  last tower layer's full keys (merged alongside); tokenthin's seam is the projector output, and merging before a
  non-linear projector is not the same as merging after it;
* schedule: the release has a 32-layer (LLaMA, ``start = 13``) and a 28-layer (Qwen2, ``modeling_qwen2.py``,
  ``start = 14``) schedule, both with ``step = 0.125``; the default scales the first to other depths
  (``round(13/32 * L)``: 11 for 28 layers). The official mode takes 13 / 14 for those depths and refuses others
  unless ``start`` is given. The release keeps ``int(rate * entered)`` visual tokens (floor), the runtime
  ``round(rate * entered)``: equal where ``entered`` is a multiple of 8;
* pruning: the release prunes inside the language model by masking key columns (the ``attention_mask`` of every
  later layer and of decoding), so pruned tokens stay in the sequence: they keep being computed as queries, start
  with mass ``1/N`` and pass it on in every later PageRank, and only their own columns are cut. tokenthin's
  ``llm:k`` site removes them from the sequence (that removal is the saving); keeping them as masked queries
  would need a per-layer key mask through prefill and every decoding step, which the host's seams do not offer
  per layer. Not reproduced in either mode: the PageRank here runs on the tokens that remain, equal to the
  release's at the first pruning layer only. Also not reproduced: the release scores with ``protected_num[0]``
  (batch element 0's text count) for every prompt of a batch, a batch bug (its evaluation runs batch 1).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ..errors import TokenThinError
from ..ops.select import topk_by_score
from ..ops.similarity import normalize
from .base import Method, OrderedPlan, Param, Plan, ReduceInput, keep_indices, register, uniform_keep
from .tome import merge_rounds


def _start(v: Any) -> str | None:
    return None if v is None or (isinstance(v, int) and v >= 0) else "must be None (scaled) or a layer index >= 0"


def _step(v: Any) -> str | None:
    return None if isinstance(v, (int, float)) and 0 < v <= 1 else "must be in (0, 1]"


def _pos(v: Any) -> str | None:
    return None if isinstance(v, (int, float)) and v > 0 else "must be > 0"


def _iters(v: Any) -> str | None:
    return None if isinstance(v, int) and v >= 1 else "must be an integer >= 1"


def _flag(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be True (the official code's merge and schedule) or False"


def official_merge(inp: ReduceInput, keep: torch.Tensor | int) -> OrderedPlan:
    """The released merge rounds restated: split the current tokens (in the order the last round returned) into A
    (even places) / B (odd), each A token's most similar B token by cosine of the current (merged) features, the
    ``min(left, current // 2)`` strongest edges merged by an unweighted mean, output ``[unmerged A by descending
    edge, B]``. Returns the assignment with the release's values and order."""
    if not bool(inp.valid.all()):
        raise TokenThinError("internal: 'aim' official merge expects unpadded samples (the runtime plans them alone)")
    k = uniform_keep(keep, "aim")
    b, n, d = inp.x.shape
    dev = inp.x.device
    cur = inp.x.float()  # (B, m, D) current slots in the release's order
    rep = torch.arange(n, device=dev).expand(b, n)  # original token representing each current slot
    slot_of = torch.arange(n, device=dev).expand(b, n)  # original token -> current slot
    left = n - k
    while left > 0 and cur.shape[1] >= 2:
        m = cur.shape[1]
        r = min(left, m // 2)
        mn = normalize(cur)
        node_max, node_idx = (mn[:, 0::2] @ mn[:, 1::2].transpose(1, 2)).max(dim=-1)
        edge = torch.argsort(node_max, dim=1, descending=True, stable=True)
        unm, src = edge[:, r:], edge[:, :r]
        dst = node_idx.gather(1, src)
        ax, bx = cur[:, 0::2], cur[:, 1::2]
        nu, nb = unm.shape[1], bx.shape[1]
        sums = bx.scatter_add(1, dst[..., None].expand(-1, -1, d), ax.gather(1, src[..., None].expand(-1, -1, d)))
        cnt = torch.ones(b, nb, device=dev).scatter_add(1, dst, torch.ones(b, r, device=dev))
        cur = torch.cat([ax.gather(1, unm[..., None].expand(-1, -1, d)), sums / cnt[..., None]], 1)
        a_new = torch.empty_like(node_idx)
        a_new.scatter_(1, unm, torch.arange(nu, device=dev).expand(b, nu))
        a_new.scatter_(1, src, nu + dst)
        old2new = torch.empty(b, m, dtype=torch.long, device=dev)
        old2new[:, 0::2] = a_new
        old2new[:, 1::2] = nu + torch.arange(nb, device=dev)
        slot_of = old2new.gather(1, slot_of)
        rep = torch.cat([rep[:, 0::2].gather(1, unm), rep[:, 1::2]], 1)
        left -= r
    keep_m = torch.zeros(b, n, dtype=torch.bool, device=dev).scatter(1, rep, True)
    target = torch.where(keep_m, -1, rep.gather(1, slot_of))
    values = torch.zeros(b, n, d, device=dev).scatter(1, rep[..., None].expand(-1, -1, d), cur)
    place = torch.arange(rep.shape[1], device=dev, dtype=torch.float64).expand(rep.shape)
    order = torch.zeros(b, n, dtype=torch.float64, device=dev).scatter(1, rep, place)
    return OrderedPlan(keep_m, target, order, values.to(inp.x.dtype))


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
        "official": Param(
            False,
            "reproduce the released merge (re-ordered split, merged features, unweighted mean, its order) and "
            "schedule (start 13 of 32 layers, 14 of 28); the in-LLM key masking is not reproduced",
            _flag,
        ),
    }

    llm_search = {"start": "layers", "step": (0.125, 0.25, 0.5)}  # tokenthin.calibrate on a VLM
    OFFICIAL_START = {32: 13, 28: 14}  # LLaMA (LLaVA-1.5), Qwen2 (LLaVA-OneVision)

    def _start(self, num_layers: int) -> int:
        if self.p["start"] is not None:
            return self.p["start"]
        if not self.p["official"]:
            return round(13 / 32 * num_layers)
        if num_layers not in self.OFFICIAL_START:
            raise TokenThinError(
                f"'aim' with official=True has the release's schedules for 32-layer (start 13) and 28-layer "
                f"(start 14) language models; this one has {num_layers} layers: pass start=..."
            )
        return self.OFFICIAL_START[num_layers]

    def llm_points(self, num_layers: int) -> list[tuple[int, float | int]]:
        start = self._start(num_layers)
        out: list[tuple[int, float | int]] = []
        for k in range(start, num_layers - 1):
            frac = max(0.0, 1.0 - (k - start + 1) * self.p["step"])
            out.append((k, frac))
            if frac == 0.0:
                break
        return out

    def reduce(self, inp: ReduceInput, keep: torch.Tensor) -> Plan:
        if inp.site == "output":
            return official_merge(inp, keep) if self.p["official"] else merge_rounds(inp, keep, inp.x)
        k = uniform_keep(keep, self.name)
        imp = blocked_pagerank(inp.signals.lm_attention_blocks(inp.layer), self.p["tau"], self.p["iters"])
        score = imp.gather(1, inp.positions_in_prompt(self.name))
        return keep_indices(inp, topk_by_score(score, k, inp.candidates)), None
