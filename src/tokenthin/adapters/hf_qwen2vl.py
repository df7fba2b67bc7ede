"""Qwen2-VL / Qwen2.5-VL hosts (``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration`` and
their ``*Model``: ``visual`` + ``language_model``, multimodal rotary positions). The seams every Hugging Face
vision-language host shares are in :mod:`tokenthin.adapters.hf_vlm`; the tower here is called with ``grid_thw``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .hf_vlm import VLMAdapter
from .hf_vlm_tokens import ImageLayout
from .registry import register


@register
class HFQwen2VLAdapter(VLMAdapter):
    name = "hf_qwen2vl"
    priority = 30
    sites = frozenset({"output", "llm", "output+llm"})  # the fused, packed tower: no sites or signals inside it
    signals = frozenset()
    """Qwen2-VL / Qwen2.5-VL: a patch-merging vision tower (no [CLS]) and multimodal rotary positions (temporal,
    height, width). Kept visual tokens keep their original 3-D positions at every site, so a shorter prompt is
    *not* renumbered (the positions of the text after the image and of generated tokens stay as the model computed
    them from the full prompt). The tower's attention is not captured (fused qkv, packed images): methods here
    read the visual tokens themselves or the language model's attention."""

    families = (
        "Hugging Face Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration (and their *Model), "
        "with generate() and its KV cache"
    )
    shift_positions = False

    def __init__(self, top: nn.Module, root: nn.Module) -> None:
        super().__init__(top, root, root.visual)
        vcfg = self.config.vision_config
        self.merge = int(getattr(vcfg, "spatial_merge_size", 2))
        blocks = getattr(root.visual, "blocks", None)
        self.vision_layers = len(blocks) if isinstance(blocks, nn.ModuleList) else 1
        self.feature_layer = self.vision_layers - 1

    @classmethod
    def detect(cls, model: nn.Module) -> HFQwen2VLAdapter | None:
        for m in model.modules():
            if not all(isinstance(getattr(m, a, None), nn.Module) for a in ("visual", "language_model")):
                continue
            cfg = getattr(m, "config", None)
            vcfg = getattr(cfg, "vision_config", None)
            if vcfg is None or not hasattr(vcfg, "spatial_merge_size") or not hasattr(cfg, "image_token_id"):
                continue
            return cls(model, m)
        return None

    def layout(self, args: tuple, kwargs: dict[str, Any]) -> ImageLayout:
        thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if not isinstance(thw, torch.Tensor):
            raise UnsupportedModelError("the Qwen2-VL vision tower was called without grid_thw")
        out = []
        for t, h, w in thw.tolist():
            gh, gw = h // self.merge, w // self.merge
            out.append((t * gh * gw, (gh, gw)))
        return out
