"""ToMA (facility-location destinations per tile, attention-like soft merge, transpose unmerge, pattern reuse) on
diffusers UNets: the soft-merge op, the invariants, the plan's reuse, and the plan and block output against a
restatement of the paper's algorithm written here (greedy facility location by its set function, dense matrices) on
a 64 x 64 token grid."""

from __future__ import annotations

import pytest
import torch

import tokenthin
from denoise_checks import BUILDERS, batch_singles_and_remove, bf16, capture, cfg_batch, identity, sdpa_eager
from test_methods_tomesd import smooth_tokens
from tiny_diffusers import plain_unet, run, sd_unet
from tokenthin.adapters.registry import find_adapter
from tokenthin.methods.base import ReduceInput
from tokenthin.methods.toma import ToMA, tiles
from tokenthin.ops import soft

pytest.importorskip("diffusers")


@pytest.fixture(autouse=True)
def _merge_whatever_it_costs(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tiny UNets' blocks cost less than a ToMA plan (denoise/cost.py would skip them): test the merging."""
    from tokenthin.denoise import cost

    monkeypatch.setattr(cost, "ENABLED", False)


class _Keys:
    has_cls = False

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def keys(self, layer: int) -> torch.Tensor:
        return self.x


def _inp(x: torch.Tensor, h: int, w: int) -> ReduceInput:
    b, n, _ = x.shape
    return ReduceInput(
        x=x,
        size=torch.ones(b, n),
        valid=torch.ones(b, n, dtype=torch.bool),
        num_protected=0,
        layer=0,
        num_layers=1,
        grid=(h, w),
        pristine=True,
        signals=_Keys(x),
    )


def restated_plan(x: torch.Tensor, h: int, w: int, keep: int, t: int, tau: float):
    """The paper's algorithm, restated per tile: greedy maximisation of F(D) = sum_i max_{j in D} s(i, j), then
    A[j, i] = softmax_j(cos(x_i, d_j) / tau) within the tile; merge A / rowsum(A), unmerge A^T. Returns the dense
    (k, N) merge and (N, k) unmerge of one sample and its destinations."""
    n = h * w
    x = x.double()
    u = x / x.norm(dim=-1, keepdim=True)
    rows, dsts = [], []
    for ti in range((h + t - 1) // t):
        for tj in range((w + t - 1) // t):
            idx = [r * w + c for r in range(ti * t, min(h, ti * t + t)) for c in range(tj * t, min(w, tj * t + t))]
            cos = u[idx] @ u[idx].T
            s = (1 + cos) / 2
            k = min(len(idx), max(1, round(len(idx) * keep / n)))
            chosen: list[int] = []
            for _ in range(k):
                cover = s[:, chosen].amax(1) if chosen else torch.zeros(len(idx), dtype=s.dtype)
                gains = torch.maximum(cover.unsqueeze(1), s).sum(0) - cover.sum()  # F(D + c) - F(D), every c
                gains[chosen] = -1.0
                top = float(gains.max())
                chosen.append(int((gains >= top - 1e-9 * max(top, 1.0)).nonzero()[0]))  # ties: the first
            a = torch.softmax(cos[chosen] / tau, dim=0)  # (k, n_tile): each token over the destinations
            full = torch.zeros(k, n, dtype=x.dtype)
            full[:, idx] = a
            rows.append(full)
            dsts += [idx[c] for c in chosen]
    a = torch.cat(rows)
    return (a / a.sum(1, keepdim=True)).float(), a.T.float(), dsts


def test_tiles_cover_the_grid_once() -> None:
    tok = tiles(5, 7, 3)
    assert tok.shape == (6, 9)
    got = tok[tok >= 0].sort().values
    assert torch.equal(got, torch.arange(35))


def test_soft_merge_unmerge_equal_the_dense_matrices() -> None:
    x = smooth_tokens(2, 16, 24, 8)
    plan = ToMA(tile=8).soft_plan(_inp(x, 16, 24), torch.full((2,), 192))
    mw, uw = soft.dense(plan)
    assert plan.k == 192 and mw.shape == (2, 192, 384)
    assert torch.allclose(mw.sum(-1), torch.ones(2, 192)) and torch.allclose(uw.sum(-1), torch.ones(2, 384))
    y = soft.merge(x, plan)
    assert torch.allclose(y, mw @ x, atol=1e-5)
    z = torch.randn(2, 192, 8)
    assert torch.allclose(soft.unmerge(z, plan), uw @ z, atol=1e-5)
    assert soft.merge(x.to(torch.bfloat16), plan).dtype == torch.bfloat16


@pytest.mark.parametrize(("h", "w", "t"), [(64, 64, 8), (12, 10, 4)])
def test_plan_equals_the_restated_algorithm(h: int, w: int, t: int) -> None:
    # random features: smooth fields (bilinear upsampling) make facility-location gains tie to 1e-16, and then any
    # two exact implementations may pick differently
    x = torch.randn(2, h * w, 16, generator=torch.Generator().manual_seed(1))
    keep = (h * w) // 2
    plan = ToMA(tile=t).soft_plan(_inp(x, h, w), torch.full((2,), keep))
    mw, uw = soft.dense(plan)
    assert plan.dst is not None
    for i in range(2):
        m_ref, u_ref, dsts = restated_plan(x[i], h, w, keep, t, 0.1)
        assert mw.shape[1] == m_ref.shape[0] == len(set(dsts))
        assert set(plan.dst[i].tolist()) == set(dsts)  # the same destinations
        # exact ties may order a tile's picks differently: compare slots by their destination token
        ours, ref = plan.dst[i].argsort(), torch.tensor(dsts).argsort()
        assert (mw[i][ours] - m_ref[ref]).abs().max() <= 1e-5
        assert (uw[i][:, ours] - u_ref[:, ref]).abs().max() <= 1e-5


@pytest.mark.parametrize("family", list(BUILDERS))
def test_zero_ratio_is_identity(family: str) -> None:
    identity(family, "toma", {"ratio": 0.0})


@pytest.mark.parametrize("family", list(BUILDERS))
def test_batch_equals_singles_and_remove_is_exact(family: str) -> None:
    batch_singles_and_remove(family, "toma", {"ratio": 0.5, "max_downsample": 2, "tile": 4})


def test_cfg_batch_equals_separate_runs() -> None:
    cfg_batch("toma", {"ratio": 0.5, "merge_crossattn": True, "merge_mlp": True})


@pytest.mark.parametrize("family", ["sd", "plain"])
def test_sdpa_equals_eager(family: str) -> None:
    sdpa_eager(family, "toma", {"ratio": 0.5, "max_downsample": 2})


@pytest.mark.parametrize("family", list(BUILDERS))
def test_bf16_runs(family: str) -> None:
    bf16(family, "toma", {"ratio": 0.5})


def test_unet2d_attention_equals_the_restated_scheme() -> None:
    """UNet2DModel at 64 x 64 tokens: ``(x + U out(attn(q(M gn(x)), k(..), v(..)))) / rescale`` with the restated
    plan of the whole grid (8 x 8 tiles, half the tokens kept)."""
    import torch.nn.functional as F

    model = plain_unet(sample=128)
    a = find_adapter(model).blocks[0].module
    tokenthin.apply(model, "toma", ratio=0.5)
    got: dict = {}
    hooks = capture(a, got)
    run(model, torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(4)), 3.0)
    for hk in hooks:
        hk.remove()
    tokenthin.remove(model)
    x4 = got["args"][0]
    b, c, h, w = x4.shape
    tok = x4.flatten(2).transpose(1, 2)
    m, u, _ = restated_plan(tok[0], h, w, h * w - int(h * w * 0.5), 8, 0.1)
    with torch.no_grad():
        z = m @ a.group_norm(x4.flatten(2)).transpose(1, 2)
        q, k, v = (p(z).view(b, -1, a.heads, c // a.heads).transpose(1, 2) for p in (a.to_q, a.to_k, a.to_v))
        o = a.to_out[0](F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c))
        y = ((u @ o).transpose(1, 2).reshape(b, c, h, w) + x4) / a.rescale_output_factor
    assert (got["out"] - y).abs().max() <= 1e-5


def test_plans_are_reused_for_reuse_steps_calls_and_dropped_by_remove() -> None:
    model = sd_unet()
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    x2 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    rt = tokenthin.apply(model, "toma", ratio=0.5, reuse_steps=2) and tokenthin.api._APPLIED[model]
    run(model, x, 10)
    first = dict(rt._soft_cache)
    assert set(first) == {0, 5, 6}
    with tokenthin.applied(model, "toma", ratio=0.5, replace=True):
        fresh_x2 = run(model, x2, 9)
    rt = tokenthin.apply(model, "toma", ratio=0.5, reuse_steps=2, replace=True) and tokenthin.api._APPLIED[model]
    run(model, x, 10)
    reused = run(model, x2, 9)  # the second call reuses the plans made for x
    assert all(rt._soft_cache[i][2] is p for i, (_, _, p) in rt._soft_cache.items())
    assert not torch.equal(reused, fresh_x2)
    plans = {i: v[2] for i, v in rt._soft_cache.items()}
    run(model, x2, 8)  # third call: planned again
    assert all(rt._soft_cache[i][2] is not plans[i] for i in plans)
    tokenthin.remove(model)
    assert rt._soft_cache == {}
