"""``official=True`` against restatements of the official algorithms (written here from reading the released code,
not copied), on LLaVA-1.5 sizes (576 tokens, a 24 x 24 grid, [CLS] first) and LLaVA-NeXT's AnyRes layout, by direct
method calls; and the vision-language runtime handing the language model exactly those values in that order."""

from __future__ import annotations

import pytest
import torch

import tokenthin
from tiny_vlm import IMAGE_TOKEN, TPI, generate, llava, pixels, prompt
from tokenthin.api import _APPLIED
from tokenthin.methods.base import OrderedPlan, ReduceInput, SignalSource, get
from tokenthin.ops import ordered

S = 24  # LLaVA-1.5: CLIP ViT-L/14 at 336 px, 24 x 24 patches
N = S * S
D = 48


class Signals(SignalSource):
    has_cls = True

    def __init__(self, cls: torch.Tensor, keys: torch.Tensor | None = None) -> None:
        self.cls, self.k = cls, keys

    def cls_attention(self, layer: int) -> torch.Tensor:
        return self.cls

    def keys(self, layer: int) -> torch.Tensor:
        assert self.k is not None
        return self.k


def inp_for(x: torch.Tensor, cls: torch.Tensor, keys: torch.Tensor | None = None, protected: int = 0, **kw):
    b, n, _ = x.shape
    return ReduceInput(
        x=x,
        size=torch.ones(b, n),
        valid=torch.ones(b, n, dtype=torch.bool),
        num_protected=protected,
        layer=22,
        num_layers=24,
        grid=(S, S),
        pristine=True,
        signals=Signals(cls, keys),
        **kw,
    )


# ----- the language model reads the plan's values in the plan's order -----


def lm_reads(model, call):
    """Run ``call()`` on a tokenthin-applied model; returns [(inp, plan)] the method made and the language model's
    input embeddings at prefill."""
    rt = _APPLIED[model]
    own = rt.method.reduce
    plans, embeds = [], []

    def rec(inp, keep):
        p = own(inp, keep)
        plans.append((inp, p))
        return p

    def pre(_m, _args, kwargs):
        e = kwargs.get("inputs_embeds")
        if e is not None and e.shape[1] > 1:
            embeds.append(e.detach().clone())

    rt.method.reduce = rec  # this instance only
    h = rt.adapter.lm.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        call()
    finally:
        h.remove()
        del rt.method.reduce
    return plans, embeds


def visual_part(embeds: torch.Tensor, ids: torch.Tensor, kept: int) -> torch.Tensor:
    start = int((ids[0] == IMAGE_TOKEN).nonzero()[0])
    return embeds[0, start : start + kept]


# ----- VisionZip -----


def visionzip_ref(h: torch.Tensor, att: torch.Tensor, key: torch.Tensor, dominant: int, contextual: int):
    """The released ``CLIPVisionTower_VisionZip.forward`` for one image, restated: ``h`` (1 + N, D) the feature
    layer's hidden states with [CLS] first, ``att`` (N,) the [CLS] row over the patches, ``key`` (1 + N, d) the
    layer's keys averaged over heads; ``main.py`` hands the tower ``dominant - 1``."""
    top = sorted((torch.argsort(att, descending=True)[: dominant - 1] + 1).tolist())
    chosen = [0, *top]
    rest = [i for i in range(h.shape[0]) if i not in set(chosen)]
    kn = key[rest] / key[rest].norm(dim=-1, keepdim=True)
    step = max(1, len(rest) // contextual)
    tgt = list(range(0, len(rest), step))[:contextual]
    movers = [j for j in range(len(rest)) if j not in set(tgt)]
    out = [h[i] for i in chosen]
    best = {j: int(torch.argmax(kn[tgt] @ kn[j])) for j in movers}
    for t, ti in enumerate(tgt):
        mine = [rest[j] for j in movers if best[j] == t]
        agg = torch.stack([h[i] for i in mine]).mean(0) if mine else torch.zeros_like(h[0])
        out.append(h[rest[ti]] + agg)
    return torch.stack(out)


@pytest.mark.parametrize(("keep", "dom", "ctx"), [(64, 54, 10), (128, 108, 20), (192, 162, 30)])
def test_visionzip_official_is_the_released_tower_output(keep, dom, ctx):
    g = torch.Generator().manual_seed(keep)
    b = 2
    x = torch.randn(b, 1 + N, D, generator=g)
    att = torch.rand(b, 1 + N, generator=g)
    key = torch.randn(b, 1 + N, 16, generator=g)
    inp = inp_for(x, att, key, protected=1)
    plan = get("visionzip")(official=True).reduce(inp, torch.full((b,), keep))
    assert isinstance(plan, OrderedPlan)
    out, _ = ordered.apply(x, inp.size, plan)
    assert out.shape == (b, keep, D)  # [CLS] + (dom - 1) + ctx
    for i in range(b):
        want = visionzip_ref(x[i], att[i, 1:], key[i], dom, ctx)
        assert (out[i] - want).abs().max() < 1e-5, i
    # the default: dom + ctx patch tokens on top of [CLS], size-weighted means, positional order
    keep_d, _ = get("visionzip")().reduce(inp, torch.full((b,), keep))
    assert (keep_d.sum(1) == keep + 1).all()
    assert torch.equal(keep_d.sum(1) - 1, plan[0].sum(1))  # one more dominant patch


def test_visionzip_official_on_llava_reads_values_in_official_order():
    model = llava()
    ids = torch.tensor([prompt([5], [7, 8])])
    pv = pixels(1)
    with tokenthin.applied(model, "visionzip", keep=8, official=True):
        plans, embeds = lm_reads(model, lambda: generate(model, ids, None, pv, new=2))
        kept = tokenthin.info(model).kept
    ((inp, plan),) = plans
    assert kept == [7]  # LLaVA drops [CLS]: round(54 / 64 * 8) = 7 dominant including [CLS], 1 contextual
    want, _ = ordered.apply(inp.x, inp.size, plan)
    assert (visual_part(embeds[0], ids, 7) - want[0].to(embeds[0].dtype)).abs().max() < 1e-6
    # the one contextual token is last and is target + mean(assigned), not their mean
    tgt = int(plan[1][0].max())
    assigned = (plan[1][0] == tgt).nonzero().flatten()
    x = inp.x[0]
    assert (want[0, -1] - (x[tgt] + x[assigned].mean(0))).abs().max() < 1e-5
    assert int(plan[0].sum()) == 7 and inp.x.shape[1] == TPI


@pytest.mark.parametrize(("method", "kw"), [("globalcom2", {"keep": 0.5}), ("holov", {"keep": 7, "partitions": 3})])
def test_official_orders_batch_equals_singles_on_anyres(method, kw):
    from tiny_vlm import llava_next, next_inputs, next_single, ngenerate

    model = llava_next()
    inputs = next_inputs(model)
    with tokenthin.applied(model, method, official=True, **kw):
        toks, logits = ngenerate(model, inputs)
        for i in range(3):
            t1, l1 = ngenerate(model, next_single(inputs, i))
            assert torch.equal(t1[0], toks[i]) and (l1[0] - logits[i]).abs().max() < 1e-4, i
