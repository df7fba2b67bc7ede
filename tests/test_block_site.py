"""Site ``block``: merge a layer's input, compute on fewer tokens, hand every token its slot's update."""

from __future__ import annotations

import pytest
import torch

import tokenthin
from tiny import build, max_diff, outputs
from tokenthin.adapters.registry import find_adapter


def test_zero_budget_is_identity(images: torch.Tensor) -> None:
    model = build("vit")
    ref = outputs(model, images)
    with tokenthin.applied(model, "tome", keep=1.0, site="block"):
        assert max_diff(ref, outputs(model, images)) <= 1e-5


@pytest.mark.parametrize("method", ["tome", "random", "pool"])
def test_blocks_compute_on_fewer_tokens_and_hand_on_all(method: str, images: torch.Tensor) -> None:
    model = build("dinov2")
    ref = outputs(model, images)
    with tokenthin.applied(model, method, keep=0.5, site="block"):
        got = outputs(model, images)
        info = tokenthin.info(model)
        # every layer computed on half the patches (pool: on the largest grid of at most half)
        assert info.tokens_per_layer == [1 + 32] * 3 or (method == "pool" and max(info.tokens_per_layer) <= 33)
        assert got["last_hidden_state"].shape == ref["last_hidden_state"].shape  # ... and handed on all of them
        assert 0 < max_diff(ref, got) < float("inf")
        batched = got["last_hidden_state"]
        for i in range(images.shape[0]):
            single = outputs(model, images[i : i + 1])["last_hidden_state"]
            assert torch.allclose(single[0], batched[i], atol=1e-5)
    assert max_diff(ref, outputs(model, images)) == 0.0


def test_pruned_tokens_skip_the_block_and_kept_ones_compute() -> None:
    model = build("vit")
    x = torch.randn(1, 3, 32, 32)
    a = find_adapter(model)
    seen: dict[str, torch.Tensor] = {}
    tokenthin.apply(model, "random", keep=0.5, site="block:0")
    hooks = [
        a.root.embeddings.register_forward_hook(lambda _m, _a, o: seen.update(inp=o)),
        a.layers[0].register_forward_hook(lambda _m, _a, o: seen.update(out=o[0] if isinstance(o, tuple) else o)),
    ]
    with torch.no_grad():
        model(pixel_values=x)
    for h in hooks:
        h.remove()
    assert tokenthin.info(model).tokens_per_layer == [33, 65, 65]
    same = (seen["out"] == seen["inp"]).all(-1)[0]  # a pruned token's residual stream passes the block unchanged
    assert int(same.sum()) == 32 and not bool(same[0])  # 32 of 64 patches pruned; [CLS] always computes


def test_sdpa_equals_eager(images: torch.Tensor) -> None:
    got = []
    for attn in ("sdpa", "eager"):
        model = build("vit", attn=attn)
        with tokenthin.applied(model, "tome", keep=0.5, site="block"):
            got.append(outputs(model, images))
    assert max_diff(*got) <= 1e-5


def test_flops_target_and_attention_methods_refused() -> None:
    model = build("vit")
    tokenthin.apply(model, "tome", flops=0.6, site="block")
    assert abs(tokenthin.explain(model)["applied"]["flops_fraction"] - 0.6) < 0.05
    tokenthin.remove(model)
    with pytest.raises(tokenthin.SiteError):
        tokenthin.apply(model, "fastervlm", keep=0.5, site="block")
