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
* protected tokens ([CLS], registers) are kept on top of ``k``; ties go to the lowest token index (official:
  ``torch.topk``, unspecified on ties).

``official=True`` reproduces the released selection (``encode_images``): ``a = round(k * alpha / 5)`` with no cap;
the buffers of an anchor at flat patch index ``i`` are ``i - 1, i + 1, i - w, i + w`` clamped to ``[0, n - 1]``
(the release hard-codes ``w = 24`` and ``n - 1 = 575``, LLaVA-1.5's grid; here the grid's own width and size), so
an anchor at a row end takes the next row's first token, one at a row start the previous row's last token, and
any anchor in the first (last) row adds token 0 (n - 1), an official quirk; registers fill the rest by the deep
layer's score among the tokens not chosen; kept tokens in their original order (as the release sorts them). Where
anchors and buffers overrun ``k`` (``alpha`` near 1) the release fails (``torch.topk`` with a negative count); this
mode raises an error there. The release's per-batch budget ``int(RETENTION / B)`` (LLaVA-NeXT: the crops of one
image share it evenly) is not reproduced: one image's full grid per sample, as in the default.
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


def _flag(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be True (the official code's selection) or False"


def flat_neighbours(anchors: torch.Tensor, w: int) -> torch.Tensor:
    """(B, n) anchors with the release's buffers: flat indices ``i +- 1`` and ``i +- w``, clamped to the grid's
    first and last token (no row awareness: a row end's ``i + 1`` is the next row's first token)."""
    n = anchors.shape[1]
    out = anchors.clone()
    out[:, 1:] |= anchors[:, :-1]
    out[:, :-1] |= anchors[:, 1:]
    out[:, w:] |= anchors[:, :-w]
    out[:, :-w] |= anchors[:, w:]
    out[:, 0] |= anchors[:, :w].any(1)  # i - w < 0 clamps to 0 (i - 1 < 0 only for i = 0, already chosen)
    out[:, n - 1] |= anchors[:, n - w :].any(1)  # i + w > n - 1 clamps to n - 1
    return out


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
        "official": Param(
            False,
            "reproduce the released selection: anchors round(alpha * k / 5) uncapped, buffers by flat index "
            "(wrapping across rows, clamped to the first / last token)",
            _flag,
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
        official = self.p["official"]
        a = round(k * self.p["alpha"] / 5)
        a = a if official else min(a, k // 5)
        no_group = torch.zeros(b, n, dtype=torch.long, device=deep.device)
        anchors = (rank_in_groups(obj, no_group, 1) < a).view(b, h, w)
        if official:
            chosen = flat_neighbours(anchors.view(b, n), w)
        else:
            chosen = anchors.clone()
            chosen[:, 1:] |= anchors[:, :-1]
            chosen[:, :-1] |= anchors[:, 1:]
            chosen[:, :, 1:] |= anchors[:, :, :-1]
            chosen[:, :, :-1] |= anchors[:, :, 1:]
            chosen = chosen.view(b, n)
        registers = k - chosen.sum(1, keepdim=True)  # (B, 1), >= 0 by default: at most 5 a <= k are chosen
        if official and bool((registers < 0).any()):
            raise TokenThinError(
                f"'hiprune' with official=True: {a} anchors and their buffers ({int(chosen.sum(1).max())} tokens) "
                f"overrun the budget of {k}, where the released code fails; use a smaller alpha, or the default "
                "official=False (anchors capped at k // 5)"
            )
        rank = rank_in_groups(deep, chosen.long(), 2)  # registers rank among the tokens not chosen (group 0)
        chosen = chosen | (rank < registers)
        if int(chosen.sum(1).min()) != k or int(chosen.sum(1).max()) != k:
            raise TokenThinError(f"internal: 'hiprune' chose {chosen.sum(1).tolist()} tokens instead of {k}")
        out = torch.ones_like(inp.valid)
        out[:, P:] = chosen
        return out & inp.valid, None
