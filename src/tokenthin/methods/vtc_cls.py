"""VTC-CLS: [CLS] Token Tells Everything Needed for Training-free Efficient MLLMs (Wang et al., 2024),
arXiv 2412.05819.

Algorithm (one reduction point, after encoder layer ``l``):
1. for each of the ``n`` encoder layers ``l - n + 1 .. l``, take the [CLS] query's attention over all tokens,
   averaged over heads;
2. ensemble the layers by summing these per-layer scores (the same ranking as their mean);
3. keep the ``k`` patch tokens with the highest summed score, in their original order, and drop the rest.

What the official code (THU-MIG/VTC-CLS, ``cls_token_only``) fixes:
* the ensemble is a sum of per-layer, head-averaged [CLS] -> patch attention maps
  (``attentions[start_layer:-1]``), not a vote over per-layer top-k selections; the comment there says min or
  max could be used instead, the released code sums;
* the layers run from ``start_layer`` (default 16 of CLIP ViT-L/14's 24) up to the penultimate layer, LLaVA's
  feature layer, so 7 layers: that is the default ``layers=7`` here, ending at the site (``site="layer:-2"``
  reproduces LLaVA).

Choices left open, and ours:
* the ensemble window is clamped to the layers that exist: a site after layer ``l`` uses at most ``l + 1``
  layers (so tiny models and early sites work), which is the rule, not an error;
* every score is recomputed from that layer's own queries and keys (one softmax row per head, no N x N matrix),
  so the host keeps running SDPA;
* summing maps from different layers needs the same tokens in each: the method only acts before any other
  reduction (``inp.pristine``) and refuses otherwise;
* protected tokens ([CLS], registers) are kept on top of ``k``; ties go to the lowest token index.
"""

from __future__ import annotations

import torch

from ..errors import TokenThinError
from ..ops.select import topk_by_score
from .base import Method, Param, Plan, ReduceInput, keep_indices, positive_int, register, uniform_keep


@register
class VTCCLS(Method):
    name = "vtc-cls"
    title = "[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs"
    arxiv = "2412.05819"
    summary = "keep the top-k patch tokens by [CLS] attention summed over the last n layers up to the site"
    kind = "prune"
    sites = ("layer", "output")
    default_site = "output"
    signals = frozenset({"cls_attn"})
    params = {
        "layers": Param(
            7,
            "how many encoder layers, ending at the site, contribute their [CLS] attention (fewer if the site is "
            "earlier); the official default is 7 (layers 16-22 of CLIP ViT-L/14)",
            positive_int,
        )
    }

    def signal_layers(self, point_layer: int, num_layers: int) -> list[int]:
        n = min(self.p["layers"], point_layer + 1)
        return list(range(point_layer - n + 1, point_layer + 1))

    def reduce(self, inp: ReduceInput, keep: torch.Tensor) -> Plan:
        if not inp.pristine:
            raise TokenThinError(
                "'vtc-cls' sums [CLS] attention over several layers, which needs the same tokens in each of them; "
                "it cannot act after another reduction. Use it alone at one site (site='layer:k' or 'output')"
            )
        k = uniform_keep(keep, self.name)
        score = None
        for layer in self.signal_layers(inp.layer, inp.num_layers):
            s = inp.cls_attention(layer)
            if s.shape != inp.valid.shape:
                raise TokenThinError(
                    f"'vtc-cls': layer {layer} saw {s.shape[1]} tokens but layer {inp.layer} has "
                    f"{inp.valid.shape[1]}; the ensemble needs an unreduced token sequence"
                )
            score = s if score is None else score + s
        assert score is not None
        idx = topk_by_score(score, k, inp.candidates)
        return keep_indices(inp, idx), None
