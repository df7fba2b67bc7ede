"""Reduction inside a LLaVA vision tower (sites 'layers' / 'layer:k', budgets r / keep / flops): the tower merges or
prunes, its features are scattered back for the host and collapsed to one token per slot before the language
model."""

from __future__ import annotations

import pytest
import torch

import tokenthin
from tiny_vlm import PROMPTS, TPI, batch, generate, llava, pixels, qwen
from tokenthin.errors import BudgetError, SiteError

CASES = [
    ("tome", {"r": 3}),
    ("pitome", {"r": 2, "site": "layers"}),
    ("divprune", {"keep": 0.5, "site": "layer:0"}),
]


@pytest.fixture(scope="module")
def model():
    return llava()  # 3 tower layers; LLaVA reads layer 1's output, so the tower may reduce after layer 0


@pytest.fixture(scope="module")
def inputs():
    ids, mask = batch(PROMPTS)
    return ids, mask, pixels(3)


def test_zero_budget_is_identical(model, inputs):
    ids, mask, pv = inputs
    ref = generate(model, ids, mask, pv)
    with tokenthin.applied(model, "tome", r=0):
        toks, logits = generate(model, ids, mask, pv)
    assert torch.equal(toks, ref[0]) and (logits - ref[1]).abs().max() < 1e-5


@pytest.mark.parametrize(("method", "budget"), CASES)
def test_batch_equals_singles_and_cache(model, inputs, method, budget):
    ids, mask, pv = inputs
    with tokenthin.applied(model, method, **budget):
        toks, logits = generate(model, ids, mask, pv)
        kept = tokenthin.info(model).kept
        again = generate(model, ids, mask, pv, use_cache=False)
        for i, p in enumerate(PROMPTS):
            t1, l1 = generate(model, torch.tensor([p]), None, pv[i : i + 1])
            n = t1.shape[1]  # a single prompt may stop early at EOS
            assert torch.equal(t1[0], toks[i, :n]) and (l1[0] - logits[i, :n]).abs().max() < 1e-4
    assert torch.equal(again[0], toks) and (again[1] - logits).abs().max() < 1e-4
    assert len(set(kept)) == 1 and kept[0] < TPI


def test_token_counts_and_explain(model, inputs):
    ids, mask, pv = inputs
    with tokenthin.applied(model, "tome", r=3):
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pv)
        assert tokenthin.info(model).kept == [TPI - 3] * 3  # one merge point (after tower layer 0)
        assert out.logits.shape[1] == ids.shape[1] - 3
        assert tokenthin.explain(model)["applied"]["schedule"] == "site=layers r=[3, 0]"


def test_sdpa_equals_eager(inputs):
    ids, mask, pv = inputs
    res = []
    for attn in ("sdpa", "eager"):
        m = llava(attn)
        with tokenthin.applied(m, "tome", r=4):
            res.append(generate(m, ids, mask, pv))
    assert torch.equal(res[0][0], res[1][0]) and (res[0][1] - res[1][1]).abs().max() < 1e-4


def test_errors(model):
    with pytest.raises(SiteError, match="reads"):
        tokenthin.apply(model, "divprune", keep=0.5, site="layer:1")
    with pytest.raises(BudgetError, match="keep="):
        tokenthin.apply(model, "fastervlm", r=2, site="output")
    with pytest.raises(BudgetError, match="prunes once"):
        tokenthin.apply(model, "fastervlm", r=2)
    with pytest.raises(BudgetError, match="flops="):
        tokenthin.apply(model, "tome", flops=0.5)
    with pytest.raises(SiteError, match="tower"):
        tokenthin.apply(qwen("2"), "tome", r=2)
    assert not tokenthin.is_applied(model)


def test_llava_next_tower_merging_batch_equals_singles():
    from tiny_vlm import llava_next, next_inputs, next_single, ngenerate

    m = llava_next()
    inp = next_inputs(m)
    with tokenthin.applied(m, "tome", r=3):
        toks, logits = ngenerate(m, inp, new=4)
        info = tokenthin.info(m)
        for i in range(3):
            t1, l1 = ngenerate(m, next_single(inp, i), new=4)
            n = t1.shape[1]
            assert torch.equal(t1[0], toks[i, :n]) and (l1[0] - logits[i, :n]).abs().max() < 1e-4
    assert all(k < v for k, v in zip(info.kept, info.visual_tokens))
