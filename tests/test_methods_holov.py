"""HoloV on the tiny LLaVA-NeXT (AnyRes) and LLaVA: zero budget, batch vs single, exact counts, the crop budgets and
selection against a per-token Python reference on hand-made features and scores, and parameter errors."""

from __future__ import annotations

import math

import pytest
import torch

import tokenthin
from test_methods_globalcom2 import Scores, budgets_ref
from tiny_vlm import PROMPTS, TPI, batch, generate, llava, llava_next, next_inputs, next_single, ngenerate, pixels
from tokenthin.errors import TokenThinError
from tokenthin.methods.base import ReduceInput, get


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def nxt():
    model = llava_next()
    inputs = next_inputs(model)
    return model, inputs, ngenerate(model, inputs)


@pytest.fixture(scope="module")
def plain():
    model = llava()
    ids, mask = batch(PROMPTS)
    pv = pixels(3)
    with torch.no_grad():
        ref = generate(model, ids, mask, pv)
    return model, (ids, mask, pv), ref


def test_zero_budget_generation_is_identical(nxt, plain):
    model, inputs, ref = nxt
    with tokenthin.applied(model, "holov", keep=1.0):
        toks, logits = ngenerate(model, inputs)
    assert torch.equal(toks, ref[0]) and (logits - ref[1]).abs().max() < 1e-5
    model, (ids, mask, pv), ref = plain
    with tokenthin.applied(model, "holov", keep=1.0):
        toks, logits = generate(model, ids, mask, pv)
        assert tokenthin.info(model).kept == [TPI] * 3
    assert torch.equal(toks, ref[0]) and (logits - ref[1]).abs().max() < 1e-5


@pytest.mark.parametrize(
    ("keep", "kw"), [(0.5, {}), (5, {"split": "views", "select": "holistic"}), (7, {"partitions": 3, "beta": 2.0})]
)
def test_anyres_batch_equals_single_runs_with_exact_counts(nxt, keep, kw):
    model, inputs, _ = nxt
    with tokenthin.applied(model, "holov", keep=keep, **kw):
        toks, logits = ngenerate(model, inputs)
        info = tokenthin.info(model)
        assert info.kept == [n // 2 if keep == 0.5 else keep for n in info.visual_tokens]
        for i in range(3):
            t1, l1 = ngenerate(model, next_single(inputs, i))
            assert torch.equal(t1[0], toks[i]) and (l1[0] - logits[i]).abs().max() < 1e-4


@pytest.mark.parametrize(("keep", "kw"), [(0.5, {}), (3, {"partitions": 4, "select": "holistic"})])
def test_plain_llava_batch_equals_singles(plain, keep, kw):
    model, (ids, mask, pv), _ = plain
    k = keep if isinstance(keep, int) else int(TPI * keep)
    with tokenthin.applied(model, "holov", keep=keep, **kw):
        toks, logits = generate(model, ids, mask, pv)
        assert tokenthin.info(model).kept == [k] * 3
        for i, p in enumerate(PROMPTS):
            t1, l1 = generate(model, torch.tensor([p]), None, pv[i : i + 1])
            assert torch.equal(t1[0], toks[i]) and (l1[0] - logits[i]).abs().max() < 1e-4


# ----- budgets and selection against a per-token Python reference -----


def holov_ref(x: list[list[float]], att: list[float], parts: list[list[int]], k: int, beta, power, select):
    def cos(i: int, j: int) -> float:
        dot = sum(a * b for a, b in zip(x[i], x[j]))
        return dot / max(math.sqrt(sum(a * a for a in x[i])) * math.sqrt(sum(b * b for b in x[j])), 1e-12)

    hol = [0.0] * len(att)
    weights = []
    for m in parts:
        var = {}
        for i in m:
            sims = [cos(i, j) for j in m if j != i]
            mu = sum(sims) / max(len(sims), 1)
            var[i] = sum((v - mu) ** 2 for v in sims) / max(len(sims), 1)
        if not m:
            weights.append(0.0)
            continue
        scale = (sum(att[i] for i in m) / len(m)) / (sum(var.values()) / len(m) + 1e-6)
        for i in m:
            hol[i] = att[i] + beta * var[i] * scale
        weights.append((sum(hol[i] for i in m) / len(m)) ** power)
    budget = budgets_ref(weights, [len(m) for m in parts], k)
    sel = att if select == "attention" else hol
    kept = []
    for m, bud in zip(parts, budget):
        kept += sorted(m, key=lambda i: (-sel[i], i))[:bud]
    return sorted(kept)


def make_input(x: torch.Tensor, cls: torch.Tensor, view: torch.Tensor | None = None) -> ReduceInput:
    b, n, _ = x.shape
    return ReduceInput(
        x=x,
        size=torch.ones(b, n),
        valid=torch.ones(b, n, dtype=torch.bool),
        num_protected=0,
        layer=2,
        num_layers=3,
        grid=(0, 0),
        pristine=True,
        signals=Scores(cls),
        view=view,
    )


@pytest.mark.parametrize(
    ("n", "p", "k", "beta", "power", "select"),
    [
        (37, 5, 11, 0.09, 1.0, "attention"),
        (20, 16, 6, 2.0, 1.0, "holistic"),
        (9, 12, 4, 0.5, 2.0, "attention"),
        (30, 4, 25, 1.0, 0.5, "holistic"),
    ],
)
def test_sequence_crops_match_token_by_token_reference(n, p, k, beta, power, select):
    b = 3
    gen = torch.Generator().manual_seed(n * 13 + p)
    x = torch.randn(b, n, 6, generator=gen)
    cls = torch.rand(b, n, generator=gen)
    cls[0, : n // 3] *= 20.0  # one region dominates, so a crop saturates and its excess is re-shared
    keep, target = get("holov")(partitions=p, beta=beta, power=power, select=select).reduce(
        make_input(x, cls), torch.full((b,), k)
    )
    assert target is None and (keep.sum(1) == k).all()
    size, rem = n // p, n % p
    parts, start = [], 0
    for q in range(p):
        ln = size + (q < rem)
        parts.append(list(range(start, start + ln)))
        start += ln
    for i in range(b):
        want = holov_ref(x[i].double().tolist(), cls[i].double().tolist(), parts, k, beta, power, select)
        assert keep[i].nonzero().flatten().tolist() == want, i


def test_view_crops_match_token_by_token_reference():
    # two images: base view 4 tokens + crops 1, 2 interleaved row by row; then base view 4 + one crop
    view = [0, 0, 0, 0, 1, 1, 2, 2, 1, 1, 2, 2, 0, 0, 0, 0, 1, 1, 1]
    n, b, k = len(view), 2, 7
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(b, n, 5, generator=gen)
    cls = torch.rand(b, n, generator=gen)
    keep, _ = get("holov")(split="views", select="holistic").reduce(
        make_input(x, cls, torch.tensor([view] * b)), torch.full((b,), k)
    )
    img = [0] * 12 + [1] * 7
    parts = [[i for i in range(n) if (img[i], view[i]) == key] for key in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]]
    for i in range(b):
        want = holov_ref(x[i].double().tolist(), cls[i].double().tolist(), parts, k, 0.09, 1.0, "holistic")
        assert keep[i].nonzero().flatten().tolist() == want, i


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"partitions": 0}, "partitions"),
        ({"partitions": 2.5}, "partitions"),
        ({"split": "grid"}, "split"),
        ({"beta": -1}, "beta"),
        ({"power": 0}, "power"),
        ({"select": "cls"}, "select"),
        ({"alpha": 1}, "no parameter"),
    ],
)
def test_parameter_errors(kw, match):
    with pytest.raises(TokenThinError, match=match):
        get("holov")(**kw)
