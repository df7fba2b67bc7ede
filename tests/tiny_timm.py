"""Tiny random timm ``VisionTransformer`` models (no downloads) shared by the tests and the timm benchmark.

Every variant: 3 blocks, width 32, 4 heads, 32x32 images in 4x4 patches (an 8x8 grid), like tests/tiny.py.
``num_classes=0``: a call returns the pooled features. Random weights can be scaled up (``init_scale``) so that
the blocks do more work than timm's small init gives them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

IMAGE = 32
PATCH = 4
SIZE: dict[str, Any] = dict(
    img_size=IMAGE, patch_size=PATCH, embed_dim=32, depth=3, num_heads=4, mlp_ratio=2.0, num_classes=0
)

# name -> VisionTransformer keyword arguments on top of SIZE
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},  # class token, global_pool="token"
    "layerscale": dict(init_values=0.5),  # ls1 / ls2 with values far from 1 so skipping them shows
    "registers": dict(reg_tokens=2, no_embed_class=True, init_values=0.5),  # DINOv2-with-registers shape
    "avg": dict(class_token=False, global_pool="avg"),  # no class token, mean pool, fc_norm
    "map": dict(class_token=False, global_pool="map"),  # attention-pool head (SigLIP shape)
    "map-reg": dict(class_token=False, reg_tokens=1, global_pool="map", pool_include_prefix=True, init_values=0.5),
    "qknorm": dict(qk_norm=True),
    "dynamic": dict(dynamic_img_size=True),  # any input size (resampled position embeddings)
}


def vit(variant: str = "plain", *, seed: int = 0, fused: bool = True, init_scale: float = 1.0, **kw: Any) -> nn.Module:
    """A tiny random timm ViT in eval mode. ``fused``: SDPA (True) or timm's explicit softmax path (False)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(**{**SIZE, **VARIANTS[variant], **kw})
    if init_scale != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.mul_(init_scale)
    set_fused(model, fused)
    return model.eval()


def set_fused(model: nn.Module, on: bool) -> nn.Module:
    """Switch every timm attention module (blocks and attention-pool head) between SDPA and the explicit path."""
    for m in model.modules():
        if hasattr(m, "fused_attn") and hasattr(m, "num_heads"):
            m.fused_attn = on
    return model


def images(batch: int = 2, size: int | tuple[int, int] = IMAGE, seed: int = 1) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, h, w, generator=g)


FAMILIES: dict[str, Callable[..., nn.Module]] = {
    f"timm-{name}": (lambda name=name, **kw: vit(name, **kw)) for name in VARIANTS
}
