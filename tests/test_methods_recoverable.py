"""Recoverable Compression (arXiv 2409.01179): visual pruning, text-guided recovery, merging of the rest."""

from __future__ import annotations

import pytest
import torch

import tokenthin
from tiny_vlm import PROMPTS, TPI, batch, generate, llava, pixels
from tokenthin.errors import TokenThinError, UnsupportedModelError
from tokenthin.methods.base import ReduceInput, SignalSource
from tokenthin.methods.recoverable import Recoverable


class _Cls(SignalSource):
    has_cls = True

    def __init__(self, score: torch.Tensor) -> None:
        self.score = score

    def cls_attention(self, layer: int) -> torch.Tensor:
        return self.score


def test_plan_matches_a_per_token_reference():
    g = torch.Generator().manual_seed(0)
    n, k = 10, 4
    x = torch.randn(1, n, 6, generator=g)
    text = torch.randn(1, 3, 6, generator=g)
    score = torch.rand(1, n, generator=g)
    inp = ReduceInput(
        x=x,
        size=torch.ones(1, n),
        valid=torch.ones(1, n, dtype=torch.bool),
        num_protected=0,
        layer=0,
        num_layers=1,
        grid=(2, 5),
        pristine=True,
        signals=_Cls(score),
        text=text,
        text_valid=torch.ones(1, 3, dtype=torch.bool),
    )
    keep, target = Recoverable().reduce(inp, torch.tensor([k]))
    cos = torch.nn.functional.cosine_similarity
    visual = sorted(range(n), key=lambda i: (-float(score[0, i]), i))[: k // 2]
    rel = {i: max(float(cos(x[0, i], t, dim=0)) for t in text[0]) for i in range(n) if i not in visual}
    recovered = sorted(rel, key=lambda i: (-rel[i], i))[: k - k // 2]
    kept = sorted(visual + recovered)
    assert keep[0].nonzero().flatten().tolist() == kept
    for i in range(n):
        if i in kept:
            assert target[0, i] == -1
        else:
            sims = [float(cos(x[0, i], x[0, j], dim=0)) for j in kept]
            assert int(target[0, i]) == kept[sims.index(max(sims))]


def test_zero_budget_batch_equals_singles_and_sizes(tmp_path):
    m = llava()
    ids, mask = batch(PROMPTS)
    pv = pixels(3)
    ref = generate(m, ids, mask, pv)
    with tokenthin.applied(m, "recoverable", keep=1.0):
        z = generate(m, ids, mask, pv)
    assert torch.equal(z[0], ref[0]) and (z[1] - ref[1]).abs().max() < 1e-5
    with tokenthin.applied(m, "recoverable", keep=0.25):
        toks, logits = generate(m, ids, mask, pv)
        info = tokenthin.info(m)
        for i, p in enumerate(PROMPTS):
            t1, l1 = generate(m, torch.tensor([p]), None, pv[i : i + 1])
            assert torch.equal(t1[0], toks[i]) and (l1[0] - logits[i]).abs().max() < 1e-4
    assert info.kept == [TPI // 4] * 3
    assert (info.size.sum(1) == TPI).all()  # nothing dropped: every token merged into a survivor


def test_errors():
    from tiny import build

    with pytest.raises(TokenThinError, match="visual_share"):
        Recoverable(visual_share=2)
    with pytest.raises(TokenThinError, match="score"):
        Recoverable(score="max")
    with pytest.raises(UnsupportedModelError, match="vision-language model"):
        tokenthin.apply(build("vit"), "recoverable", keep=0.5)
