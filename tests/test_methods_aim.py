"""AIM (arXiv 2412.03248): merging before the language model, progressive PageRank pruning inside it."""

from __future__ import annotations

import pytest
import torch

import tokenthin
from tiny_vlm import IMAGE_TOKEN, PROMPTS, TPI, batch, generate, llava, pixels
from tokenthin.errors import SiteError, TokenThinError, UnsupportedModelError
from tokenthin.methods.aim import AIM, pagerank


@pytest.fixture(scope="module")
def model():
    return llava()


@pytest.fixture(scope="module")
def inputs():
    ids, mask = batch(PROMPTS)
    return ids, mask, pixels(3)


def test_schedule_follows_the_papers_piecewise_linear_rule():
    assert AIM().llm_points(32) == [(13 + i, 1 - (i + 1) * 0.125) for i in range(8)]  # the released 32-layer rule
    assert AIM(start=1, step=0.5).llm_points(4) == [(1, 0.5), (2, 0.0)]
    assert AIM().llm_points(4) == [(2, 0.875)]  # start scaled to the depth: round(13/32 * 4) = 2


def test_pagerank_matches_a_per_head_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 6, generator=g)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    valid = torch.tensor([[True] * 6, [False, False, True, True, True, True]])
    allowed = causal[None] & valid[:, None, :]
    masked = logits.masked_fill(~allowed[:, None], float("-inf"))
    got = pagerank(masked, valid, tau=0.1, iters=5)
    for b in range(2):
        idx = valid[b].nonzero().flatten()
        heads = []
        for h in range(3):
            sub = logits[b, h][idx][:, idx]
            n = len(idx)
            m = torch.zeros(n, n)
            for i in range(n):
                row = sub[i, : i + 1] / 0.1
                m[i, : i + 1] = torch.softmax(row, 0)
            d = torch.full((n,), 1.0 / n)
            for _ in range(5):
                d = d @ m
            heads.append(d)
        expect = torch.stack(heads).pow(2).mean(0).sqrt()
        assert torch.allclose(got[b, idx], expect, atol=1e-6)
        assert (got[b, ~valid[b]] == 0).all()


def test_zero_budget_and_batch_equals_singles(model, inputs):
    ids, mask, pv = inputs
    ref = generate(model, ids, mask, pv)
    with tokenthin.applied(model, "aim", keep=1.0, start=2, step=1e-4):
        z = generate(model, ids, mask, pv)
    assert torch.equal(z[0], ref[0]) and (z[1] - ref[1]).abs().max() < 1e-5
    with tokenthin.applied(model, "aim", keep=0.5, start=0, step=0.25):
        toks, logits = generate(model, ids, mask, pv)
        info = tokenthin.info(model)
        assert info.kept == [2, 2, 2]  # 16 -> 8 merged, then 75/50/25% of 8 after layers 0, 1, 2
        assert info.sequence[1] == ids.shape[1] - TPI + 2
        for i, p in enumerate(PROMPTS):
            t1, l1 = generate(model, torch.tensor([p]), None, pv[i : i + 1])
            assert torch.equal(t1[0], toks[i]) and (l1[0] - logits[i]).abs().max() < 1e-4


def test_cached_generation_equals_the_reduced_recomputation(model, inputs):
    """Inside the language model AIM ranks by the whole prompt's attention; recomputing without the cache ranks
    the prompt plus generated tokens, so here the first decoded step is compared: the prompt-only forward."""
    ids, mask, pv = inputs
    with tokenthin.applied(model, "aim", keep=0.5, start=1, step=0.5):
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pv)
        _, logits = generate(model, ids, mask, pv, new=3)
    assert (out.logits[:, -1] - logits[:, 0]).abs().max() < 1e-5


def test_lm_attention_logits_match_eager_attentions():
    """The logits AIM ranks with give, after softmax, the eager attention map of that layer."""
    m = llava("eager")
    ids = torch.tensor([PROMPTS[0]])
    pv = pixels(1)
    with torch.no_grad():
        ref = m(input_ids=ids, pixel_values=pv, output_attentions=True).attentions[1][0]  # (H, T, T)
    grabbed = {}
    orig = AIM.reduce

    def spy(self, inp, keep):
        if inp.site == "llm":
            grabbed.setdefault(inp.layer, inp.signals.lm_attention_logits(inp.layer).softmax(-1)[0])
        return orig(self, inp, keep)

    AIM.reduce = spy
    try:
        with tokenthin.applied(m, "aim", keep=1.0, start=1, step=0.5), torch.no_grad():
            m(input_ids=ids, pixel_values=pv)
    finally:
        AIM.reduce = orig
    assert (ids == IMAGE_TOKEN).sum() == TPI
    assert torch.allclose(grabbed[1], ref, atol=1e-5)


def test_errors(model):
    with pytest.raises(SiteError, match="output\\+llm"):
        tokenthin.apply(model, "aim", keep=0.5, site="output")
    with pytest.raises(TokenThinError, match="step"):
        tokenthin.apply(model, "aim", keep=0.5, step=0)
    from tiny import build

    with pytest.raises(UnsupportedModelError):
        tokenthin.apply(build("vit"), "aim", keep=0.5)
