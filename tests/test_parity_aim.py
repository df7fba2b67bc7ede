"""``aim`` with ``official=True`` against a restatement of the released merge (LaVi-Lab/AIM,
``llava/model/token_merge.py`` ``bipartite_soft_matching_merge`` as ``get_2dPool`` calls it; written here from
reading it, not copied) at LLaVA sizes (576 visual tokens), its schedules, and the language model of a tiny LLaVA
reading the release's values in the release's order. Only correctness: no real VLM weights exist here to measure
which mode answers better."""

from __future__ import annotations

import pytest
import torch

import tokenthin
from tiny_vlm import IMAGE_TOKEN, generate, llava, pixels, prompt
from tokenthin.api import _APPLIED
from tokenthin.errors import TokenThinError
from tokenthin.methods.base import OrderedPlan, ReduceInput, SignalSource, get
from tokenthin.ops import ordered

N, D = 576, 64


def released_round(x: torch.Tensor, r: int) -> torch.Tensor:
    """One call with ``metric = x``: A / B alternate, r strongest edges, ``scatter_reduce(mean)`` (the destination
    counts once, each source once), output [unmerged A in edge order, B]."""
    r = min(r, x.shape[1] // 2)
    m = x / x.norm(dim=-1, keepdim=True)
    node_max, node_idx = (m[:, 0::2] @ m[:, 1::2].transpose(1, 2)).max(dim=-1)
    edges = node_max.argsort(dim=-1, descending=True, stable=True)
    unm, src = edges[:, r:], edges[:, :r]
    dst = node_idx.gather(1, src)
    a, bb = x[:, 0::2], x[:, 1::2]
    out = bb.clone()
    for i in range(x.shape[0]):
        for j in range(bb.shape[1]):
            mine = src[i][dst[i] == j]
            if len(mine):
                out[i, j] = torch.cat([bb[i, j : j + 1], a[i, mine]]).mean(0)
    return torch.cat([a.gather(1, unm[..., None].expand(-1, -1, x.shape[-1])), out], 1)


def visual_input(x: torch.Tensor) -> ReduceInput:
    b, n, _ = x.shape
    return ReduceInput(
        x=x,
        size=torch.ones(b, n),
        valid=torch.ones(b, n, dtype=torch.bool),
        num_protected=0,
        layer=0,
        num_layers=32,
        grid=(24, 24),
        pristine=True,
        signals=SignalSource(),
        site="output",
    )


@pytest.mark.parametrize(("rounds", "keep"), [((N // 2, N // 4), N // 4), ((288, 36), 252), ((288, 144, 72), 72)])
def test_aim_official_merge_is_the_released_rounds(rounds, keep):
    g = torch.Generator().manual_seed(keep)
    x = torch.randn(2, N, D, generator=g)
    want = x
    for r in rounds:
        want = released_round(want, r)
    plan = get("aim")(official=True).reduce(visual_input(x), torch.full((2,), keep))
    assert isinstance(plan, OrderedPlan)
    got, _ = ordered.apply(x, torch.ones(2, N), plan)
    assert got.shape == want.shape == (2, keep, D)
    assert (got - want).abs().max() < 1e-5
    # the default (positional split, own features, size-weighted mean) differs from the second round on
    default, _ = ordered.apply(x, torch.ones(2, N), get("aim")().reduce(visual_input(x), torch.full((2,), keep)))
    sort = lambda t: torch.sort(t[..., 0], dim=1).values  # noqa: E731
    assert (sort(default) - sort(want)).abs().max() > 1e-3


def test_aim_official_schedules():
    assert get("aim")(official=True).llm_points(32)[0] == (13, 0.875)
    pts = get("aim")(official=True).llm_points(28)
    assert pts[0] == (14, 0.875) and pts[-1] == (21, 0.0)  # modeling_qwen2.py: layers 14..21
    assert get("aim")().llm_points(28)[0][0] == 11  # the default scales 13 / 32
    with pytest.raises(TokenThinError, match="start="):
        get("aim")(official=True).llm_points(4)
    assert get("aim")(official=True, start=1).llm_points(4)[0] == (1, 0.875)
    with pytest.raises(TokenThinError, match="official"):
        get("aim")(official="no")


def test_aim_official_on_llava_the_language_model_reads_the_released_merge():
    model = llava()
    ids = torch.tensor([prompt([5], [7, 8])])
    rt_plans, embeds = [], []

    def pre(_m, _args, kwargs):
        e = kwargs.get("inputs_embeds")
        if e is not None and e.shape[1] > 1:
            embeds.append(e.detach().clone())

    with tokenthin.applied(model, "aim", keep=4, official=True, start=0):
        rt = _APPLIED[model]
        own = rt.method.reduce

        def rec(inp, keep):
            p = own(inp, keep)
            rt_plans.append((inp, p))
            return p

        rt.method.reduce = rec
        h = rt.adapter.lm.register_forward_pre_hook(pre, with_kwargs=True)
        try:
            generate(model, ids, None, pixels(1), new=2)
        finally:
            h.remove()
            del rt.method.reduce
    inp = next(i for i, _p in rt_plans if i.site == "output")
    n = inp.x.shape[1]
    want = inp.x.float()
    left = n - 4
    while left > 0:
        r = min(left, want.shape[1] // 2)
        want = released_round(want, r)
        left -= r
    start = int((ids[0] == IMAGE_TOKEN).nonzero()[0])
    got = embeds[0][0, start : start + 4].float()
    assert (got - want[0]).abs().max() < 1e-4
