"""Tiny random models from config classes (no downloads) shared by the tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

IMAGE = 32
PATCH = 4


# one tiny size for every family: 3 layers, hidden 32, 4 heads, an 8x8 patch grid
SIZE = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, image_size=IMAGE, patch_size=PATCH)
MLP = dict(intermediate_size=64)


def _vit(attn: str) -> nn.Module:
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(**SIZE, **MLP, attn_implementation=attn))


def _vit_cls(attn: str) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(**SIZE, **MLP, num_labels=5, attn_implementation=attn))


def _deit(attn: str) -> nn.Module:
    from transformers import DeiTConfig, DeiTModel

    return DeiTModel(DeiTConfig(**SIZE, **MLP, attn_implementation=attn))


def _dinov2(attn: str) -> nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    return Dinov2Model(Dinov2Config(**SIZE, mlp_ratio=2, attn_implementation=attn))


def _dinov2_reg(attn: str) -> nn.Module:
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    cfg = Dinov2WithRegistersConfig(**SIZE, mlp_ratio=2, num_register_tokens=2, attn_implementation=attn)
    return Dinov2WithRegistersModel(cfg)


def _clip_vision(attn: str) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(CLIPVisionConfig(**SIZE, **MLP, attn_implementation=attn))


def _clip(attn: str) -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100)
    cfg = CLIPConfig(vision_config={**SIZE, **MLP}, text_config=text, projection_dim=16, attn_implementation=attn)
    return CLIPModel(cfg)


def _siglip(attn: str) -> nn.Module:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    return SiglipVisionModel(SiglipVisionConfig(**SIZE, **MLP, attn_implementation=attn))


FAMILIES: dict[str, Callable[[str], nn.Module]] = {
    "vit": _vit,
    "vit-cls": _vit_cls,
    "deit": _deit,
    "dinov2": _dinov2,
    "dinov2-reg": _dinov2_reg,
    "clip-vision": _clip_vision,
    "clip": _clip,
    "siglip": _siglip,
}


def build(family: str, attn: str = "sdpa", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return FAMILIES[family](attn).eval()


def outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every tensor output worth comparing, for any family."""
    with torch.no_grad():
        if hasattr(model, "get_image_features"):
            feats = model.get_image_features(pixel_values=x)
            feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
            return {"features": feats}
        out = model(pixel_values=x)
    res = {}
    for key in ("last_hidden_state", "pooler_output", "logits"):
        v = getattr(out, key, None)
        if isinstance(v, torch.Tensor):
            res[key] = v
    return res


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        assert a[k].shape == b[k].shape, (k, a[k].shape, b[k].shape)
        worst = max(worst, (a[k].float() - b[k].float()).abs().max().item())
    return worst
