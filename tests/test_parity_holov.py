"""HoloV's ``official=True`` against a restatement of the released ``HoloV`` function (LLaVA-1.5 sizes), and the
language model reading its order."""

from __future__ import annotations

import math

import pytest
import torch

import tokenthin
from test_parity_official import D, N, inp_for, lm_reads, visual_part
from tiny_vlm import generate, llava, pixels, prompt
from tokenthin.methods.base import get
from tokenthin.ops import ordered


def holov_ref(x: torch.Tensor, att: torch.Tensor, parts: int, k: int, alpha: float = 0.09):
    """The released ``HoloV`` (``llava/model/utils.py``) for one image, restated: the tokens the language model
    reads, in its order, before the zero padding."""
    n = x.shape[0]
    size, extra = divmod(n, parts)
    crops, at = [], 0
    for p in range(parts):
        m = size + (1 if p < extra else 0)
        if m:
            crops.append(list(range(at, at + m)))
        at += m
    scores = []
    for c in crops:
        a = [float(att[i]) for i in c]
        if len(c) == 1:
            scores.append(a[0])
            continue
        f = [x[i].double() / (x[i].double().norm() + 1e-6) for i in c]
        var = []
        for u in range(len(c)):
            row = [0.0 if u == v else float(f[u] @ f[v]) for v in range(len(c))]
            mu = sum(row) / (len(c) - 1)
            var.append(sum((r - mu) ** 2 for r in row) / (len(c) - 1))
        a3 = [v * 1000.0 for v in a]
        scale = (sum(abs(v) for v in a3) / len(c)) / (sum(abs(v) for v in var) / len(c) + 1e-6)
        scores.append(sum(a3[u] + alpha * var[u] * scale for u in range(len(c))) / len(c))
    total = sum(scores) + 1e-6
    w = [s / total for s in scores]
    alloc = [math.floor(v * k) for v in w]
    for p in sorted(range(len(w)), key=lambda p: -w[p])[: k - sum(alloc)]:
        alloc[p] += 1
    out = []
    for c, m in zip(crops, alloc):
        if m >= len(c):
            out += c
        elif m > 0:
            out += sorted(c, key=lambda i: -float(att[i]))[:m]
    return out


@pytest.mark.parametrize(("keep", "parts", "peak"), [(64, 16, False), (128, 16, True), (64, 5, False)])
def test_holov_official_is_the_released_selection_and_order(keep, parts, peak):
    g = torch.Generator().manual_seed(keep + parts)
    b = 2
    x = torch.randn(b, N, D, generator=g)
    att = torch.rand(b, N, generator=g) * 1e-3
    if peak:  # one crop holds most of the attention: its share overflows and the released code drops the excess
        att[:, : N // parts] += 0.05
    inp = inp_for(x, att)
    plan = get("holov")(official=True, partitions=parts).reduce(inp, torch.full((b,), keep))
    out, _ = ordered.apply(x, inp.size, plan)
    for i in range(b):
        want = holov_ref(x[i], att[i], parts, keep)
        assert int(plan[0][i].sum()) == len(want) and (len(want) < keep) == peak
        assert torch.equal(out[i, : len(want)], x[i, want]), i


def test_holov_official_on_llava_reads_the_official_order():
    model = llava()
    ids = torch.tensor([prompt([5], [7, 8])])
    pv = pixels(1)
    with tokenthin.applied(model, "holov", keep=6, official=True, partitions=4):
        plans, embeds = lm_reads(model, lambda: generate(model, ids, None, pv, new=2))
    ((inp, plan),) = plans
    want, _ = ordered.apply(inp.x, inp.size, plan)
    n = int(plan[0].sum())
    order = plan.order[0][plan[0][0]]
    assert not bool((order[1:] >= order[:-1]).all()) or n == 0  # not positional here
    assert (visual_part(embeds[0], ids, n) - want[0, :n].to(embeds[0].dtype)).abs().max() < 1e-6


def test_holov_official_refuses_options_the_release_lacks():
    with pytest.raises(tokenthin.errors.TokenThinError, match="official=True"):
        get("holov")(official=True, split="views")
