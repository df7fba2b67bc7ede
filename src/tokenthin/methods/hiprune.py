"""HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision-Language Models
(Liu et al., 2025), arXiv 2508.00553 (v3 retitled "HiPrune: Hierarchical Attention for Efficient Token Pruning in
Vision-Language Models").

Algorithm (one reduction point after encoder layer ``l``, keeping ``k`` patch tokens):
1. anchors: the ``a = round(alpha * k / 5)`` patch tokens with the highest attention in a middle,
   "object-centric" encoder layer ``l_obj``;
2. buffers: the spatial neighbours of every anchor (up, down, left, right on the patch grid); anchors and buffers
   together are at most ``5 a`` tokens;
3. registers: fill the rest of the budget with the not yet chosen patch tokens that get the highest attention in
   the deep layer at the site (``l``, "global" tokens);
4. keep anchors, buffers and registers in their original order; drop the rest.

What the official code (Danielement321/HiPrune, ``llava/model/llava_arch.py``) fixes:
* the score of both stages is the attention each token receives, averaged over heads and over all query rows
  ([CLS] included), restricted to patch columns (the [CLS] row is there, commented out): ``score="mean"``
  here; ``score="cls"`` offers the [CLS] row;
* the deep layer is LLaVA's feature layer (``attentions[mm_vision_select_layer]``, the penultimate), i.e. the
  layer whose output is pruned: the layer at the site here (``site="layer:-2"`` on a plain ViT reproduces it);
* ``alpha = 0.1`` and the object layer 9 (1-based) of CLIP ViT-L/14's 24 layers for LLaVA (16 of 32 for
  Qwen2.5-VL); ``a = round(k * alpha / 5)``; registers are chosen after anchors and buffers.

Choices left open, and ours:
* the default object layer scales the LLaVA setting to the encoder's depth: 0-based layer
  ``floor(9 / 24 * L + 1/2) - 1`` (layer 8 of 24), never after the site; ``object_layer`` sets it explicitly;
* buffers are true grid neighbours: the released code adds ``i +- 1`` and ``i +- 24`` to flat indices and clamps,
  so a token at a row end gets the first token of the next row as a "neighbour"; we do not wrap;
* ``a`` is also capped at ``k // 5`` so anchors and buffers always fit in the budget (the released code can
  overrun it for ``alpha`` near 1); exactly ``k`` patch tokens are kept;
* LLaVA-NeXT runs the same selection per crop with the budget split evenly; here a sample must be one image's
  full patch grid (one image per prompt, or a ViT before any other reduction), otherwise the method refuses;
* protected tokens ([CLS], registers) are kept on top of ``k``; ties go to the lowest token index.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import TokenThinError
from ..ops.groups import rank_in_groups
from .base import Method, Param, Plan, ReduceInput, register, uniform_keep
from .hired import attention_score, patch_grid, resolve_layer


def _alpha(v: Any) -> str | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1
    return None if ok else "must be a fraction in [0, 1] (the share of the budget for anchors and their buffers)"


def _object_layer(v: Any) -> str | None:
    ok = v is None or (isinstance(v, int) and not isinstance(v, bool))
    return None if ok else "must be None (scaled from the paper's layer 9 of 24) or an encoder layer index"


def _score_kind(v: Any) -> str | None:
    return None if v in ("mean", "cls") else "must be 'mean' (attention received) or 'cls' ([CLS] attention)"


@register
class HiPrune(Method):
    name = "hiprune"
    title = "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision-Language Models"
    arxiv = "2508.00553"
    summary = (
        "keep anchor tokens by a middle layer's attention plus their grid neighbours, then fill the budget with "
        "register tokens by the attention of the layer at the site"
    )
    kind = "prune"
    sites = ("layer", "output")
    default_site = "output"
    signals = frozenset({"mean_attn"})  # what the default score reads; score="cls" reads "cls_attn" instead
    params = {
        "alpha": Param(
            0.1, "share of the budget for anchors and their buffers (anchors: round(alpha * k / 5))", _alpha
        ),
        "object_layer": Param(
            None,
            "encoder layer (0-based; negative from the end) whose attention picks the anchors; None: the paper's "
            "layer 9 of 24 scaled to the encoder's depth",
            _object_layer,
        ),
        "score": Param(
            "mean",
            "'mean' (attention received, averaged over queries and heads: the official code) or 'cls' ([CLS] "
            "attention)",
            _score_kind,
        ),
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.p["score"] == "cls":
            self.signals = frozenset({"cls_attn"})

    def _object(self, point_layer: int, num_layers: int) -> int:
        if self.p["object_layer"] is None:
            return max(0, min(point_layer, int(9 / 24 * num_layers + 0.5) - 1))
        return resolve_layer(self.name, "object_layer", self.p["object_layer"], point_layer, num_layers)

    def signal_layers(self, point_layer: int, num_layers: int) -> list[int]:
        return sorted({self._object(point_layer, num_layers), point_layer})

    def reduce(self, inp: ReduceInput, keep: torch.Tensor) -> Plan:
        k = uniform_keep(keep, self.name)
        h, w = patch_grid(inp, self.name)
        P = inp.num_protected
        obj_layer = self._object(inp.layer, inp.num_layers)
        deep_full = attention_score(inp, self.p["score"], inp.layer, self.name)
        same = obj_layer == inp.layer  # the object layer can coincide with the site (shallow site or encoder)
        obj = (deep_full if same else attention_score(inp, self.p["score"], obj_layer, self.name))[:, P:]
        deep = deep_full[:, P:]
        b, n = deep.shape
        a = min(round(k * self.p["alpha"] / 5), k // 5)
        no_group = torch.zeros(b, n, dtype=torch.long, device=deep.device)
        anchors = (rank_in_groups(obj, no_group, 1) < a).view(b, h, w)
        chosen = anchors.clone()
        chosen[:, 1:] |= anchors[:, :-1]
        chosen[:, :-1] |= anchors[:, 1:]
        chosen[:, :, 1:] |= anchors[:, :, :-1]
        chosen[:, :, :-1] |= anchors[:, :, 1:]
        chosen = chosen.view(b, n)
        registers = k - chosen.sum(1, keepdim=True)  # (B, 1), >= 0 since at most 5 a <= k are chosen
        rank = rank_in_groups(deep, chosen.long(), 2)  # registers rank among the tokens not chosen (group 0)
        chosen = chosen | (rank < registers)
        if int(chosen.sum(1).min()) != k or int(chosen.sum(1).max()) != k:
            raise TokenThinError(f"internal: 'hiprune' chose {chosen.sum(1).tolist()} tokens instead of {k}")
        out = torch.ones_like(inp.valid)
        out[:, P:] = chosen
        return out & inp.valid, None
