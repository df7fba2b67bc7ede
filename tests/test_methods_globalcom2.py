"""GlobalCom2 on the tiny LLaVA-NeXT (AnyRes) and LLaVA: zero budget, batch vs single, exact counts, the per-crop
budgets and selection against a per-token Python reference on hand-made scores, and parameter errors."""

from __future__ import annotations

import math

import pytest
import torch

import tokenthin
from tiny_vlm import PROMPTS, TPI, batch, generate, llava, llava_next, next_inputs, next_single, ngenerate, pixels
from tokenthin.errors import TokenThinError
from tokenthin.methods.base import ReduceInput, SignalSource, get


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
    with tokenthin.applied(model, "globalcom2", keep=1.0):
        toks, logits = ngenerate(model, inputs)
    assert torch.equal(toks, ref[0]) and (logits - ref[1]).abs().max() < 1e-5
    model, (ids, mask, pv), ref = plain
    with tokenthin.applied(model, "globalcom2", keep=1.0):
        toks, logits = generate(model, ids, mask, pv)
        assert tokenthin.info(model).kept == [TPI] * 3
    assert torch.equal(toks, ref[0]) and (logits - ref[1]).abs().max() < 1e-5


@pytest.mark.parametrize("keep", [0.5, 5])
def test_anyres_batch_equals_single_runs_with_exact_counts(nxt, keep):
    model, inputs, _ = nxt
    with tokenthin.applied(model, "globalcom2", keep=keep, temperature=0.05):
        toks, logits = ngenerate(model, inputs)
        info = tokenthin.info(model)
        assert info.kept == [n // 2 if keep == 0.5 else keep for n in info.visual_tokens]
        for i in range(3):
            t1, l1 = ngenerate(model, next_single(inputs, i))
            assert torch.equal(t1[0], toks[i]) and (l1[0] - logits[i]).abs().max() < 1e-4


def test_plain_llava_is_fastervlm_and_batch_equals_singles(plain):
    model, (ids, mask, pv), _ = plain
    with tokenthin.applied(model, "globalcom2", keep=5):
        toks, logits = generate(model, ids, mask, pv)
        src = tokenthin.info(model).source
        assert tokenthin.info(model).kept == [5] * 3
        for i, p in enumerate(PROMPTS):
            t1, l1 = generate(model, torch.tensor([p]), None, pv[i : i + 1])
            assert torch.equal(t1[0], toks[i]) and (l1[0] - logits[i]).abs().max() < 1e-4
    with tokenthin.applied(model, "fastervlm", keep=5):
        toks_f, _ = generate(model, ids, mask, pv)
        assert torch.equal(tokenthin.info(model).source, src)
    assert torch.equal(toks_f, toks)


# ----- the allocation against a per-token Python reference -----


class Scores(SignalSource):
    has_cls = True

    def __init__(self, cls: torch.Tensor) -> None:
        self.cls = cls

    def cls_attention(self, layer: int) -> torch.Tensor:
        return self.cls


def budgets_ref(weight: list[float], cap: list[int], k: int) -> list[int]:
    """Proportional shares capped at the sizes (excess re-shared), floored, largest remainders first."""
    share, active, left = [0.0] * len(cap), list(range(len(cap))), float(k)
    while active:
        ws = [weight[p] for p in active]
        if sum(ws) <= 0:
            ws = [float(cap[p]) for p in active]
        q = {p: left * wp / sum(ws) for p, wp in zip(active, ws)}
        over = [p for p in active if q[p] >= cap[p]]
        if not over:
            for p in active:
                share[p] = q[p]
            break
        for p in over:
            share[p] = float(cap[p])
            left -= cap[p]
            active.remove(p)
    base = [min(math.floor(s), c) for s, c in zip(share, cap)]
    room = [p for p in range(len(cap)) if base[p] < cap[p]]
    for p in sorted(room, key=lambda p: (-(share[p] - base[p]), p))[: k - sum(base)]:
        base[p] += 1
    return base


def bilinear(a: list[list[float]], h: int, w: int) -> list[list[float]]:
    """F.interpolate(mode='bilinear', align_corners=False), one value at a time."""
    s = len(a)

    def src(d: int, out: int) -> tuple[int, int, float]:
        x = max((d + 0.5) * s / out - 0.5, 0.0)
        i0 = min(math.floor(x), s - 1)
        return i0, min(i0 + 1, s - 1), x - i0

    out = []
    for y in range(h):
        y0, y1, ly = src(y, h)
        row = []
        for x in range(w):
            x0, x1, lx = src(x, w)
            top = a[y0][x0] * (1 - lx) + a[y0][x1] * lx
            bot = a[y1][x0] * (1 - lx) + a[y1][x1] * lx
            row.append(top * (1 - ly) + bot * ly)
        out.append(row)
    return out


def anyres_layout(s: int, crops_h: int, crops_w: int, cs: int, cut_cols: int, cut_rows: int):
    """One image as LLaVA-NeXT lays it out: thumbnail s x s, then a crops_h x crops_w grid of cs x cs crops with
    cut_cols / cut_rows removed on each side (unpadding), row by row with a row end after every row.
    Returns per token (view, row, col) with row = col = -1 on the thumbnail, and the prompt positions."""
    views, rows, cols, pos = [0] * (s * s), [-1] * (s * s), [-1] * (s * s), list(range(s * s))
    p = s * s
    h_full, w_full = crops_h * cs, crops_w * cs
    for r in range(cut_rows, h_full - cut_rows):
        for c in range(cut_cols, w_full - cut_cols):
            views.append(1 + (r // cs) * crops_w + c // cs)
            rows.append(r - cut_rows)
            cols.append(c - cut_cols)
            pos.append(p)
            p += 1
        p += 1  # the row end
    return views, rows, cols, pos


def globalcom2_ref(att: list[float], layout, k: int, temperature: float) -> list[int]:
    views, rows, cols, _ = layout
    n = len(att)
    thumb = [i for i in range(n) if views[i] == 0]
    s = math.isqrt(len(thumb))
    h, w = max(rows) + 1, max(cols) + 1
    a0 = [[att[thumb[y * s + x]] for x in range(s)] for y in range(s)]
    up = bilinear(a0, h, w)
    at = {(rows[i], cols[i]): views[i] for i in range(n) if views[i] > 0}
    crops = sorted({views[i] for i in range(n) if views[i] > 0})
    mass = dict.fromkeys(crops, 0.0)
    for y in range(s):
        for x in range(s):
            mass[at[(min(int((y + 0.5) * h / s), h - 1), min(int((x + 0.5) * w / s), w - 1))]] += a0[y][x]
    e = {c: math.exp(mass[c] / temperature) for c in crops}
    sigma = {c: e[c] / sum(e.values()) for c in crops}
    mean = sum(sigma.values()) / len(crops)
    ratio = k / n
    members = [thumb] + [[i for i in range(n) if views[i] == c] for c in crops]
    targets = [ratio * len(thumb)] + [
        min(ratio * (1 + sigma[c] - mean), 1.0) * len(m) for c, m in zip(crops, members[1:])
    ]
    budget = budgets_ref(targets, [len(m) for m in members], k)
    score = list(att)
    for m in members[1:]:
        loc = math.sqrt(sum(att[i] ** 2 for i in m))
        glo = math.sqrt(sum(up[rows[i]][cols[i]] ** 2 for i in m))
        for i in m:
            score[i] = att[i] / loc + up[rows[i]][cols[i]] / glo
    kept = []
    for m, bud in zip(members, budget):
        kept += sorted(m, key=lambda i: (-score[i], i))[:bud]
    return sorted(kept)


@pytest.mark.parametrize(
    ("s", "ch", "cw", "cs", "cut_c", "cut_r", "k", "temp"),
    [
        (4, 2, 2, 4, 0, 0, 13, 0.05),
        (4, 1, 2, 4, 1, 0, 9, 0.02),
        (3, 2, 1, 3, 0, 1, 7, 10.0),
        (4, 3, 2, 4, 0, 2, 30, 0.1),
    ],
)
def test_allocation_matches_token_by_token_reference(s, ch, cw, cs, cut_c, cut_r, k, temp):
    layout = anyres_layout(s, ch, cw, cs, cut_c, cut_r)
    views, rows, cols, _ = layout
    n, b = len(views), 3
    gen = torch.Generator().manual_seed(n * 7 + k)
    cls = torch.rand(b, n, generator=gen, dtype=torch.float64).float()
    cls[0, : s * s] *= torch.linspace(0.0, 3.0, s * s)  # a strongly uneven thumbnail
    inp = ReduceInput(
        x=torch.zeros(b, n, 4),
        size=torch.ones(b, n),
        valid=torch.ones(b, n, dtype=torch.bool),
        num_protected=0,
        layer=2,
        num_layers=3,
        grid=(0, 0),
        pristine=True,
        signals=Scores(cls),
        view=torch.tensor([views] * b),
        rows=torch.tensor([rows] * b),
        cols=torch.tensor([cols] * b),
    )
    keep, target = get("globalcom2")(temperature=temp).reduce(inp, torch.full((b,), k))
    assert target is None and (keep.sum(1) == k).all()
    for i in range(b):
        want = globalcom2_ref(cls[i].double().tolist(), layout, k, temp)
        assert keep[i].nonzero().flatten().tolist() == want, i


def test_two_images_in_one_sample_are_planned_apart():
    a = anyres_layout(2, 1, 2, 2, 0, 0)
    b_ = anyres_layout(2, 2, 1, 2, 0, 0)
    views, rows, cols = a[0] + b_[0], a[1] + b_[1], a[2] + b_[2]
    n = len(views)
    cls = torch.rand(1, n, generator=torch.Generator().manual_seed(0))
    inp = ReduceInput(
        x=torch.zeros(1, n, 4),
        size=torch.ones(1, n),
        valid=torch.ones(1, n, dtype=torch.bool),
        num_protected=0,
        layer=2,
        num_layers=3,
        grid=(0, 0),
        pristine=True,
        signals=Scores(cls),
        view=torch.tensor([views]),
        rows=torch.tensor([rows]),
        cols=torch.tensor([cols]),
    )
    keep, _ = get("globalcom2")().reduce(inp, torch.tensor([6]))
    assert int(keep.sum()) == 6
    na = len(a[0])
    assert keep[0, :na].sum() == 3 and keep[0, na:].sum() == 3  # equal sizes, near-uniform shares


@pytest.mark.parametrize("bad", [0, -1.0, "x", True, float("inf")])
def test_parameter_errors(bad):
    with pytest.raises(TokenThinError, match="temperature"):
        get("globalcom2")(temperature=bad)
    with pytest.raises(TokenThinError, match="no parameter"):
        get("globalcom2")(partitions=2)
