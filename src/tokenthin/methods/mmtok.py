"""MMTok: Multimodal Coverage Maximization for Efficient Inference of VLMs (Dong et al., 2025), arXiv 2508.18264.

Algorithm: select the visual tokens ``S`` (``|S| = k``) that maximise a multimodal coverage objective

    f(S) = f_text(S) + alpha * f_vision(S),    f_R(S) = sum_{j in R} max_{i in S} sim_R(j, i)

greedily (each term is a facility-location function, so ``f`` is monotone submodular and greedy is within
``1 - 1/e`` of the optimum). ``f_text``'s references are the prompt's text tokens, ``f_vision``'s are the visual
tokens themselves; ``sim_R(j, i) = softmax_i(cos(r_j, x_i) / T_R) / |R|`` (see
:func:`tokenthin.ops.coverage.coverage_greedy`), with the official code's temperatures ``T_text = 0.02`` and
``T_vision = 0.2`` and ``alpha = 0.5`` (CCAAttking7/MMTok, ``mmtok/llava/llava_inject.py``).

Choices left open, and ours:
* the text side: the released code (``mmtok/core/mmtok_core.py``, ``text_processor.py``) strips the prompt
  template from the question, drops its non-visual words by a fixed word list (keyword filtering), tokenises the
  remaining words one by one and embeds them with the language model's ``embed_tokens`` (no BOS). Here the
  references are the prompt's text-token input embeddings as the language model reads them (``ReduceInput.text``:
  every non-image token of the sample's own prompt, system prompt and template included, no word filter);
* the vision-vision term: the released code compares the visual tokens in the vision tower's own (pre-projector,
  CLIP) feature space (``vision_features_clip``, [CLS] stripped) while selecting projected tokens; here the term
  uses the projected visual tokens the language model reads;
* on a plain vision encoder there is no prompt: the method refuses it and names ``coverage`` (the vision term
  alone);
* ties go to the lowest token index.
"""

from __future__ import annotations

from typing import Any

import torch

from ..ops.coverage import MMTOK_TEXT_TEMPERATURE, MMTOK_VISION_TEMPERATURE, greedy_max_coverage
from ..ops.similarity import normalize, per_sample_matmul
from .base import Method, Param, Plan, ReduceInput, keep_indices, register, uniform_keep


def _positive(v: Any) -> str | None:
    return None if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else "must be > 0"


def _nonneg(v: Any) -> str | None:
    return None if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 else "must be >= 0"


def coverage_block(ref: torch.Tensor, ref_valid: torch.Tensor, x: torch.Tensor, cand: torch.Tensor, t: float):
    """(B, M, N) MMTok similarity of references ``ref`` (B, M, D) to tokens ``x`` (B, N, D): cosine / t,
    softmax over the candidate tokens, divided by the number of valid references; invalid rows are 0."""
    return _block(normalize(ref), ref_valid, normalize(x), cand, t)


def _block(rn: torch.Tensor, ref_valid: torch.Tensor, xn: torch.Tensor, cand: torch.Tensor, t: float):
    """:func:`coverage_block` on L2-normalised references and tokens."""
    logits = per_sample_matmul(rn, xn).div_(t)
    logits.masked_fill_(~cand.unsqueeze(1), float("-inf"))
    block = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
    n_ref = ref_valid.sum(1).clamp_min(1).to(block.dtype)
    return block.div_(n_ref.view(-1, 1, 1)).masked_fill_(~ref_valid.unsqueeze(-1), 0.0)


@register
class MMTok(Method):
    name = "mmtok"
    title = "MMTok: Multimodal Coverage Maximization for Efficient Inference of VLMs"
    arxiv = "2508.18264"
    summary = "keep the visual tokens that best cover both the prompt's text tokens and the visual tokens"
    kind = "prune"
    sites = ("output",)
    default_site = "output"
    needs_prompt = True
    params = {
        "alpha": Param(0.5, "weight of the vision-vision coverage term", _nonneg),
        "text_temperature": Param(MMTOK_TEXT_TEMPERATURE, "softmax temperature, text -> visual", _positive),
        "vision_temperature": Param(MMTOK_VISION_TEMPERATURE, "softmax temperature, visual -> visual", _positive),
    }

    def reduce(self, inp: ReduceInput, keep: torch.Tensor) -> Plan:
        k = uniform_keep(keep, self.name)
        cand = inp.candidates
        words, words_valid = inp.prompt_text(self.name)
        xn = normalize(inp.x)  # once for both blocks
        text = _block(normalize(words), words_valid, xn, cand, self.p["text_temperature"])
        vision = _block(xn, cand, xn, cand, self.p["vision_temperature"])
        cover = torch.cat([text, vision.mul_(self.p["alpha"])], dim=1)
        return keep_indices(inp, greedy_max_coverage(cover, k, cand)), None
