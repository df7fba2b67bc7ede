"""FasterVLM: [CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM Inference Faster
(Zhang et al., 2024), arXiv 2412.01818.

Algorithm (one reduction point, after encoder layer ``l``):
1. score every token by the attention the [CLS] query pays it in layer ``l``: one softmax row over all tokens
   ([CLS] and registers included in the normalisation), averaged over heads;
2. keep the ``k`` patch tokens with the highest score, in their original order, and drop the rest.

What the paper and its official code (Theia-4869/FasterVLM) fix:
* the layer: LLaVA takes its visual features from the penultimate encoder layer
  (``mm_vision_select_layer = -2``) and FasterVLM reads the attention map of that same layer
  (``attentions[select_layer]``), i.e. the layer whose output is pruned. Here that is the layer at the site:
  ``site="layer:-2"`` reproduces the LLaVA setting, the default ``"output"`` uses the last layer;
* heads are averaged (``image_attentions.mean(dim=1)``), the [CLS] row restricted to patch columns,
  ``torch.topk`` per sample.

Choices left open, and ours:
* the score is recomputed from the layer's own queries and keys (one softmax row per head, no N x N matrix), with
  the additive key bias the layer itself saw, so it equals the ``output_attentions`` map of an eager model while
  the host keeps running SDPA;
* protected tokens ([CLS], registers, distillation token) are kept on top of ``k``; LLaVA instead drops [CLS]
  from its features (``select_feature="patch"``);
* ties go to the lowest token index (``torch.topk`` leaves them unspecified).
"""

from __future__ import annotations

import torch

from ..ops.select import topk_by_score
from .base import Method, Plan, ReduceInput, keep_indices, register, uniform_keep


@register
class FasterVLM(Method):
    name = "fastervlm"
    title = "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM Inference Faster"
    arxiv = "2412.01818"
    summary = "keep the top-k patch tokens by [CLS] attention (averaged over heads) of the layer at the site"
    kind = "prune"
    sites = ("layer", "output")
    default_site = "output"
    signals = frozenset({"cls_attn"})

    def reduce(self, inp: ReduceInput, keep: torch.Tensor) -> Plan:
        k = uniform_keep(keep, self.name)
        idx = topk_by_score(inp.cls_attention(), k, inp.candidates)
        return keep_indices(inp, idx), None
