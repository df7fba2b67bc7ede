"""Analytic prefill FLOPs of a vision-language model's language side under a :class:`VLMSchedule`.

Counted as FastV counts them (arXiv 2403.06764, its FLOPs ratio): the decoder layers only, each on the tokens that
enter it (:func:`tokenthin.flops.lm_layer_flops`: projections with grouped k / v, the full n x n attention, the
SwiGLU MLP). The vision tower, the projector, the embedding lookup and the head cost the same whatever a method at
``output`` / ``llm:k`` / ``output+llm`` reduces, and are left out, so a fraction here is of the language model's
prefill. Token counts follow the runtime's rules exactly (:func:`tokenthin.vlm.plan.keep_counts`): before the
language model a fractional keep is of the prompt's visual tokens (at least one kept); inside it, of those that
entered it (``round``, may reach 0); text and structure tokens (row ends) always stay.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..budget import keep_count
from ..flops import LMDims, lm_prefill_flops
from .schedule import VLMSchedule


def layer_tokens(text: int, visual: int, s: VLMSchedule, num_layers: int) -> list[int]:
    """Tokens entering each decoder layer for a prompt of ``text`` text / structure tokens and ``visual`` visual
    tokens under ``s``."""
    n_in = visual if s.output_keep is None else keep_count(s.output_keep, visual)
    points = dict(s.llm)
    cur, out = n_in, []
    for j in range(num_layers):
        out.append(text + cur)
        if j in points:
            spec = points[j]
            cur = min(cur, round(spec * n_in)) if isinstance(spec, float) else int(spec)
    return out


def prefill_flops(prompts: Sequence[tuple[int, int]], s: VLMSchedule | None, d: LMDims) -> int:
    """The decoder layers' FLOPs over ``prompts`` ((text, visual) tokens each) under ``s`` (None: unreduced)."""
    total = 0
    for text, visual in prompts:
        counts = [text + visual] * d.num_layers if s is None else layer_tokens(text, visual, s, d.num_layers)
        total += lm_prefill_flops(counts, d)
    return total


def prefill_fraction(prompts: Sequence[tuple[int, int]], s: VLMSchedule, d: LMDims) -> float:
    """:func:`prefill_flops` under ``s`` as a fraction of the unreduced model's on the same prompts."""
    return prefill_flops(prompts, s, d) / max(1, prefill_flops(prompts, None, d))


def min_visual(prompts: Sequence[tuple[int, int]], s: VLMSchedule, num_layers: int) -> int:
    """The fewest visual tokens any prompt keeps to the last layer under ``s``."""
    return min(layer_tokens(t, v, s, num_layers)[-1] - t for t, v in prompts)
