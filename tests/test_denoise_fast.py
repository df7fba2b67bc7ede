"""The denoiser runtime's precomputed merge / unmerge (tokenthin.denoise.fast) against the general path
(tokenthin.ops.assign): the same merged tokens, the same unmerged tokens and the same UNet outputs (<= 1e-6 fp32)."""

from __future__ import annotations

import pytest
import torch

import tokenthin
from tiny_diffusers import plain_unet, run, sd_unet
from tokenthin.denoise import fast
from tokenthin.layout import Layout
from tokenthin.methods.base import ReduceInput, get
from tokenthin.ops import assign
from tokenthin.runtime.block import BlockSignals

pytest.importorskip("diffusers")


def plan_of(method: str, x: torch.Tensor, grid: tuple[int, int], **params: object) -> assign.Assignment:
    """The assignment the runtime builds for one block call of ``method`` on tokens ``x``."""
    b, n, _ = x.shape
    inp = ReduceInput(
        x=x,
        size=torch.ones(b, n),
        valid=torch.ones(b, n, dtype=torch.bool),
        num_protected=0,
        layer=0,
        num_layers=1,
        grid=grid,
        pristine=True,
        signals=BlockSignals(x),
        calibrating=False,
        layout=Layout(protected=0, grid=grid),
        step=torch.tensor([981.0, 1.0, 500.0][:b], dtype=torch.float64),
    )
    keep, target = get(method)(**params).reduce(inp, torch.full((b,), n // 2))
    if target is not None:
        target = target.masked_fill(keep, -1)
    return assign.build(keep, target)


@pytest.mark.parametrize(("method", "params"), [("tomesd", {"ratio": 0.5}), ("tome", {}), ("pool", {})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_equal_the_general_merge_and_unmerge(method: str, params: dict, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16 * 12, 24, generator=g)
    a = plan_of(method, x, (16, 12), **params)
    source = assign.compose_source(torch.arange(x.shape[1]).expand(3, -1), a)
    rows = fast.plan(a, source)
    assert rows is not None and (rows.src is not None) == a.merges
    x = x.to(dtype)
    ref = assign.merge(x, torch.ones(x.shape[:2]), a)[0]
    got = fast.merge(x, rows)
    assert got.dtype == dtype and got.shape == ref.shape
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert (got.float() - ref.float()).abs().max() <= tol
    y = torch.randn(ref.shape, generator=g).to(dtype)
    assert torch.equal(fast.unmerge(y, rows), assign.unmerge(y, source))
    if method == "tomesd":  # every destination's count is 1 + the sources merged into it
        assert int(rows.count.sum()) == x.shape[0] * x.shape[1]


def test_pruning_and_padding_take_the_general_path() -> None:
    x = torch.randn(2, 64, 8)
    a = plan_of("random", x, (8, 8))  # keeps a subset: the others are dropped
    source = assign.compose_source(torch.arange(64).expand(2, -1), a)
    assert bool((source < 0).any()) and fast.plan(a, source) is None
    keep = torch.ones(2, 64, dtype=torch.bool)
    keep[0, :3] = False  # sample 0 keeps 61 slots, sample 1 keeps 64: padding
    target = torch.full((2, 64), -1)
    target[0, :3] = 5
    b = assign.build(keep, target)
    assert not b.uniform and fast.plan(b, assign.compose_source(torch.arange(64).expand(2, -1), b)) is None


@pytest.mark.parametrize("builder", [sd_unet, plain_unet])
def test_unet_outputs_equal_the_general_path(builder, monkeypatch: pytest.MonkeyPatch) -> None:
    model = builder()
    x = torch.randn(2, model.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(1))
    kw = {"merge_crossattn": True, "merge_mlp": True} if builder is sd_unet else {}
    got = {}
    for enabled in (True, False):
        monkeypatch.setattr(fast, "ENABLED", enabled)
        with tokenthin.applied(model, "tomesd", ratio=0.5, max_downsample=2, **kw):
            got[enabled] = run(model, x)
            assert sum(tokenthin.info(model).merged) > 0
    assert (got[True] - got[False]).abs().max() <= 1e-6


def test_blocks_where_planning_costs_more_than_merging_saves_are_skipped() -> None:
    from tokenthin.denoise import cost

    assert not cost.worth_merging(4096, 204, 320, ("attn",), True)  # SD-1.5 64x64 at ratio 0.05
    assert cost.worth_merging(4096, 1024, 320, ("attn",), True) and cost.worth_merging(4096, 1, 320, ("attn",), False)
    model = sd_unet()
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ref = run(model, x)
    with tokenthin.applied(model, "tomesd", ratio=0.05):  # 12 of 256 tokens: not worth a similarity
        assert (run(model, x) - ref).abs().max() == 0 and sum(tokenthin.info(model).merged) == 0
    with tokenthin.applied(model, "tomesd", ratio=0.25):
        run(model, x)
        assert tokenthin.info(model).merged[0] == 64
    with tokenthin.applied(model, "random", keep=0.95):  # no planning cost: merges even a few tokens
        run(model, x)
        assert tokenthin.info(model).merged[0] == 12


def test_soft_plans_are_costed_by_their_greedy_rounds() -> None:
    """ToMA's planning (tile-local greedy rounds, measured on CPU) is counted: it is skipped where it cost more than
    it saved (the terrain UNet's 1024 tokens of width 64, tiny models) and kept where merging pays (SD-1.5's
    64x64 level, DiT-XL's 256 tokens of width 1152), and cost.ENABLED = False merges regardless."""
    from tokenthin.denoise import cost

    assert not cost.worth_merging(1024, 256, 64, ("attn",), True, soft_tile=8)  # terrain, ratio 0.25
    assert not cost.worth_merging(1024, 768, 64, ("attn",), True, soft_tile=8)  # terrain, ratio 0.75
    assert cost.worth_merging(1024, 256, 64, ("attn",), True)  # tomesd's plan there: no greedy rounds
    assert cost.worth_merging(4096, 2048, 320, ("attn",), True, soft_tile=8)  # SD-1.5 64x64, ratio 0.5
    assert cost.worth_merging(256, 128, 1152, ("attn",), True, soft_tile=8)  # DiT-XL/2, ratio 0.5
    # fewer rounds (fewer destinations per tile) cost less
    assert cost.plan_flops(1024, 64, True, 768, 8) < cost.plan_flops(1024, 64, True, 256, 8)
    model = sd_unet()
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ref = run(model, x)
    with tokenthin.applied(model, "toma", ratio=0.5):
        assert torch.equal(run(model, x), ref) and sum(tokenthin.info(model).merged) == 0
    cost.ENABLED = False
    try:
        with tokenthin.applied(model, "toma", ratio=0.5):
            assert not torch.equal(run(model, x), ref) and tokenthin.info(model).merged[0] == 128
    finally:
        cost.ENABLED = True


def test_own_time_is_split_by_kind_and_takes_the_given_clock() -> None:
    """measure=True splits tokenthin's own time into plan / merge / unmerge (summing to overhead_s), on the clock the
    runtime is given (benchmarks pass time.thread_time), and measuring leaves the output unchanged."""
    import time

    unet = sd_unet()
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    with tokenthin.applied(unet, "tomesd", ratio=0.5, merge_mlp=True):
        plain = run(unet, x)
        rt = tokenthin.api.runtime_of(unet)
        ticks: list[float] = []

        def clock() -> float:
            ticks.append(time.thread_time())
            return ticks[-1]

        rt.measure, rt.clock, rt.overhead_s, rt.overhead_by = True, clock, 0.0, {}
        timed = run(unet, x)
    assert torch.equal(plain, timed)
    assert set(rt.overhead_by) == {"plan", "merge", "unmerge"} and all(v >= 0 for v in rt.overhead_by.values())
    assert abs(sum(rt.overhead_by.values()) - rt.overhead_s) < 1e-9
    # one tic and one toc per planned block, per merged part's merge and unmerge (attn + mlp)
    assert len(ticks) >= 2 * 3 and len(ticks) % 2 == 0
