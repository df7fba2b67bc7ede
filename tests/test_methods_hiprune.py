"""HiPrune on a tiny random LLaVA and ViT: zero budget, batch vs single, exact counts, the selection against a
per-token Python reference on hand-made scores, and parameter errors."""

from __future__ import annotations

import pytest
import torch

import tokenthin
from tiny import build as build_vit
from tiny_vlm import PROMPTS, TPI, batch, generate, llava, pixels
from tokenthin.errors import TokenThinError
from tokenthin.methods.base import ReduceInput, SignalSource, get


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


def make_input(scores: Scores, h: int, w: int, b: int, layer: int, num_layers: int, protected: int = 0) -> ReduceInput:
    n = protected + h * w
    return ReduceInput(
        x=torch.zeros(b, n, 4),
        size=torch.ones(b, n),
        valid=torch.ones(b, n, dtype=torch.bool),
        num_protected=protected,
        layer=layer,
        num_layers=num_layers,
        grid=(h, w),
        pristine=True,
        signals=scores,
    )


def hiprune_ref(obj: list[float], deep: list[float], h: int, w: int, k: int, alpha: float) -> list[int]:
    """HiPrune on one sample, token by token."""
    a = min(round(k * alpha / 5), k // 5)
    anchors = sorted(range(h * w), key=lambda i: (-obj[i], i))[:a]
    chosen = set()
    for i in anchors:
        r, c = divmod(i, w)
        chosen.add(i)
        for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= rr < h and 0 <= cc < w:
                chosen.add(rr * w + cc)
    rest = sorted((i for i in range(h * w) if i not in chosen), key=lambda i: (-deep[i], i))
    return sorted(chosen | set(rest[: k - len(chosen)]))


@pytest.mark.parametrize(
    ("h", "w", "k", "alpha"), [(6, 6, 12, 0.5), (5, 7, 20, 1.0), (4, 4, 5, 0.1), (6, 5, 30, 0.3), (3, 3, 9, 1.0)]
)
@pytest.mark.parametrize("score", ["mean", "cls"])
def test_selection_matches_token_by_token_reference(h, w, k, alpha, score):
    b, P, layer, num_layers = 3, 1, 5, 8  # default object layer: int(9 / 24 * 8 + 0.5) - 1 = 2
    gen = torch.Generator().manual_seed(h * 100 + w * 10 + k)
    per_layer = {
        i: (torch.rand(b, P + h * w, generator=gen), torch.rand(b, P + h * w, generator=gen)) for i in (2, layer)
    }
    # sample 0: the top object-layer tokens sit at row ends and corners, where a wrapping neighbour would differ
    for t in per_layer[2]:
        t[0, P + w - 1] += 10.0
        t[0, P + 2 * w - 1] += 9.0
        t[0, P + (h - 1) * w] += 8.0
    inp = make_input(Scores(per_layer), h, w, b, layer, num_layers, protected=P)
    keep, target = get("hiprune")(alpha=alpha, score=score).reduce(inp, torch.full((b,), k))
    assert target is None and keep[:, :P].all() and (keep[:, P:].sum(1) == k).all()
    pick = 1 if score == "mean" else 0
    for i in range(b):
        obj = per_layer[2][pick][i, P:].tolist()
        deep = per_layer[layer][pick][i, P:].tolist()
        assert keep[i, P:].nonzero().flatten().tolist() == hiprune_ref(obj, deep, h, w, k, alpha), i


def test_buffers_do_not_wrap_around_row_ends():
    h = w = 4
    obj = torch.zeros(1, h * w)
    obj[0, 3] = 1.0  # top-right corner: its neighbours are 2 and 7, not 4 (the next row's first token)
    deep = torch.linspace(1.0, 0.0, h * w).unsqueeze(0)  # registers prefer low indices
    per_layer = {0: (obj, obj), 2: (deep, deep)}
    inp = make_input(Scores(per_layer), h, w, 1, layer=2, num_layers=3)
    keep, _ = get("hiprune")(alpha=1.0, object_layer=0).reduce(inp, torch.tensor([5]))
    # a = min(round(5 / 5), 5 // 5) = 1 anchor (3) + buffers (2, 7) + 2 registers (0, 1)
    assert keep[0].nonzero().flatten().tolist() == [0, 1, 2, 3, 7]


def test_zero_budget_generation_is_identical(model, inputs):
    ids, mask, pv = inputs
    with torch.no_grad():
        ref = generate(model, ids, mask, pv)
    with tokenthin.applied(model, "hiprune", keep=1.0, alpha=0.5):
        toks, logits = generate(model, ids, mask, pv)
        assert tokenthin.info(model).kept == [TPI] * 3
    assert torch.equal(toks, ref[0])
    assert (logits - ref[1]).abs().max() < 1e-5


@pytest.mark.parametrize(("keep", "alpha", "score"), [(0.5, 0.1, "mean"), (0.5, 1.0, "mean"), (10, 0.6, "cls")])
def test_batch_of_mixed_prompts_equals_single_runs_with_exact_counts(model, inputs, keep, alpha, score):
    ids, mask, pv = inputs
    k = keep if isinstance(keep, int) else int(TPI * keep)
    with tokenthin.applied(model, "hiprune", keep=keep, alpha=alpha, score=score):
        toks, logits = generate(model, ids, mask, pv)
        assert tokenthin.info(model).kept == [k] * 3
        for i, p in enumerate(PROMPTS):
            t1, l1 = generate(model, torch.tensor([p]), None, pv[i : i + 1])
            assert tokenthin.info(model).kept == [k]
            assert torch.equal(t1[0], toks[i])
            assert (l1[0] - logits[i]).abs().max() < 1e-4


def peaked_vit(attn: str = "sdpa") -> torch.nn.Module:
    """The tiny ViT with queries/keys scaled up, so attention is peaked and rankings have no near-ties."""
    model = build_vit("vit", attn)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.rsplit(".", 1)[-1] in ("query", "key"):
                mod.weight.mul_(6.0)
    return model


@pytest.mark.parametrize("alpha", [0.1, 0.5])
def test_vit_layer_site_matches_eager_attention(alpha):
    model = peaked_vit()
    eager = peaked_vit("eager")
    eager.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        att = eager(pixel_values=x, output_attentions=True).attentions
    tokenthin.apply(model, "hiprune", keep=20, site="layer:1", alpha=alpha)  # object layer 0, deep layer 1
    with torch.no_grad():
        out = model(pixel_values=x).last_hidden_state
    assert out.shape == (2, 1 + 20, 32)
    src = tokenthin.info(model).source
    for i in range(2):
        obj = att[0][i].mean(0).mean(0)[1:].tolist()  # received: heads, then queries averaged; patch columns
        deep = att[1][i].mean(0).mean(0)[1:].tolist()
        got = (src[i, 1:] >= 0).nonzero().flatten().tolist()
        assert got == hiprune_ref(obj, deep, 8, 8, 20, alpha)
    tokenthin.remove(model)


def test_parameter_errors():
    vit = build_vit("vit")
    for params in [{"alpha": 1.5}, {"alpha": -0.1}, {"object_layer": "middle"}, {"score": "max"}]:
        with pytest.raises(TokenThinError, match="hiprune"):
            tokenthin.apply(vit, "hiprune", keep=0.25, **params)
        assert not tokenthin.is_applied(vit)
    with pytest.raises(TokenThinError, match="object_layer=2 runs after the reduction point"):
        tokenthin.apply(vit, "hiprune", keep=0.25, site="layer:1", object_layer=2)
    assert not tokenthin.is_applied(vit)
    with pytest.raises(TokenThinError, match="outside the encoder"):
        tokenthin.apply(vit, "hiprune", keep=0.25, object_layer=-9)
    siglip = build_vit("siglip")
    x = torch.randn(1, 3, 32, 32)
    with tokenthin.applied(siglip, "hiprune", keep=0.25, score="cls"), pytest.raises(TokenThinError, match="'mean'"):
        siglip(pixel_values=x)
    with tokenthin.applied(siglip, "hiprune", keep=16, alpha=1.0):  # the default score needs no [CLS]
        assert siglip(pixel_values=x).last_hidden_state.shape == (1, 16, 32)


def test_refuses_tokens_that_are_not_one_full_grid():
    per_layer = {0: (torch.rand(1, 12), torch.rand(1, 12)), 2: (torch.rand(1, 12), torch.rand(1, 12))}
    inp = make_input(Scores(per_layer), 3, 4, 1, layer=2, num_layers=3)
    inp.grid = (3, 5)  # 12 tokens for a 3x5 grid
    with pytest.raises(TokenThinError, match="full patch grid"):
        get("hiprune")().reduce(inp, torch.tensor([4]))
