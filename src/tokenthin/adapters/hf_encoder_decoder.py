"""Hugging Face encoder-decoder models with a ViT-like image encoder: ``VisionEncoderDecoderModel`` (TrOCR, Donut,
latex-ocr) and look-alikes (a module with ``.encoder`` and a ``.decoder`` that has cross-attention).

The encoder is reduced exactly as by :class:`~tokenthin.adapters.hf_vision.HFVisionAdapter`; the decoder reads the
reduced tokens through cross-attention at every decoding step. ``VisionEncoderDecoderModel.forward`` hands the
decoder ``encoder_attention_mask=None``, so merged tokens (size > 1) would count as one and padded tokens (methods
that keep different counts per image) would be attended. A forward pre-hook on every cross-attention module sets
its ``attention_mask`` to the runtime's :meth:`~tokenthin.runtime.Runtime.cross_bias` as a (B, 1, 1, N) additive
mask: log size (proportional attention, when ``prop_attn``) and a large negative number on padding.

Seam (transformers 5.x MBart / TrOCR / BART-like decoders; BERT-like ``crossattention``): the decoder layer calls
its cross-attention module with ``attention_mask=encoder_attention_mask`` at every step, also when the cross keys
and values come from the ``EncoderDecoderCache`` (computed once at the first step and reused), and every attention
implementation (eager, SDPA) adds the mask to the logits. ``generate()`` with beams or ``num_return_sequences``
repeats each encoder output (``repeat_interleave``); the hook repeats the bias the same way.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..errors import TokenThinError
from .contract import BiasSource
from .hf_vision import HFVisionAdapter
from .registry import register

_CROSS_NAMES = ("encoder_attn", "crossattention")


def _cross_modules(decoder: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in decoder.named_modules() if n.rsplit(".", 1)[-1] in _CROSS_NAMES]


def _mask_position(module: nn.Module) -> int | None:
    """Index of ``attention_mask`` among the positional arguments of ``module.forward`` (None if keyword-only)."""
    params = list(inspect.signature(module.forward).parameters.values())
    for i, p in enumerate(params):
        if p.name == "attention_mask":
            return i if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) else None
    raise TokenThinError(f"{type(module).__name__}.forward takes no attention_mask; cannot pass the key bias")


@register
class HFEncoderDecoderAdapter(HFVisionAdapter):
    name = "hf_encoder_decoder"
    priority = 20  # above the encoder it contains
    families = (
        "Hugging Face VisionEncoderDecoderModel (TrOCR, Donut, latex-ocr: a ViT-like encoder and a decoder with "
        "cross-attention, e.g. MBart/TrOCR/BERT-like), with generate() and its KV cache"
    )

    def __init__(self, top: nn.Module, root: nn.Module, layers: nn.ModuleList, decoder: nn.Module) -> None:
        super().__init__(top, root, layers)
        self.decoder = decoder
        self.cross = [m for _, m in _cross_modules(decoder)]

    @classmethod
    def detect(cls, model: nn.Module) -> HFEncoderDecoderAdapter | None:
        for m in model.modules():
            enc, dec = getattr(m, "encoder", None), getattr(m, "decoder", None)
            if not isinstance(enc, nn.Module) or not isinstance(dec, nn.Module):
                continue
            if not _cross_modules(dec):
                continue
            inner = HFVisionAdapter.detect(enc)
            if inner is None:
                continue
            return cls(model, inner.root, nn.ModuleList(inner.layers), dec)
        return None

    def consumer_hooks(self, rt: BiasSource) -> list[Any]:
        handles = list(super().consumer_hooks(rt))
        for module in self.cross:
            handles.append(module.register_forward_pre_hook(cross_attention_hook(rt, module), with_kwargs=True))
        return handles

    def touched(self) -> list[str]:
        names = {m: n for n, m in self.top.named_modules()}
        return [*super().touched(), *(f"{names[m]} (cross-attention pre-hook: key bias)" for m in self.cross)]


def cross_attention_hook(runtime: BiasSource, module: nn.Module):
    pos = _mask_position(module)

    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        bias = runtime.cross_bias()
        if bias is None:
            return None
        hs = args[0] if args else kwargs["hidden_states"]
        b, n = bias.shape
        kv = kwargs.get("key_value_states", kwargs.get("encoder_hidden_states"))
        if isinstance(kv, torch.Tensor) and kv.shape[-2] != n:
            raise TokenThinError(
                f"the decoder reads {kv.shape[-2]} encoder tokens but the last encoder call produced {n}; "
                "pass the encoder's inputs (pixel_values, input_features; not precomputed encoder_outputs) while "
                "tokenthin is applied"
            )
        if hs.shape[0] != b:
            if hs.shape[0] % b:
                raise TokenThinError(
                    f"decoder batch {hs.shape[0]} is not a multiple of the last encoder batch {b}; run the encoder "
                    "and the decoder on the same images"
                )
            bias = bias.repeat_interleave(hs.shape[0] // b, dim=0)
        dtype = hs.dtype
        mask = bias.to(dtype).clamp_min(torch.finfo(dtype).min / 2).view(bias.shape[0], 1, 1, n)
        if pos is not None and len(args) > pos:
            if args[pos] is not None:
                raise TokenThinError("tokenthin cannot combine a caller-supplied encoder_attention_mask with merging")
            return (*args[:pos], mask, *args[pos + 1 :]), kwargs
        if kwargs.get("attention_mask") is not None:
            raise TokenThinError("tokenthin cannot combine a caller-supplied encoder_attention_mask with merging")
        return args, {**kwargs, "attention_mask": mask}

    return pre
