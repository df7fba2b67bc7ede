"""timm VisionTransformer host: every encoder method x the tiny timm variants x the invariants of DESIGN.md."""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is not installed (pip install 'tokenthin[timm]')")

import tokenthin  # noqa: E402
from tiny_timm import VARIANTS, images, set_fused, vit  # noqa: E402
from tokenthin.methods.base import all_methods  # noqa: E402

METHODS = [
    n
    for n, c in all_methods().items()
    if n != "dtome" and {"layers", "layer", "output", "input"} & set(c.sites) and not c.needs_prompt
]
NO_CLS = {"avg", "map", "map-reg"}  # no class token (map-reg: a register leads; see the cls test below)
TOL = 1e-5


def needs_cls(method: str) -> bool:
    return "cls_attn" in all_methods()[method].signals


def zero_budget(method: str) -> dict:
    return {"r": 0} if all_methods()[method].kind == "merge" else {"keep": 1.0}


def reduced_budget(method: str) -> dict:
    c = all_methods()[method]
    if c.kind == "merge" and "layers" in c.sites:
        return {"r": 4}
    if c.kind == "input":
        return {"keep": 0.25}
    return {"keep": 0.25, "site": "layer:0"}


def build(variant: str, method: str, **kw) -> torch.nn.Module:
    if variant in NO_CLS and needs_cls(method):
        pytest.skip("needs a class token")
    if all_methods()[method].kind == "input":
        kw.setdefault("dynamic_img_size", True)  # the input site feeds a smaller image
    return vit(variant, **kw)


def run(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled features, the final tokens the head read)."""
    seen: list[torch.Tensor] = []
    h = model.norm.register_forward_hook(lambda _m, _a, out: seen.append(out))
    try:
        with torch.no_grad():
            pooled = model(x)
    finally:
        h.remove()
    return pooled, seen[-1]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_budget_is_identity(variant: str, method: str) -> None:
    model, x = build(variant, method), images(3)
    ref = run(model, x)
    with tokenthin.applied(model, method, **zero_budget(method)):
        got = run(model, x)
    for a, b in zip(ref, got):
        assert a.shape == b.shape and (a - b).abs().max() <= TOL


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_reduces_and_remove_restores_exactly(variant: str, method: str) -> None:
    model, x = build(variant, method), images(3)
    ref_pooled, ref_tokens = run(model, x)
    tokenthin.apply(model, method, **reduced_budget(method))
    pooled, tokens = run(model, x)
    assert tokens.shape[1] < ref_tokens.shape[1] and torch.isfinite(pooled).all()
    assert pooled.shape == ref_pooled.shape
    tokenthin.remove(model)
    again = run(model, x)
    assert torch.equal(again[0], ref_pooled) and torch.equal(again[1], ref_tokens)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("variant", ["plain", "registers", "avg", "map-reg"])
def test_batch_equals_single(variant: str, method: str) -> None:
    model, x = build(variant, method), images(3)
    tokenthin.apply(model, method, **reduced_budget(method))
    batched = run(model, x)[0]
    for i in range(x.shape[0]):
        assert torch.allclose(batched[i : i + 1], run(model, x[i : i + 1])[0], atol=2e-5, rtol=1e-4), i


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("variant", ["plain", "layerscale", "map", "avg"])
def test_fused_attn_equals_explicit(variant: str, method: str) -> None:
    fused, explicit = build(variant, method, fused=True), build(variant, method, fused=False)
    x = images(3)
    for m in (fused, explicit):
        tokenthin.apply(m, method, **reduced_budget(method))
    assert (run(fused, x)[0] - run(explicit, x)[0]).abs().max() <= 1e-4


@pytest.mark.parametrize("variant", ["avg", "map", "registers"])
def test_dynamic_counts_pad_and_mask(variant: str) -> None:
    """dtome keeps different counts per image: padding goes through attn_mask, the avg pool and the map head."""
    model, x = vit(variant), images(4)
    tokenthin.apply(model, "dtome", r=6, calibration=images(8, seed=3))
    batched = run(model, x)[0]
    info = tokenthin.info(model)
    assert len(set(info.kept)) > 1 and info.valid is not None
    for i in range(x.shape[0]):
        assert torch.allclose(batched[i : i + 1], run(model, x[i : i + 1])[0], atol=2e-5, rtol=1e-4), i


def test_avg_pool_is_size_weighted() -> None:
    """With merging, the head's mean counts each token by its size: equal to a hand-computed weighted mean."""
    model, x = vit("avg"), images(2)
    tokenthin.apply(model, "tome", r=6)
    pooled, tokens = run(model, x)
    size = tokenthin.info(model).size
    want = model.fc_norm((tokens * size.unsqueeze(-1)).sum(1) / size.sum(1, keepdim=True))
    plain = model.fc_norm(tokens.mean(1))
    assert torch.allclose(pooled, want, atol=1e-6) and not torch.allclose(pooled, plain, atol=1e-4)


def test_map_head_gets_the_key_bias() -> None:
    model, x = vit("map"), images(2)
    tokenthin.apply(model, "tome", r=6)
    seen: list = []
    h = model.attn_pool.register_forward_pre_hook(lambda _m, a, kw: seen.append(kw.get("attn_mask")), with_kwargs=True)
    run(model, x)
    h.remove()
    size = tokenthin.info(model).size
    assert seen[0] is not None and torch.allclose(seen[0].view(2, -1), size.log())


def test_layerscale_and_registers_are_kept() -> None:
    """Registers never merge; LayerScale runs inside the untouched block (r=0 is exact, r>0 stays close)."""
    model, x = vit("registers"), images(2)
    ref = run(model, x)[0]
    tokenthin.apply(model, "tome", r=6)
    pooled, _ = run(model, x)
    info = tokenthin.info(model)
    assert info.num_protected == 3 and (info.size[:, :3] == 1).all()
    assert (info.source[:, :3] == torch.arange(3)).all()
    assert torch.nn.functional.cosine_similarity(pooled, ref).min() > 0.9


def test_dynamic_img_size_reads_the_grid_per_call() -> None:
    model = vit("dynamic")
    tokenthin.apply(model, "tome", r=4)
    for hw in ((32, 32), (24, 40)):
        run(model, images(2, hw))
        info = tokenthin.info(model)
        assert info.grid == (hw[0] // 4, hw[1] // 4)
        assert info.tokens_per_layer[0] == 1 + info.grid[0] * info.grid[1]


def test_registered_detected_and_explained() -> None:
    from tokenthin.adapters.registry import all_adapters, find_adapter

    assert "timm_vit" in [a.name for a in all_adapters()]
    model = vit("map")
    assert type(find_adapter(model)).__name__ == "TimmViTAdapter"
    tokenthin.apply(model, "tome", r=4)
    ex = tokenthin.explain(model)
    assert ex["adapter"] == "TimmViTAdapter" and ex["protected_tokens"] == 0 and ex["patch_grid"] == (8, 8)
    assert any("attn_pool" in t for t in ex["touched_modules"]) and ex["host"]["global_pool"] == "map"
    assert ex["applied"]["tokens_per_layer"] == [64, 60, 56]


def test_timm_is_not_imported_by_tokenthin() -> None:
    import subprocess
    import sys

    code = "import sys, tokenthin, tokenthin.adapters.registry as r; r.all_adapters(); print('timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_direct_forward_features_warns_and_runs_unreduced() -> None:
    model, x = vit("plain"), images(2)
    ref = model.forward_features(x)
    tokenthin.apply(model, "tome", r=4)
    with pytest.warns(UserWarning, match="forward_features"), torch.no_grad():
        got = model.forward_features(x)
    assert torch.equal(got, ref)


def test_unmerge_returns_every_token() -> None:
    model, x = vit("plain", global_pool=""), images(2)
    with torch.no_grad():
        ref = model(x)
    tokenthin.apply(model, "tome", r=4, unmerge=True)
    with torch.no_grad():
        got = model(x)
    assert got.shape == ref.shape and torch.nn.functional.cosine_similarity(got, ref, dim=-1).mean() > 0.9


def test_caller_attn_mask_is_refused() -> None:
    model, x = vit("plain"), images(2)
    tokenthin.apply(model, "tome", r=4)
    with pytest.raises(tokenthin.TokenThinError, match="attn_mask"):
        model(x, attn_mask=torch.zeros(2, 1, 65, 65))


def test_prr_pool_is_refused() -> None:
    model = vit("plain", global_pool="prr")
    with pytest.raises(tokenthin.UnsupportedModelError, match="prr"):
        tokenthin.apply(model, "tome", r=4)


def test_input_site_needs_dynamic_img_size() -> None:
    model = vit("plain")
    tokenthin.apply(model, "downsample", keep=0.25)
    with pytest.raises(tokenthin.TokenThinError, match="dynamic_img_size=True"):
        run(model, images(1))


def test_fused_toggle_helper() -> None:
    model = set_fused(vit("map"), False)
    assert not any(getattr(m, "fused_attn", False) for m in model.modules())


@pytest.mark.parametrize("method", [m for m in METHODS if needs_cls(m) and m != "visionzip"])
@pytest.mark.parametrize("variant", ["avg", "map-reg"])  # map-reg: a register is protected but is no [CLS]
def test_cls_methods_refuse_models_without_class_token(method: str, variant: str) -> None:
    model = vit(variant)
    tokenthin.apply(model, method, keep=0.5)
    with pytest.raises(tokenthin.TokenThinError, match="no \\[CLS\\] token"):
        run(model, images(2))


def test_block_site_on_timm() -> None:
    """Site block through the contract's default layer seams: identity at keep 1, full token count out."""
    model = vit("layerscale").eval()
    x = images()
    with torch.no_grad():
        ref = model(x)
        with tokenthin.applied(model, "tome", keep=1.0, site="block"):
            assert (model(x) - ref).abs().max() <= 1e-5
        with tokenthin.applied(model, "tome", keep=0.5, site="block"):
            out = model(x)
            assert out.shape == ref.shape and 0 < (out - ref).abs().max() < float("inf")
            assert max(tokenthin.info(model).tokens_per_layer) < tokenthin.explain(model)["tokens"]
