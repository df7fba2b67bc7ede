"""GlobalCom2's ``official=True`` against a restatement of the released ``compress_thumbnail`` /
``generate_scale_for_crop_features`` / ``compress_crops`` on LLaVA-NeXT sizes (a 24 x 24 thumbnail and 24 x 24
crops, unpadded), and the language model reading the thumbnail in descending-attention order."""

from __future__ import annotations

import math

import pytest
import torch

import tokenthin
from test_methods_globalcom2 import anyres_layout, bilinear
from test_parity_official import inp_for, lm_reads
from tiny_vlm import IMAGE_TOKEN, llava_next, next_inputs, next_single, ngenerate
from tokenthin.errors import TokenThinError
from tokenthin.methods.base import get
from tokenthin.ops import ordered


def globalcom2_ref(att: list[float], layout, k: int, nph: int, npw: int, temp: float = 10.0) -> list[int]:
    """The tokens the released code hands the language model for one image, in its order (row ends left out)."""
    views, rows, cols, _ = layout
    n = len(att)
    ratio = k / n
    thumb = [i for i in range(n) if views[i] == 0]
    s = math.isqrt(len(thumb))
    first = sorted(thumb, key=lambda i: -att[i])[: int(len(thumb) * ratio)]
    ph, pw = max(s // nph, 1), max(s // npw, 1)
    mass = [0.0] * (nph * npw)
    for cell, i in enumerate(thumb):
        y, x = divmod(cell, s)
        mass[min(y // ph, nph - 1) * npw + min(x // pw, npw - 1)] += att[i]
    e = [math.exp((m - max(mass)) / temp) for m in mass]
    sm = [v / (sum(e) + 1e-8) for v in e]
    scales = [min(ratio * (1 + v - sum(sm) / len(sm)), 1.0) for v in sm]
    h, w = max(rows) + 1, max(cols) + 1
    up = bilinear([[att[thumb[y * s + x]] for x in range(s)] for y in range(s)], h, w)
    rest = []
    for c in range(1, nph * npw + 1):
        m = [i for i in range(n) if views[i] == c]
        loc = math.sqrt(sum(att[i] ** 2 for i in m))
        glo = math.sqrt(sum(up[rows[i]][cols[i]] ** 2 for i in m))
        score = {i: att[i] / loc + up[rows[i]][cols[i]] / glo for i in m}
        rest += sorted(m, key=lambda i: -score[i])[: int(len(m) * scales[c - 1])]
    return first + sorted(rest)


@pytest.mark.parametrize(
    ("ch", "cw", "cut_c", "cut_r", "quarter"),
    [(2, 2, 0, 4, True), (1, 2, 4, 0, True), (3, 1, 2, 0, True), (2, 2, 0, 4, False)],
)
def test_globalcom2_official_is_the_released_selection_and_order(ch, cw, cut_c, cut_r, quarter):
    layout = anyres_layout(24, ch, cw, 24, cut_c, cut_r)
    views, rows, cols, _ = layout
    n, b = len(views), 2
    k = n // 4 if quarter else n // 3 + 5  # the release's 0.25, and another ratio
    g = torch.Generator().manual_seed(n + k)
    att = torch.rand(b, n, generator=g, dtype=torch.float64).float() * 1e-2
    att[0, :576] *= torch.linspace(0.0, 4.0, 576)  # an uneven thumbnail: uneven crop budgets
    x = torch.arange(n, dtype=torch.float32).expand(b, n).unsqueeze(-1)  # each row names its token
    inp = inp_for(x, att, view=torch.tensor([views] * b), rows=torch.tensor([rows] * b), cols=torch.tensor([cols] * b))
    plan = get("globalcom2")(official=True).reduce(inp, torch.full((b,), k))
    out, _ = ordered.apply(x, inp.size, plan)
    for i in range(b):
        want = globalcom2_ref(att[i].double().tolist(), layout, k, ch, cw)
        assert len(want) < k  # the release floors every count
        assert out[i, : len(want), 0].long().tolist() == want, i
        assert int(plan[0][i].sum()) == len(want)


def test_globalcom2_official_refuses_a_layout_it_cannot_place():
    layout = anyres_layout(4, 2, 2, 4, 0, 0)
    views, rows, cols, _ = layout
    views = [v if v != 4 else 3 for v in views]  # crops 1..3 on a 2 x 2 grid: not the release's layout
    n = len(views)
    inp = inp_for(
        torch.zeros(1, n, 2),
        torch.rand(1, n),
        view=torch.tensor([views]),
        rows=torch.tensor([rows]),
        cols=torch.tensor([cols]),
    )
    with pytest.raises(TokenThinError, match="official=True"):
        get("globalcom2")(official=True).reduce(inp, torch.tensor([10]))


def test_globalcom2_official_on_llava_next_reads_the_thumbnail_by_attention():
    model = llava_next()
    one = next_single(next_inputs(model), 0)
    with tokenthin.applied(model, "globalcom2", keep=0.5, official=True):
        plans, embeds = lm_reads(model, lambda: ngenerate(model, one, new=2))
    ((inp, plan),) = plans
    want, _ = ordered.apply(inp.x, inp.size, plan)
    kept = int(plan[0].sum())
    ids = one["input_ids"][0]
    seg = embeds[0][0, int((ids == IMAGE_TOKEN).nonzero()[0]) :]
    newline = (seg == model.model.image_newline.to(seg.dtype)).all(-1)
    got = seg[~newline][:kept]
    assert (got - want[0, :kept].to(got.dtype)).abs().max() < 1e-6
    thumb = (inp.view[0] == 0) & plan[0][0]
    order = plan.order[0][thumb]
    att = inp.signals.cls_attention(inp.layer)[0][thumb]
    assert torch.equal(torch.argsort(order), torch.argsort(att, descending=True))  # thumbnail by attention
    assert int(thumb.sum()) >= 2 and not bool((torch.diff(order) > 0).all())
