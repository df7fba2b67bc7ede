"""Every family x every method: the behaviour every method and adapter keeps (see DESIGN.md)."""

from __future__ import annotations

import pytest
import torch

import tokenthin
from tiny import FAMILIES, build, max_diff, outputs
from tokenthin.methods.base import all_methods

CALIBRATING = {"dtome"}  # tested with calibration images in their own file
ENCODER_SITES = {"layers", "layer", "output", "input"}  # methods that only act inside a language model: test_vlm*.py
METHODS = [
    n
    for n, c in all_methods().items()
    if n not in CALIBRATING and ENCODER_SITES & set(c.sites) and not c.needs_prompt  # prompt readers: test_vlm*.py
]
NO_CLS = {"siglip"}


def needs_cls(method: str) -> bool:
    return "cls_attn" in all_methods()[method].signals


def zero_budget(method: str) -> dict:
    kind = all_methods()[method].kind
    return {"r": 0} if kind == "merge" else {"keep": 1.0}


def reduced_budget(method: str) -> dict:
    cls = all_methods()[method]
    if cls.kind == "merge" and "layers" in cls.sites:
        return {"r": 4}
    if cls.kind == "input":
        return {"keep": 0.25}
    return {"keep": 0.25, "site": "layer:0"}


def skip_unsupported(family: str, method: str) -> None:
    if family in NO_CLS and needs_cls(method):
        pytest.skip("needs a [CLS] token; error path tested separately")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_zero_budget_is_identity(family: str, method: str, images: torch.Tensor) -> None:
    skip_unsupported(family, method)
    model = build(family)
    ref = outputs(model, images)
    with tokenthin.applied(model, method, **zero_budget(method)):
        got = outputs(model, images)
    assert max_diff(ref, got) <= 1e-5


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_remove_restores_exactly(family: str, method: str, images: torch.Tensor) -> None:
    skip_unsupported(family, method)
    model = build(family)
    ref = outputs(model, images)
    tokenthin.apply(model, method, **reduced_budget(method))
    reduced = outputs(model, images)
    tokenthin.remove(model)
    assert max_diff(ref, outputs(model, images)) == 0.0
    assert not tokenthin.is_applied(model)
    if "last_hidden_state" in ref:  # the reduction really changed something
        assert reduced["last_hidden_state"].shape[1] < ref["last_hidden_state"].shape[1]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_single(family: str, method: str, images: torch.Tensor) -> None:
    skip_unsupported(family, method)
    model = build(family)
    tokenthin.apply(model, method, **reduced_budget(method))
    batched = outputs(model, images)
    for i in range(images.shape[0]):
        single = outputs(model, images[i : i + 1])
        for key, v in single.items():
            assert torch.allclose(batched[key][i : i + 1], v, atol=2e-5, rtol=1e-4), (key, i)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_sdpa_equals_eager(family: str, method: str, images: torch.Tensor) -> None:
    skip_unsupported(family, method)
    sdpa = build(family, "sdpa")
    eager = build(family, "eager")
    eager.load_state_dict(sdpa.state_dict())
    for m in (sdpa, eager):
        tokenthin.apply(m, method, **reduced_budget(method))
    assert max_diff(outputs(sdpa, images), outputs(eager, images)) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["vit", "dinov2-reg", "clip", "siglip"])
def test_half_precision_runs(family: str, method: str, dtype: torch.dtype, images: torch.Tensor) -> None:
    skip_unsupported(family, method)
    model = build(family).to(dtype)
    ref = outputs(build(family), images)
    tokenthin.apply(model, method, **reduced_budget(method))
    got = outputs(model, images.to(dtype))
    for key, v in got.items():
        assert v.dtype == dtype and torch.isfinite(v).all(), key
        assert v.shape[0] == ref[key].shape[0]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["vit", "deit", "dinov2-reg", "siglip"])
def test_token_counts_match_budget(family: str, method: str, images: torch.Tensor) -> None:
    skip_unsupported(family, method)
    model = build(family)
    tokenthin.apply(model, method, **reduced_budget(method))
    outputs(model, images)
    info = tokenthin.info(model)
    protected = info.num_protected
    n_patches = info.grid[0] * info.grid[1]
    budget = reduced_budget(method)
    if "r" in budget:
        assert info.tokens_per_layer == [protected + n_patches - budget["r"] * i for i in range(3)]
        return
    keep = round(budget["keep"] * n_patches)
    if all_methods()[method].kind == "input":
        assert info.tokens_per_layer == [protected + keep] * 3
        return
    assert info.tokens_per_layer[0] == protected + n_patches
    assert set(info.kept) == {protected + keep}
    assert info.tokens_per_layer[1:] == [protected + keep] * 2


@pytest.mark.parametrize("method", [m for m in METHODS if needs_cls(m)])
def test_cls_methods_refuse_models_without_cls(method: str, images: torch.Tensor) -> None:
    model = build("siglip")
    tokenthin.apply(model, method, keep=0.5)
    with pytest.raises(tokenthin.TokenThinError, match="no \\[CLS\\] token"):
        outputs(model, images)
