"""Batched greedy generation that measures what a token-reduction method costs and buys, per call and per sample.

Definitions (one ``generate()`` call of a batch; times in seconds, CUDA synchronised at every mark):

* ``ttft_s``: from the ``generate()`` call to the first token's scores (inputs prepared, vision tower, projector, the
  method, the language model's prefill);
* ``prefill_s``: the first forward of the multimodal model alone (generate's prefill step; transformers 5.24's
  ``generate()`` encodes the images before that forward, so for LLaVA this is the projector-to-logits part: the
  language model's prefill and the method; the vision tower is in ``ttft_s`` only);
* ``decode_s``: from the first token's scores to the end; ``decode_steps`` forwards after the prefill, so one decoding
  step takes ``decode_s / decode_steps``;
* ``peak_mb``: on CUDA, ``torch.cuda.max_memory_allocated`` during the call above what was allocated before it
  (``peak_scope="generate"``); on the CPU, the peak of the tensors a separate prefill forward creates, tracked by
  :func:`tokenthin.bench.memory.peak_memory` (``peak_scope="prefill"``: the tracker would distort the timed call);
* ``flops``: analytic FLOPs of a separate prefill forward (``torch.utils.flop_counter``, the method's own ops
  included), when asked for;
* per sample: ``visual_tokens`` (image tokens of its prompt, as the processor expanded them), ``kept`` (visual tokens
  the method kept at its last stage: what its budget counts), ``structure`` (image tokens that are layout, not
  content, and always stay: LLaVA-NeXT's row ends; 0 when no method is applied), ``visual_after`` (``kept +
  structure``: image tokens the language model reads), ``llm_tokens`` (its prompt length as the language model reads
  it), ``new_tokens`` (generated, end-of-sequence included).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _FirstScores:
    """A logits processor that records when the first token's scores are ready and changes nothing."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.t: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.t is None:
            _sync(self.device)
            self.t = time.perf_counter()
        return scores


class _ForwardClock:
    """Start and end time of every forward of a module while attached."""

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        self.device = device
        self.spans: list[list[float]] = []
        self._h = [
            module.register_forward_pre_hook(self._pre, prepend=True),
            module.register_forward_hook(self._post, always_call=True),
        ]

    def _pre(self, _m: nn.Module, _args: Any) -> None:
        _sync(self.device)
        self.spans.append([time.perf_counter(), float("nan")])

    def _post(self, _m: nn.Module, _args: Any, _out: Any) -> None:
        _sync(self.device)
        self.spans[-1][1] = time.perf_counter()

    def close(self) -> None:
        for h in self._h:
            h.remove()


@dataclass
class Generation:
    """One measured ``generate()`` call of a batch (see the module docstring for the definitions)."""

    sequences: list[list[int]]  # new tokens per sample, up to and including the first end-of-sequence token
    prompt_tokens: list[int]
    visual_tokens: list[int]
    kept: list[int]
    structure: list[int]
    ttft_s: float
    prefill_s: float
    decode_s: float
    decode_steps: int
    peak_mb: float | None = None
    peak_scope: str = "generate"
    flops: float | None = None
    site: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def visual_after(self) -> list[int]:
        return [k + s for k, s in zip(self.kept, self.structure)]

    @property
    def llm_tokens(self) -> list[int]:
        return [p - v + a for p, v, a in zip(self.prompt_tokens, self.visual_tokens, self.visual_after)]

    def sample(self, i: int) -> dict[str, Any]:
        """Sample i's numbers (the call's times and memory are shared by its batch)."""
        return {
            "visual_tokens": self.visual_tokens[i],
            "kept": self.kept[i],
            "structure": self.structure[i],
            "visual_after": self.visual_after[i],
            "llm_tokens": self.llm_tokens[i],
            "prompt_tokens": self.prompt_tokens[i],
            "new_tokens": len(self.sequences[i]),
            "ttft_s": self.ttft_s,
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
            "decode_steps": self.decode_steps,
            "decode_step_s": self.decode_s / self.decode_steps if self.decode_steps else None,
            "peak_mb": self.peak_mb,
            "peak_scope": self.peak_scope,
            "flops": self.flops,
            "batch_size": len(self.sequences),
        }


def image_token_counts(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[int]:
    """Image tokens per sample in ``input_ids`` (row-end tokens of LLaVA-NeXT included: the processor expands them)."""
    tid = model.config.image_token_id
    if tid is None:
        return [0] * inputs["input_ids"].shape[0]
    return (inputs["input_ids"] == tid).sum(1).tolist()


def _trim(row: Sequence[int], eos: set[int]) -> list[int]:
    out = []
    for t in row:
        out.append(int(t))
        if int(t) in eos:
            break
    return out


def _visual(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[list[int], list[int], list[int], str | None]:
    """(image tokens of each prompt, kept, structure, site) of the last prefill: tokenthin's record when a method is
    applied and attached, else the prompt's image tokens, all kept."""
    from .. import api

    n = image_token_counts(model, inputs)
    if api.is_applied(model):
        rt = api.runtime_of(model)
        if rt.handles and rt.last is not None:
            struct = [a - v for a, v in zip(n, rt.last.visual_tokens)]
            return n, list(rt.last.kept), struct, rt.last.site
    return n, n, [0] * len(n), None


def _eos_ids(model: nn.Module, eos_token_id: int | list[int] | None) -> set[int]:
    ids = eos_token_id if eos_token_id is not None else model.generation_config.eos_token_id
    if ids is None:
        return set()
    return {int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])}


def generate_measured(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    *,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    memory: bool = True,
    count_flops: bool = False,
    **gen_kwargs: Any,
) -> Generation:
    """Greedy ``model.generate(**inputs)`` with the measurements of the module docstring. ``gen_kwargs`` go to
    ``generate`` (sampling settings, ``use_cache``); ``memory=False`` skips the peak-memory measurement."""
    from transformers import LogitsProcessorList

    from ..bench.memory import peak_memory

    dev = inputs["input_ids"].device
    eos = _eos_ids(model, eos_token_id)
    first = _FirstScores(dev)
    clock = _ForwardClock(model, dev)
    kw = {"do_sample": False, **gen_kwargs, "max_new_tokens": max_new_tokens}
    if eos_token_id is not None:
        kw["eos_token_id"] = eos_token_id
    if pad_token_id is not None:
        kw["pad_token_id"] = pad_token_id
    cuda_mem = memory and dev.type == "cuda"
    base = 0
    try:
        if cuda_mem:
            _sync(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        with torch.inference_mode():
            _sync(dev)
            t0 = time.perf_counter()
            out = model.generate(**inputs, logits_processor=LogitsProcessorList([first]), **kw)
            _sync(dev)
            t1 = time.perf_counter()
    finally:
        clock.close()
    peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20 if cuda_mem else None
    before, kept, struct, site = _visual(model, inputs)
    t_first = first.t if first.t is not None else t1
    new = out[:, inputs["input_ids"].shape[1] :].tolist()
    mask = inputs.get("attention_mask")
    prompt = mask.sum(1).tolist() if mask is not None else [inputs["input_ids"].shape[1]] * len(new)
    gen = Generation(
        sequences=[_trim(r, eos) for r in new],
        prompt_tokens=[int(p) for p in prompt],
        visual_tokens=before,
        kept=kept,
        structure=struct,
        ttft_s=t_first - t0,
        prefill_s=clock.spans[0][1] - clock.spans[0][0] if clock.spans else float("nan"),
        decode_s=t1 - t_first,
        decode_steps=max(len(clock.spans) - 1, 0),
        peak_mb=peak,
        site=site,
    )
    if memory and dev.type != "cuda":
        with torch.inference_mode(), peak_memory(dev, exclude=tuple(inputs.values())) as m:
            gen.flops = _prefill(model, inputs, count_flops)
        gen.peak_mb, gen.peak_scope = m["mb"], "prefill"
    elif count_flops:
        with torch.inference_mode():
            gen.flops = _prefill(model, inputs, True)
    return gen


def _prefill(model: nn.Module, inputs: dict[str, torch.Tensor], count_flops: bool) -> float | None:
    """One prefill forward; its FLOPs when ``count_flops``."""
    from torch.utils.flop_counter import FlopCounterMode

    if not count_flops:
        model(**inputs, use_cache=False)
        return None
    with FlopCounterMode(display=False) as fc:
        model(**inputs, use_cache=False)
    return float(fc.get_total_flops())
