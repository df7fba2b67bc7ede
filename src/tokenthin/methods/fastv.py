"""FastV: An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large
Vision-Language Models (Chen et al., ECCV 2024), arXiv 2403.06764.

Algorithm (inside the language model, once, at prefill): after decoder layer ``K - 1`` rank the image tokens by the
attention the prompt's last token pays them in that layer (softmax over the whole prompt, averaged over heads), keep
the top ``keep`` of them in their original order and drop the rest from every later layer. Decoding then runs on
the reduced cache of those later layers. The paper's setting is ``K = 2``, ``R = 50%``: ``site="llm:1",
keep=0.5`` here (``llm:k`` reduces *after* layer k).

Choices left open, and ours:
* the released code (pkunlp-icler/FastV, ``fastv_inplace``) reads the attention map of layer ``K - 1`` with
  ``output_attentions``, which forces eager attention for the whole model. Here the last token's row is recomputed
  from the layer's captured queries and keys with its own rotary embedding (grouped-query heads repeated), so the
  host keeps SDPA and no N x N matrix is built;
* kept tokens keep their original positions (the paper's in-place variant does the same);
* ties go to the lowest token index.
"""

from __future__ import annotations

import torch

from ..ops.select import topk_by_score
from .base import Method, Plan, ReduceInput, keep_indices, register, uniform_keep


@register
class FastV(Method):
    name = "fastv"
    title = "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large VLMs"
    arxiv = "2403.06764"
    summary = "inside the language model after layer k, keep the image tokens the last prompt token attends to most"
    kind = "prune"
    sites = ("llm",)
    default_site = "llm:1"
    signals = frozenset({"last_attn"})

    def reduce(self, inp: ReduceInput, keep: torch.Tensor) -> Plan:
        k = uniform_keep(keep, self.name)
        score = inp.signals.last_token_attention(inp.layer)
        return keep_indices(inp, topk_by_score(score, k, inp.candidates)), None
