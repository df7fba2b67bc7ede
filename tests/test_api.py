"""Public API: errors that name the fix, explain(), methods(), FLOPs solving, unmerge."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tokenthin
from tiny import build, outputs


def test_unknown_method_lists_known_ones() -> None:
    with pytest.raises(tokenthin.UnknownMethodError, match="Known methods: .*tome"):
        tokenthin.apply(build("vit"), "nope", r=2)


def test_unsupported_model_names_supported_families() -> None:
    with pytest.raises(tokenthin.UnsupportedModelError, match="Dinov2Model"):
        tokenthin.apply(nn.Linear(3, 3), "tome", r=2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 40}, "too large"),
        ({"r": [1, 2, 3, 4]}, "needs 2 values"),
        ({"keep": 0.0, "site": "output"}, r"\(0, 1\]"),
        ({"keep": 65, "site": "output"}, "out of range"),
        ({"keep": -3, "site": "output"}, "out of range"),
        ({"keep": 0.5}, "site 'layers' takes r= or flops="),
        ({}, "give exactly one budget"),
        ({"r": 2, "flops": 0.5}, "give exactly one budget"),
        ({"flops": 1.5}, r"\(0, 1\]"),
        ({"flops": 0.3}, "unreachable"),
    ],
)
def test_budget_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(tokenthin.BudgetError, match=match):
        tokenthin.apply(build("vit"), "tome", **kwargs)


def test_keep_larger_than_tokens_at_runtime(images: torch.Tensor) -> None:
    model = build("dinov2")  # interpolates position embeddings for any image size
    tokenthin.apply(model, "divprune", keep=60, site="output")
    with pytest.raises(tokenthin.BudgetError, match="this input has 16 patch tokens"):
        outputs(model, images[:, :, :16, :16])  # a smaller image than configured


def test_site_errors() -> None:
    with pytest.raises(tokenthin.SiteError, match="does not act at site 'layers'"):
        tokenthin.apply(build("vit"), "divprune", r=2, site="layers")
    with pytest.raises(tokenthin.SiteError, match="layer index must be in 0..2"):
        tokenthin.apply(build("vit"), "divprune", keep=0.5, site="layer:7")
    with pytest.raises(tokenthin.SiteError, match="unknown site"):
        tokenthin.apply(build("vit"), "divprune", keep=0.5, site="middle")


def test_applying_twice_errors_or_replaces(images: torch.Tensor) -> None:
    model = build("vit")
    tokenthin.apply(model, "tome", r=2)
    with pytest.raises(tokenthin.AlreadyAppliedError, match="remove"):
        tokenthin.apply(model, "tome", r=4)
    tokenthin.apply(model, "tome", r=4, replace=True)
    outputs(model, images)
    assert tokenthin.info(model).tokens_per_layer == [65, 61, 57]
    tokenthin.remove(model)
    with pytest.raises(tokenthin.NotAppliedError):
        tokenthin.remove(model)


def test_failed_apply_leaves_model_untouched(images: torch.Tensor) -> None:
    model = build("vit")
    ref = outputs(model, images)
    with pytest.raises(tokenthin.BudgetError):
        tokenthin.apply(model, "tome", r=100)
    assert not tokenthin.is_applied(model)
    assert torch.equal(outputs(model, images)["last_hidden_state"], ref["last_hidden_state"])


def test_unknown_method_parameter() -> None:
    with pytest.raises(tokenthin.TokenThinError, match="has no parameter"):
        tokenthin.apply(build("vit"), "tome", r=2, bogus=1)


def test_input_dtype_and_device_errors(images: torch.Tensor) -> None:
    model = build("vit")
    tokenthin.apply(model, "tome", r=2)
    with pytest.raises(tokenthin.InputMismatchError, match="float"):
        model(pixel_values=(images * 100).to(torch.uint8))
    with pytest.raises(tokenthin.InputMismatchError, match="move"):
        model(pixel_values=images.to("meta"))


def test_context_manager_removes_on_error(images: torch.Tensor) -> None:
    model = build("vit")
    with pytest.raises(RuntimeError), tokenthin.applied(model, "tome", r=2):
        raise RuntimeError("boom")
    assert not tokenthin.is_applied(model)


def test_methods_table() -> None:
    table = {m["name"]: m for m in tokenthin.methods()}
    assert {"tome", "divprune", "kcenter", "coverage", "random", "pool", "downsample"} <= set(table)
    assert table["tome"]["arxiv"] == "2210.09461"
    assert "layers" in table["tome"]["sites"]
    for m in table.values():
        assert m["paper"] and m["description"] and m["sites"]


def test_explain_lists_sites_and_plan() -> None:
    model = build("dinov2-reg")
    ex = tokenthin.explain(model)
    assert ex["protected_tokens"] == 3 and ex["layers"] == 3 and ex["tokens"] == 67
    assert "output" in ex["sites"] and "layer:2" in ex["sites"]
    assert any("q_proj" in t or ".query" in t for t in ex["touched_modules"])
    tokenthin.apply(model, "tome", flops=0.6)
    plan = tokenthin.explain(model)["applied"]
    assert abs(plan["flops_fraction"] - 0.6) < 0.08
    assert plan["tokens_per_layer"][0] == 67


# an 8x8 patch grid only downsamples to whole grids (7x7, 6x6, ...), so its tolerance is coarser
@pytest.mark.parametrize(
    ("method", "target", "tol"), [("tome", 0.7, 0.05), ("divprune", 0.5, 0.05), ("downsample", 0.4, 0.1)]
)
def test_flops_target_is_reached(method: str, target: float, tol: float) -> None:
    model = build("vit")
    tokenthin.apply(model, method, flops=target)
    assert abs(tokenthin.explain(model)["applied"]["flops_fraction"] - target) < tol


def test_unmerge_returns_full_grid(images: torch.Tensor) -> None:
    model = build("dinov2")
    ref = outputs(model, images)["last_hidden_state"]
    tokenthin.apply(model, "tome", r=8, unmerge=True)
    out = outputs(model, images)["last_hidden_state"]
    assert out.shape == ref.shape
    info = tokenthin.info(model)
    assert info.source.shape == (4, 65) and int(info.source.max()) < info.size.shape[1]
    # tokens merged together carry identical features after unmerge
    src = info.source[0]
    same = (src == src[5]).nonzero().flatten()
    assert torch.allclose(out[0, same], out[0, same[:1]].expand(len(same), -1))


def test_pool_unmerge_is_piecewise_constant(images: torch.Tensor) -> None:
    model = build("vit")
    tokenthin.apply(model, "pool", keep=16, site="output", unmerge=True)
    out = outputs(model, images)["last_hidden_state"][0, 1:].reshape(8, 8, -1)
    assert torch.equal(out[0, 0], out[1, 1]) and not torch.equal(out[0, 0], out[2, 2])


def test_tome_beyond_half_at_one_site_merges_in_rounds(images: torch.Tensor) -> None:
    """keep=5 of 64 patches at the output needs several bipartite rounds: exact count, batch == per sample."""
    model = build("dinov2")
    tokenthin.apply(model, "tome", keep=5, site="output")
    batched = outputs(model, images)["last_hidden_state"]
    info = tokenthin.info(model)
    assert info.kept == [6] * images.shape[0] and torch.all(info.size.sum(1) == 65)
    for i in range(images.shape[0]):
        single = outputs(model, images[i : i + 1])["last_hidden_state"]
        assert torch.allclose(batched[i : i + 1], single, atol=2e-5)


def test_attach_twice_installs_one_set_of_hooks(images: torch.Tensor) -> None:
    # a benchmark that re-attaches an attached runtime (interleaved timing) must not reduce every point twice
    model = build("dinov2")
    tokenthin.apply(model, "tome", r=2)
    rt = tokenthin.runtime_of(model)
    ref = outputs(model, images)["last_hidden_state"]
    n = len(rt.handles)
    rt.attach()
    assert len(rt.handles) == n
    assert torch.equal(outputs(model, images)["last_hidden_state"], ref)
    assert tokenthin.info(model).tokens_per_layer == [65, 63, 61]
    rt.detach()
    rt.attach()
    assert torch.equal(outputs(model, images)["last_hidden_state"], ref)
    tokenthin.remove(model)


def test_vlm_attach_twice_installs_one_set_of_hooks() -> None:
    from tiny_vlm import PROMPTS, batch, llava, pixels

    model = llava()
    ids, mask = batch([PROMPTS[0]])
    pv = pixels(1)
    tokenthin.apply(model, "fastervlm", keep=0.5)
    rt = tokenthin.runtime_of(model)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
        n = len(rt.handles)
        rt.attach()
        assert len(rt.handles) == n
        assert torch.equal(model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits, ref)
    tokenthin.remove(model)
