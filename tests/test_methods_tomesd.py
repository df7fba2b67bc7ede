"""tomesd against a restatement of the official algorithm (dbolya/tomesd ``bipartite_soft_matching_random2d`` and
its patched ``BasicTransformerBlock``), written here from its description: same destinations, same merged sources,
same targets and the same block outputs on a 64 x 64 token grid at ratio 0.5."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import tokenthin
from tiny_diffusers import plain_unet, run, sd_unet
from tokenthin.adapters.registry import find_adapter
from tokenthin.methods.base import ReduceInput
from tokenthin.methods.tomesd import ToMeSD, step_seed

pytest.importorskip("diffusers")

Fn = Callable[[torch.Tensor], torch.Tensor]


def official_offsets(seed: int, t: float, h: int, w: int, sy: int = 2, sx: int = 2) -> torch.Tensor:
    """The per-cell destination index the official code draws (here from our per-step seed)."""
    g = torch.Generator().manual_seed(step_seed(seed, t, (h, w)))
    return torch.randint(sy * sx, (h // sy, w // sx), generator=g)


def restated(metric: torch.Tensor, h: int, w: int, r: int, offsets: torch.Tensor, sy: int = 2, sx: int = 2):
    """The official matching, restated: returns (merge, unmerge, dst positions, merged positions, their targets)."""
    b, n, _ = metric.shape
    hs, ws = h // sy, w // sx
    mark = torch.zeros(h, w, dtype=torch.long)  # -1 marks a destination, 0 a source
    for ci in range(hs):
        for cj in range(ws):
            k = int(offsets[ci, cj])
            mark[ci * sy + k // sx, cj * sx + k % sx] = -1
    order = mark.flatten().argsort(stable=True)
    nd = hs * ws
    dst_pos, src_pos = order[:nd], order[nd:]
    m = metric / metric.norm(dim=-1, keepdim=True)
    scores = m[:, src_pos] @ m[:, dst_pos].transpose(1, 2)
    r = min(r, src_pos.numel())
    node_max, node_idx = scores.max(dim=-1)
    edges = node_max.argsort(dim=-1, descending=True)
    unm, srcs = edges[:, r:], edges[:, :r]
    into = node_idx.gather(1, srcs)

    def merge(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        s, d = x[:, src_pos], x[:, dst_pos]
        kept = s.gather(1, unm.unsqueeze(-1).expand(-1, -1, c))
        moving = s.gather(1, srcs.unsqueeze(-1).expand(-1, -1, c))
        d = d.scatter_reduce(1, into.unsqueeze(-1).expand(-1, -1, c), moving, reduce="mean")  # includes d itself
        return torch.cat([kept, d], 1)

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        c = y.shape[-1]
        k = unm.shape[1]
        kept, d = y[:, :k], y[:, k:]
        out = torch.zeros(b, n, c, dtype=y.dtype)
        out[:, dst_pos] = d
        out.scatter_(1, src_pos[unm].unsqueeze(-1).expand(-1, -1, c), kept)
        out.scatter_(
            1, src_pos[srcs].unsqueeze(-1).expand(-1, -1, c), d.gather(1, into.unsqueeze(-1).expand(-1, -1, c))
        )
        return out

    return merge, unmerge, dst_pos, src_pos[srcs], dst_pos[into]


def smooth_tokens(b: int, h: int, w: int, c: int, seed: int = 0) -> torch.Tensor:
    """Image-like features: smooth fields plus noise (neighbours are similar, as in a latent)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(b, c, h // 8, w // 8, generator=g)
    x = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False) + 0.1 * torch.randn(
        b, c, h, w, generator=g
    )
    return x.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("use_rand", [True, False])
def test_same_destinations_merged_sources_and_targets_as_official(use_rand: bool) -> None:
    h = w = 64
    x = smooth_tokens(2, h, w, 40)
    n = h * w
    r = int(n * 0.5)
    steps = torch.tensor([500.0, 21.0], dtype=torch.float64)
    inp = ReduceInput(
        x=x,
        size=torch.ones(2, n),
        valid=torch.ones(2, n, dtype=torch.bool),
        num_protected=0,
        layer=0,
        num_layers=1,
        grid=(h, w),
        pristine=True,
        signals=_Keys(x),
        step=steps,
    )
    keep, target = ToMeSD(use_rand=use_rand).reduce(inp, torch.full((2,), n - r))
    assert target is not None
    for i in range(2):
        off = official_offsets(0, float(steps[i]), h, w) if use_rand else torch.zeros(h // 2, w // 2, dtype=torch.long)
        _, _, dst, merged, into = restated(x[i : i + 1], h, w, r, off)
        ours_dst = (keep[i] & (target[i] < 0)).nonzero().squeeze(1)
        assert set(dst.tolist()) <= set(ours_dst.tolist())  # every destination is kept
        assert set((~keep[i]).nonzero().squeeze(1).tolist()) == set(merged[0].tolist())  # the same r sources merge
        assert torch.equal(target[i, merged[0]], into[0])  # ... into the same destinations
        assert int((~keep[i]).sum()) == r


class _Keys:
    has_cls = False

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def keys(self, layer: int) -> torch.Tensor:
        return self.x


def _capture(module: torch.nn.Module, store: dict) -> list:
    def pre(_m, args, kwargs):
        store["args"], store["kwargs"] = args, kwargs

    def post(_m, _a, out):
        store["out"] = out

    return [module.register_forward_pre_hook(pre, with_kwargs=True), module.register_forward_hook(post)]


def test_block_outputs_equal_the_official_patched_block() -> None:
    """SD-1.x layout: the first BasicTransformerBlock sees 64 x 64 = 4096 tokens; tomesd's patched forward
    ``x + u(attn1(m(norm1(x))))``, then attn2 and ff on all tokens, restated, gives our hooked block's output."""
    model = sd_unet(sample=64)
    blk = find_adapter(model).blocks[0].module
    t = 601.0
    tokenthin.apply(model, "tomesd", ratio=0.5)
    got: dict = {}
    hooks = _capture(blk, got)
    run(model, torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(3)), t)
    for hk in hooks:
        hk.remove()
    tokenthin.remove(model)
    x = got["args"][0]
    ehs = got["kwargs"]["encoder_hidden_states"]
    m, u, *_ = restated(x, 64, 64, int(4096 * 0.5), official_offsets(0, t, 64, 64))
    with torch.no_grad():
        y = u(blk.attn1(m(blk.norm1(x)))) + x
        y = blk.attn2(blk.norm2(y), encoder_hidden_states=ehs) + y
        y = blk.ff(blk.norm3(y)) + y
    assert (got["out"] - y).abs().max() <= 1e-5


def test_unet2d_attention_equals_the_restated_scheme() -> None:
    """UNet2DModel: the attention at 64 x 64 tokens (a 128 px input) equals
    ``x + u(out(attention(q(m(gn(x))), k(m(gn(x))), v(m(gn(x))))))`` with the official matching."""
    model = plain_unet(sample=128)
    a = find_adapter(model).blocks[0].module
    t = 3.0
    tokenthin.apply(model, "tomesd", ratio=0.5)
    got: dict = {}
    hooks = _capture(a, got)
    run(model, torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(4)), t)
    for hk in hooks:
        hk.remove()
    tokenthin.remove(model)
    x4 = got["args"][0]
    b, c, h, w = x4.shape
    assert (h, w) == (64, 64)
    tok = x4.flatten(2).transpose(1, 2)
    m, u, *_ = restated(tok, h, w, int(h * w * 0.5), official_offsets(0, t, h, w))
    with torch.no_grad():
        z = m(a.group_norm(tok.transpose(1, 2)).transpose(1, 2))
        q, k, v = (p(z).view(b, -1, a.heads, c // a.heads).transpose(1, 2) for p in (a.to_q, a.to_k, a.to_v))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c)
        y = u(a.to_out[0](o)).transpose(1, 2).reshape(b, c, h, w)
        y = (y + x4) / a.rescale_output_factor
    assert (got["out"] - y).abs().max() <= 1e-5
