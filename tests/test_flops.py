"""Analytic FLOPs equal torch.utils.flop_counter on tiny models.

Eager attention is used here because the counter does not see the CPU SDPA kernel (it counts its matmuls as 0).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import tokenthin
from tiny import build
from tokenthin.adapters.registry import find_adapter
from tokenthin.flops import encoder_flops


def counted(model: torch.nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(pixel_values=x)
    return fc.get_total_flops()


@pytest.mark.parametrize("family", ["vit", "deit", "dinov2", "dinov2-reg", "clip-vision", "siglip"])
def test_analytic_equals_flop_counter_unreduced(family: str, images: torch.Tensor) -> None:
    model = build(family, "eager")
    a = find_adapter(model)
    n = (images.shape[-1] // a.patch[0]) ** 2
    analytic = encoder_flops([n + a.num_protected] * a.dims.num_layers, n, a.dims)
    assert counted(model, images[:1]) == analytic


@pytest.mark.parametrize(("method", "kwargs"), [("tome", {"r": 8}), ("divprune", {"keep": 0.25, "site": "layer:0"})])
def test_reduced_flops_match_token_counts(method: str, kwargs: dict, images: torch.Tensor) -> None:
    model = build("vit", "eager")
    tokenthin.apply(model, method, **kwargs)
    total = counted(model, images[:1])
    info = tokenthin.info(model)
    a = find_adapter(model)
    analytic = encoder_flops(info.tokens_per_layer, 64, a.dims, info.kept[0])
    # what the counter sees beyond the analytic model is tokenthin's own similarity matmuls: at most one
    # N x N x D product per reduction point
    points = sum(1 for a_, b_ in zip(info.tokens_per_layer, info.tokens_per_layer[1:]) if b_ < a_)
    assert analytic <= total <= analytic + points * 2 * 65 * 65 * 32
    plan = tokenthin.explain(model)["applied"]
    assert plan["tokens_per_layer"] == info.tokens_per_layer
