"""Tiny random models from config classes (no downloads) shared by the tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

IMAGE = 32
PATCH = 4


def _vit(attn: str) -> nn.Module:
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=IMAGE,
        patch_size=PATCH,
        attn_implementation=attn,
    )
    return ViTModel(cfg)


def _vit_cls(attn: str) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=IMAGE,
        patch_size=PATCH,
        num_labels=5,
        attn_implementation=attn,
    )
    return ViTForImageClassification(cfg)


def _deit(attn: str) -> nn.Module:
    from transformers import DeiTConfig, DeiTModel

    cfg = DeiTConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=IMAGE,
        patch_size=PATCH,
        attn_implementation=attn,
    )
    return DeiTModel(cfg)


def _dinov2(attn: str) -> nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        mlp_ratio=2,
        image_size=IMAGE,
        patch_size=PATCH,
        attn_implementation=attn,
    )
    return Dinov2Model(cfg)


def _dinov2_reg(attn: str) -> nn.Module:
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    cfg = Dinov2WithRegistersConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        mlp_ratio=2,
        image_size=IMAGE,
        patch_size=PATCH,
        num_register_tokens=2,
        attn_implementation=attn,
    )
    return Dinov2WithRegistersModel(cfg)


def _clip_vision(attn: str) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=IMAGE,
        patch_size=PATCH,
        attn_implementation=attn,
    )
    return CLIPVisionModel(cfg)


def _clip(attn: str) -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    vision = dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=IMAGE,
        patch_size=PATCH,
    )
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100)
    cfg = CLIPConfig(vision_config=vision, text_config=text, projection_dim=16, attn_implementation=attn)
    return CLIPModel(cfg)


def _siglip(attn: str) -> nn.Module:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=IMAGE,
        patch_size=PATCH,
        attn_implementation=attn,
    )
    return SiglipVisionModel(cfg)


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
