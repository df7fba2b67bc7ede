"""MMTok (arXiv 2508.18264): coverage of the prompt's text tokens and of the visual tokens."""

from __future__ import annotations

import math

import pytest
import torch

import tokenthin
from tiny_vlm import PROMPTS, TPI, batch, generate, llava, pixels
from tokenthin.errors import TokenThinError, UnsupportedModelError
from tokenthin.methods.base import ReduceInput, SignalSource
from tokenthin.methods.mmtok import MMTok


@pytest.fixture(scope="module")
def model():
    return llava()


def _reference(x, text, k, alpha=0.5, tt=0.02, tv=0.2) -> list[int]:
    """Per-token greedy on the written-out objective (one sample, every token a candidate)."""
    n = x.shape[0]

    def sims(refs, t):
        rows = []
        for r in refs:
            logits = [float(torch.nn.functional.cosine_similarity(r, x[i], dim=0)) / t for i in range(n)]
            m = max(logits)
            e = [math.exp(v - m) for v in logits]
            rows.append([v / sum(e) / len(refs) for v in e])
        return rows

    blocks = sims(text, tt) + [[alpha * v for v in row] for row in sims(x, tv)]
    cov = [0.0] * len(blocks)
    chosen: list[int] = []
    for _ in range(k):
        best, gain_best = -1, -1.0
        for i in range(n):
            if i in chosen:
                continue
            gain = sum(max(0.0, blocks[j][i] - cov[j]) for j in range(len(blocks)))
            if gain > gain_best + 1e-12:
                best, gain_best = i, gain
        chosen.append(best)
        cov = [max(cov[j], blocks[j][best]) for j in range(len(blocks))]
    return sorted(chosen)


def test_selection_matches_a_per_token_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 8, generator=g)
    text = torch.randn(2, 5, 8, generator=g)
    text_valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    inp = ReduceInput(
        x=x,
        size=torch.ones(2, 12),
        valid=torch.ones(2, 12, dtype=torch.bool),
        num_protected=0,
        layer=0,
        num_layers=1,
        grid=(3, 4),
        pristine=True,
        signals=SignalSource(),
        text=text,
        text_valid=text_valid,
    )
    keep, _ = MMTok().reduce(inp, torch.tensor([4, 4]))
    for b in range(2):
        expect = _reference(x[b], text[b, text_valid[b]], 4)
        assert keep[b].nonzero().flatten().tolist() == expect


def test_text_changes_the_selection(model):
    """Two prompts with the same image but different text keep different tokens."""
    pv = pixels(1).expand(2, -1, -1, -1)
    ids, mask = batch([PROMPTS[0], PROMPTS[2]])
    with tokenthin.applied(model, "mmtok", keep=4, text_temperature=0.002), torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=pv)
        src = tokenthin.info(model).source
    assert not torch.equal(src[0] >= 0, src[1] >= 0)


def test_zero_budget_and_batch_equals_singles(model):
    ids, mask = batch(PROMPTS)
    pv = pixels(3)
    ref = generate(model, ids, mask, pv)
    with tokenthin.applied(model, "mmtok", keep=1.0):
        z = generate(model, ids, mask, pv)
    assert torch.equal(z[0], ref[0]) and (z[1] - ref[1]).abs().max() < 1e-5
    with tokenthin.applied(model, "mmtok", keep=0.25):
        toks, logits = generate(model, ids, mask, pv)
        assert tokenthin.info(model).kept == [TPI // 4] * 3
        for i, p in enumerate(PROMPTS):
            t1, l1 = generate(model, torch.tensor([p]), None, pv[i : i + 1])
            assert torch.equal(t1[0], toks[i]) and (l1[0] - logits[i]).abs().max() < 1e-4


def test_errors():
    from tiny import build

    with pytest.raises(TokenThinError, match="alpha"):
        MMTok(alpha=-1)
    with pytest.raises(TokenThinError, match="text_temperature"):
        MMTok(text_temperature=0)
    with pytest.raises(UnsupportedModelError, match="vision-language model"):
        tokenthin.apply(build("vit"), "mmtok", keep=0.5)
