"""HiRED on a tiny random LLaVA and ViT: zero budget, batch vs single, exact counts, the selection against a
per-token Python reference on hand-made scores, and parameter errors."""

from __future__ import annotations

import math

import pytest
import torch

import tokenthin
from tiny import build as build_vit
from tiny_vlm import PROMPTS, TPI, batch, generate, llava, pixels
from tokenthin.errors import TokenThinError
from tokenthin.methods.base import ReduceInput, SignalSource, get
from tokenthin.ops.groups import apportion


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return llava()


@pytest.fixture(scope="module")
def inputs():
    ids, mask = batch(PROMPTS)
    return ids, mask, pixels(3)


class Scores(SignalSource):
    """Hand-made per-layer scores: {layer: (cls (B, N), mean (B, N))}."""

    has_cls = True

    def __init__(self, per_layer: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.per_layer = per_layer

    def cls_attention(self, layer: int) -> torch.Tensor:
        return self.per_layer[layer][0]

    def mean_attention(self, layer: int) -> torch.Tensor:
        return self.per_layer[layer][1]


def make_input(scores: Scores, h: int, w: int, b: int, layer: int = 2, protected: int = 0) -> ReduceInput:
    n = protected + h * w
    return ReduceInput(
        x=torch.zeros(b, n, 4),
        size=torch.ones(b, n),
        valid=torch.ones(b, n, dtype=torch.bool),
        num_protected=protected,
        layer=layer,
        num_layers=4,
        grid=(h, w),
        pristine=True,
        signals=scores,
    )


def budgets_ref(weight: list[float], cap: list[int], k: int) -> list[int]:
    share = [0.0] * len(cap)
    active = list(range(len(cap)))
    left = float(k)
    while active:
        ws = [weight[p] for p in active]
        if sum(ws) <= 0:
            ws = [float(cap[p]) for p in active]
        tot = sum(ws)
        q = {p: left * wp / tot for p, wp in zip(active, ws)}
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
    rest = k - sum(base)
    room = [p for p in range(len(cap)) if base[p] < cap[p]]
    for p in sorted(room, key=lambda p: (-(share[p] - base[p]), p))[:rest]:
        base[p] += 1
    return base


def hired_ref(early: list[float], final: list[float], h: int, w: int, k: int, g: int) -> list[int]:
    """HiRED on one sample, token by token."""
    part = [(r * g // h) * g + (c * g // w) for r in range(h) for c in range(w)]
    cap = [part.count(p) for p in range(g * g)]
    weight = [sum(max(early[i], 0.0) for i in range(h * w) if part[i] == p) for p in range(g * g)]
    budget = budgets_ref(weight, cap, k)
    kept = []
    for p in range(g * g):
        members = sorted((i for i in range(h * w) if part[i] == p), key=lambda i: (-final[i], i))
        kept += members[: budget[p]]
    return sorted(kept)


@pytest.mark.parametrize(("h", "w", "g", "k"), [(6, 6, 2, 9), (5, 7, 3, 11), (4, 4, 1, 5), (6, 5, 2, 29), (4, 4, 4, 3)])
@pytest.mark.parametrize("score", ["cls", "mean"])
def test_selection_matches_token_by_token_reference(h, w, g, k, score):
    b, P = 3, 1
    gen = torch.Generator().manual_seed(h * 100 + w * 10 + g)
    per_layer = {
        layer: (torch.rand(b, P + h * w, generator=gen), torch.rand(b, P + h * w, generator=gen)) for layer in (0, 2)
    }
    # make one partition carry almost all early attention, so that it saturates and the rest is re-shared
    for layer_scores in per_layer[0]:
        layer_scores[0, P : P + w] += 50.0
    inp = make_input(Scores(per_layer), h, w, b, protected=P)
    keep, target = get("hired")(partitions=g, score=score).reduce(inp, torch.full((b,), k))
    assert target is None and keep.shape == (b, P + h * w)
    assert keep[:, :P].all() and (keep[:, P:].sum(1) == k).all()
    pick = 0 if score == "cls" else 1
    for i in range(b):
        early = per_layer[0][pick][i, P:].tolist()
        final = per_layer[2][pick][i, P:].tolist()
        want = hired_ref(early, final, h, w, k, g)
        assert keep[i, P:].nonzero().flatten().tolist() == want, (i, h, w, g, k)


def test_budgets_are_proportional_capped_and_exact():
    cap = torch.tensor([[4, 4, 4, 4]])
    got = apportion(torch.tensor([[10.0, 1.0, 1.0, 2.0]]), cap, 8)
    assert got.tolist() == [[4, 1, 1, 2]] == [budgets_ref([10.0, 1.0, 1.0, 2.0], [4] * 4, 8)]
    assert apportion(torch.tensor([[0.0, 0.0, 0.0, 0.0]]), cap, 6).tolist() == [[2, 2, 1, 1]]
    assert apportion(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), cap, 10).tolist() == [[4, 2, 2, 2]]
    assert apportion(torch.tensor([[1.0, 1.0, 1.0, 1.0]]), cap, 16).tolist() == [[4, 4, 4, 4]]
    assert apportion(torch.tensor([[1.0, 1.0, 1.0, 1.0]]), cap, 0).tolist() == [[0, 0, 0, 0]]


def test_zero_budget_generation_is_identical(model, inputs):
    ids, mask, pv = inputs
    with torch.no_grad():
        ref = generate(model, ids, mask, pv)
    with tokenthin.applied(model, "hired", keep=1.0, partitions=2):
        toks, logits = generate(model, ids, mask, pv)
        assert tokenthin.info(model).kept == [TPI] * 3
    assert torch.equal(toks, ref[0])
    assert (logits - ref[1]).abs().max() < 1e-5


@pytest.mark.parametrize(("keep", "partitions"), [(0.5, 1), (0.5, 2), (3, 4)])
def test_batch_of_mixed_prompts_equals_single_runs_with_exact_counts(model, inputs, keep, partitions):
    ids, mask, pv = inputs
    k = keep if isinstance(keep, int) else int(TPI * keep)
    with tokenthin.applied(model, "hired", keep=keep, partitions=partitions):
        toks, logits = generate(model, ids, mask, pv)
        assert tokenthin.info(model).kept == [k] * 3
        for i, p in enumerate(PROMPTS):
            t1, l1 = generate(model, torch.tensor([p]), None, pv[i : i + 1])
            assert tokenthin.info(model).kept == [k]
            assert torch.equal(t1[0], toks[i])
            assert (l1[0] - logits[i]).abs().max() < 1e-4


def test_one_partition_is_fastervlm(model, inputs):
    ids, mask, pv = inputs
    with tokenthin.applied(model, "hired", keep=5):
        a = generate(model, ids, mask, pv)
        src_a = tokenthin.info(model).source
    with tokenthin.applied(model, "fastervlm", keep=5):
        b = generate(model, ids, mask, pv)
        src_b = tokenthin.info(model).source
    assert torch.equal(src_a, src_b) and torch.equal(a[0], b[0])


def peaked_vit(attn: str = "sdpa") -> torch.nn.Module:
    """The tiny ViT with queries/keys scaled up, so attention is peaked and rankings have no near-ties."""
    model = build_vit("vit", attn)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.rsplit(".", 1)[-1] in ("query", "key"):
                mod.weight.mul_(6.0)
    return model


def test_vit_layer_site_matches_eager_attention():
    model = peaked_vit()
    eager = peaked_vit("eager")
    eager.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        att = eager(pixel_values=x, output_attentions=True).attentions
    tokenthin.apply(model, "hired", keep=20, site="layer:1", partitions=2)
    with torch.no_grad():
        out = model(pixel_values=x).last_hidden_state
    assert out.shape == (2, 1 + 20, 32)
    src = tokenthin.info(model).source
    for i in range(2):
        early = att[0][i, :, 0, 1:].mean(0).tolist()
        final = att[1][i, :, 0, 1:].mean(0).tolist()
        got = ((src[i, 1:] >= 0).nonzero().flatten()).tolist()
        assert got == hired_ref(early, final, 8, 8, 20, 2)
    tokenthin.remove(model)


def test_parameter_errors():
    vit = build_vit("vit")
    for params in [{"partitions": 0}, {"partitions": 1.5}, {"early_layer": "first"}, {"score": "max"}]:
        with pytest.raises(TokenThinError, match="hired"):
            tokenthin.apply(vit, "hired", keep=0.25, **params)
        assert not tokenthin.is_applied(vit)
    with pytest.raises(TokenThinError, match="early_layer=2 runs after the reduction point"):
        tokenthin.apply(vit, "hired", keep=0.25, site="layer:1", early_layer=2)
    assert not tokenthin.is_applied(vit)
    with pytest.raises(TokenThinError, match="outside the encoder"):
        tokenthin.apply(vit, "hired", keep=0.25, early_layer=7)
    x = torch.randn(1, 3, 32, 32)
    with tokenthin.applied(vit, "hired", keep=0.25, partitions=9), pytest.raises(TokenThinError, match="at most 8"):
        vit(pixel_values=x)
    siglip = build_vit("siglip")
    with tokenthin.applied(siglip, "hired", keep=0.25), pytest.raises(TokenThinError, match="score='mean'"):
        siglip(pixel_values=x)
    with tokenthin.applied(siglip, "hired", keep=16, score="mean", partitions=2):
        assert siglip(pixel_values=x).last_hidden_state.shape == (1, 16, 32)


def test_refuses_tokens_that_are_not_one_full_grid():
    per_layer = {0: (torch.rand(1, 12), torch.rand(1, 12)), 2: (torch.rand(1, 12), torch.rand(1, 12))}
    inp = make_input(Scores(per_layer), 3, 4, 1)
    inp.grid = (0, 0)  # several images / AnyRes views
    with pytest.raises(TokenThinError, match="full patch grid"):
        get("hired")().reduce(inp, torch.tensor([4]))


def test_anyres_base_view_and_crops_share_the_budget():
    """LLaVA-NeXT: the base view (the first 16 visual tokens of each prompt here) keeps ``base_share`` of the budget,
    the crops the rest; zero budget is exact and a batch equals its prompts alone."""
    from tiny_vlm import llava_next, next_inputs, next_single, ngenerate

    m = llava_next()
    inp = next_inputs(m)
    ref = ngenerate(m, inp, new=3)
    with tokenthin.applied(m, "hired", keep=1.0):
        z = ngenerate(m, inp, new=3)
    assert torch.equal(z[0], ref[0]) and (z[1] - ref[1]).abs().max() < 1e-5
    for share, from_base in ((1.0, True), (0.0, False), (0.5, None)):
        with tokenthin.applied(m, "hired", keep=8, base_share=share):
            toks, logits = ngenerate(m, inp, new=3)
            kept = tokenthin.info(m).source >= 0
            for i in range(3):
                t1, l1 = ngenerate(m, next_single(inp, i), new=3)
                assert torch.equal(t1[0], toks[i]) and (l1[0] - logits[i]).abs().max() < 1e-4
        in_base = kept[:, :16].sum(1)
        expect = {True: 8, False: 0, None: 4}[from_base]
        assert (in_base == expect).all() and (kept.sum(1) == 8).all()
