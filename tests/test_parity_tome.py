"""``tome`` with ``official=True`` against a restatement of the official bipartite matching (facebookresearch/ToMe,
``tome/merge.py`` ``bipartite_soft_matching`` + ``merge_wavg``, written here from reading it, not copied), whose
output is ``[unmerged A, B]``: directly over several points at CLIP-L-336 / DINOv2 sizes (1 + 576 tokens), and
through the encoder runtime on a tiny DINOv2 with a 24 x 24 grid, merged at the layer boundary."""

from __future__ import annotations

import pytest
import torch

import tokenthin
from tokenthin.errors import BudgetError, TokenThinError
from tokenthin.methods.base import OrderedPlan, ReduceInput, SignalSource, get
from tokenthin.ops import assign, ordered

N = 576  # 24 x 24 patches


def official_step(x, size, metric, r, cls_token, dist_token):
    """One official merge on tokens in the official order: (x, size) after it, in the order it returns."""
    t = x.shape[1]
    r = min(r, (t - int(cls_token) - int(dist_token)) // 2)
    m = metric / metric.norm(dim=-1, keepdim=True)
    scores = m[:, 0::2] @ m[:, 1::2].transpose(1, 2)  # A (even places) x B (odd places)
    if cls_token:
        scores[:, 0, :] = -torch.inf
    if dist_token:
        scores[:, :, 0] = -torch.inf
    node_max, node_idx = scores.max(dim=-1)
    edges = node_max.argsort(dim=-1, descending=True, stable=True)
    unm, src = edges[:, r:], edges[:, :r]
    if cls_token:
        unm = unm.sort(dim=1).values
    dst = node_idx.gather(1, src)
    xs = x * size[..., None]
    a_x, b_x, a_s, b_s = xs[:, 0::2], xs[:, 1::2], size[:, 0::2], size[:, 1::2]
    c = x.shape[-1]
    b_x = b_x.scatter_add(1, dst[..., None].expand(-1, -1, c), a_x.gather(1, src[..., None].expand(-1, -1, c)))
    b_s = b_s.scatter_add(1, dst, a_s.gather(1, src))
    u_x, u_s = a_x.gather(1, unm[..., None].expand(-1, -1, c)), a_s.gather(1, unm)
    if dist_token:
        xs = torch.cat([u_x[:, :1], b_x[:, :1], u_x[:, 1:], b_x[:, 1:]], 1)
        s = torch.cat([u_s[:, :1], b_s[:, :1], u_s[:, 1:], b_s[:, 1:]], 1)
    else:
        xs, s = torch.cat([u_x, b_x], 1), torch.cat([u_s, b_s], 1)
    return xs / s[..., None], s


class Keys(SignalSource):
    def __init__(self, k: torch.Tensor) -> None:
        self.k = k

    def keys(self, layer: int) -> torch.Tensor:
        return self.k


def layer_fn(seed: int, c: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, c, generator=g) / c**0.5
    wk = torch.randn(c, 16, generator=g)
    return (lambda x: torch.tanh(x @ w) + x), (lambda x: x @ wk)


def run_tokenthin(x, rs, protected, official):
    """The method over the points, tokens kept positional, the official order carried as the runtime does."""
    b, c = x.shape[0], x.shape[-1]
    size = torch.ones(b, x.shape[1])
    order = None
    method = get("tome")(official=official)
    for i, r in enumerate(rs):
        f, key = layer_fn(i, c)
        x = f(x)
        n = x.shape[1]
        inp = ReduceInput(
            x=x,
            size=size,
            valid=torch.ones(b, n, dtype=torch.bool),
            num_protected=protected,
            layer=i,
            num_layers=len(rs) + 1,
            grid=(24, 24),
            pristine=i == 0,
            signals=Keys(key(x)),
            order=order,
        )
        plan = method.reduce(inp, torch.full((b,), n - protected - r))
        a = assign.build(plan[0], plan[1])
        x, size = assign.merge(x, size, a)
        order = ordered.ranks(a, ordered.parts(plan)[0])
    return x, size, order


@pytest.mark.parametrize(("protected", "dist"), [(1, False), (2, True), (0, False)])
def test_tome_official_reproduces_the_official_order_over_layers(protected, dist):
    g = torch.Generator().manual_seed(protected)
    b, c = 2, 32
    x0 = torch.randn(b, protected + N, c, generator=g)
    rs = [96, 80, 64, 48, 32, 16]
    ref, ref_s = x0, torch.ones(b, x0.shape[1])
    for i, r in enumerate(rs):
        f, key = layer_fn(i, c)
        ref = f(ref)
        ref, ref_s = official_step(ref, ref_s, key(ref), r, protected > 0, dist)
    out, size, order = run_tokenthin(x0, rs, protected, official=True)
    assert order is not None and out.shape == ref.shape
    perm = torch.argsort(order, dim=1)  # place -> token
    got = out.gather(1, perm[..., None].expand_as(out))
    assert (got - ref).abs().max() < 1e-5
    assert torch.equal(size.gather(1, perm), ref_s)
    # protected tokens stay first in both orders
    assert torch.equal(perm[:, :protected], torch.arange(protected).expand(b, -1))
    # the default keeps positional order, so its later splits pair other tokens: other merges
    out_d, _, order_d = run_tokenthin(x0, rs, protected, official=False)
    assert order_d is None
    vals = lambda t: torch.sort(t[..., 0], dim=1).values  # noqa: E731  (order-free comparison)
    assert (vals(out_d) - vals(ref)).abs().max() > 1e-3
    assert (vals(out) - vals(ref)).abs().max() < 1e-5


def test_tome_official_first_point_equals_the_default():
    """Before any merge both orders are positional: the official split is the default's (first patch in B)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1 + N, 32, generator=g)
    inp = ReduceInput(
        x=x,
        size=torch.ones(2, 1 + N),
        valid=torch.ones(2, 1 + N, dtype=torch.bool),
        num_protected=1,
        layer=0,
        num_layers=12,
        grid=(24, 24),
        pristine=True,
        signals=Keys(torch.randn(2, 1 + N, 16, generator=g)),
    )
    keep = torch.full((2,), N - 100)
    plan = get("tome")(official=True).reduce(inp, keep)
    assert isinstance(plan, OrderedPlan)
    kd, td = get("tome")().reduce(inp, keep)
    assert torch.equal(plan[0], kd) and torch.equal(plan[1], td)


def test_tome_official_refuses_more_than_one_matching_and_bad_flag():
    with pytest.raises(TokenThinError, match="official"):
        get("tome")(official="yes")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1 + N, 8, generator=g)
    inp = ReduceInput(
        x=x,
        size=torch.ones(1, 1 + N),
        valid=torch.ones(1, 1 + N, dtype=torch.bool),
        num_protected=1,
        layer=3,
        num_layers=12,
        grid=(24, 24),
        pristine=True,
        signals=Keys(x),
    )
    with pytest.raises(BudgetError, match="official=False"):
        get("tome")(official=True).reduce(inp, torch.tensor([N // 2 - 1]))


def tiny_dinov2():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, mlp_ratio=2, image_size=336, patch_size=14
    )
    return Dinov2Model(cfg).eval()


def reference_forward(model, px, rs):
    """The official algorithm on an HF DINOv2, merged at the layer boundary with that layer's keys (heads
    averaged), proportional attention as the additive log-size mask."""
    enc = model.encoder.layer
    keys = {}
    hooks = [
        lay.attention.k_proj.register_forward_hook(lambda _m, _i, o, i=i: keys.__setitem__(i, o))
        for i, lay in enumerate(enc)
    ]
    try:
        h = model.embeddings(px)
        size = torch.ones(h.shape[:2])
        for i, lay in enumerate(enc):
            h = lay(h, size.log()[:, None, None, :])
            if i < len(rs) and rs[i] > 0:
                b, t, _ = keys[i].shape
                metric = keys[i].view(b, t, 4, -1).mean(2)
                h, size = official_step(h, size, metric, rs[i], True, False)
        return model.layernorm(h), size
    finally:
        for hk in hooks:
            hk.remove()


def test_tome_official_through_the_runtime_on_dinov2_at_577_tokens():
    model = tiny_dinov2()
    px = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), tokenthin.applied(model, "tome", r=96, official=True):
        out = model(pixel_values=px).last_hidden_state
        info = tokenthin.info(model)
    tokens = info.tokens_per_layer
    assert tokens == [577, 481, 385, 289]
    rs = [96, 96, 96]
    with torch.no_grad():
        ref, ref_s = reference_forward(model, px, rs)
    assert info.order is not None
    got = out.gather(1, info.order[..., None].expand_as(out))
    assert (got - ref).abs().max() < 1e-4
    assert torch.equal(info.size.gather(1, info.order), ref_s)
    assert info.order[:, 0].eq(0).all()  # [CLS] first
    # the default merges other tokens from the second point on
    with torch.no_grad(), tokenthin.applied(model, "tome", r=96):
        out_d = model(pixel_values=px).last_hidden_state
        assert tokenthin.info(model).order is None
    assert (torch.sort(out_d[..., 0], 1).values - torch.sort(ref[..., 0], 1).values).abs().max() > 1e-3


def test_tome_official_padded_text_batch_equals_each_sample_alone():
    """Samples of different lengths are planned in groups (the runtime assembles their orders); each sample's
    official order and outputs are what it gets alone, unpadded, and batch == singles on DINOv2 too."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, vocab_size=120
    )
    model = transformers.BertModel(cfg).eval()
    lengths = (40, 33, 27)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 120, (3, 40), generator=g)
    mask = torch.zeros(3, 40, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, n:] = 0
        mask[i, :n] = 1
    with torch.no_grad(), tokenthin.applied(model, "tome", r=4, official=True):
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        info = tokenthin.info(model)
        for i, n in enumerate(lengths):
            alone = model(input_ids=ids[i : i + 1, :n]).last_hidden_state
            one = tokenthin.info(model)
            assert one.order is not None and info.order is not None
            k = one.kept[0]
            a = alone[0].gather(0, one.order[0, :, None].expand(-1, alone.shape[-1]))
            t = out[i].gather(0, info.order[i, :k, None].expand(-1, out.shape[-1]))
            assert (a - t).abs().max() < 2e-5, i
