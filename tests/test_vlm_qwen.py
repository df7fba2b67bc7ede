"""Qwen2-VL and Qwen2.5-VL hosts: images of different sizes in one batch, multimodal rotary positions kept."""

from __future__ import annotations

import pytest
import torch

import tokenthin
from tiny_vlm import IMAGE_TOKEN, Q_PROMPTS, qgenerate, qwen, qwen_inputs, qwen_single
from tokenthin.errors import TokenThinError

CASES = [
    ("divprune", "output"),
    ("kcenter", "output"),
    ("coverage", "output"),
    ("pool", "output"),
    ("random", "output"),
    ("fastv", "llm:1"),
    ("random", "llm:2"),
]
TOKENS = [h * w for _, (h, w), _ in Q_PROMPTS]  # visual tokens per prompt: 4, 6, 6


@pytest.fixture(scope="module", params=["2", "2.5"])
def model(request):
    return qwen(request.param)


@pytest.fixture(scope="module")
def inputs():
    return qwen_inputs()


@pytest.fixture(scope="module")
def reference(model, inputs):
    return qgenerate(model, inputs)


@pytest.mark.parametrize(("method", "site"), CASES)
def test_zero_budget_and_batch_equals_singles(model, inputs, reference, method, site):
    with tokenthin.applied(model, method, keep=1.0, site=site):
        toks, logits = qgenerate(model, inputs)
    assert torch.equal(toks, reference[0]) and (logits - reference[1]).abs().max() < 1e-5
    with tokenthin.applied(model, method, keep=0.5, site=site):
        toks, logits = qgenerate(model, inputs)
        assert tokenthin.info(model).kept == [t // 2 for t in TOKENS]
        for i in range(3):
            t1, l1 = qgenerate(model, qwen_single(inputs, i))
            assert torch.equal(t1[0], toks[i]) and (l1[0] - logits[i]).abs().max() < 1e-4


@pytest.mark.parametrize(("method", "site"), [c for c in CASES if c[0] != "fastv"])
def test_cached_generation_equals_recomputing(model, inputs, method, site):
    with tokenthin.applied(model, method, keep=0.5, site=site):
        a = qgenerate(model, inputs, new=4)
        b = qgenerate(model, inputs, new=4, use_cache=False)
    assert torch.equal(a[0], b[0]) and (a[1] - b[1]).abs().max() < 1e-4


@pytest.mark.parametrize("site", ["output", "llm:1"])
def test_kept_tokens_keep_their_multimodal_positions(model, inputs, site):
    """The rotary angles a later layer applies to every surviving token equal the ones the untouched model
    applies to the same token (its (t, h, w) position): nothing is renumbered."""
    seen: list[torch.Tensor] = []
    layer = model.model.language_model.layers[2]

    def grab(_m, _a, kw):
        cos = kw["position_embeddings"][0]
        seen.append(cos if cos.dim() == 3 else cos.movedim(0, -2).flatten(-2))  # (B, T, d) either way

    with torch.no_grad():
        for reduce in (False, True):
            if reduce:
                tokenthin.apply(model, "random", keep=0.5, site=site)
            h = layer.register_forward_pre_hook(grab, with_kwargs=True)  # after tokenthin's own pre-hooks
            try:
                model(**inputs)
            finally:
                h.remove()
        src = tokenthin.info(model).source
        tokenthin.remove(model)
    full, reduced = seen
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    assert reduced.shape[1] < full.shape[1]
    for i in range(ids.shape[0]):
        vis = (ids[i] == IMAGE_TOKEN).nonzero().flatten()
        keep = mask[i].clone()
        keep[vis[src[i, : len(vis)] < 0]] = False
        expect = full[i, keep]
        assert torch.equal(reduced[i, -expect.shape[0] :], expect)


def test_sdpa_and_eager_agree(inputs):
    res = []
    for attn in ("sdpa", "eager"):
        m = qwen("2", attn)
        with tokenthin.applied(m, "fastv", keep=0.5, site="llm:1"):
            res.append(qgenerate(m, inputs))
    assert torch.equal(res[0][0], res[1][0]) and (res[0][1] - res[1][1]).abs().max() < 1e-4


def test_remove_restores_and_vision_signal_methods_refuse(model, inputs, reference):
    tokenthin.apply(model, "divprune", keep=2)
    qgenerate(model, inputs)
    tokenthin.remove(model)
    toks, logits = qgenerate(model, inputs)
    assert torch.equal(toks, reference[0]) and torch.equal(logits, reference[1])
    with pytest.raises(TokenThinError, match="vision tower"):
        tokenthin.apply(model, "fastervlm", keep=0.5)
    assert not tokenthin.is_applied(model)
    assert tokenthin.explain(model)["adapter"] == "HFQwen2VLAdapter"
