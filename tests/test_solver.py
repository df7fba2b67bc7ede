"""The FLOPs solver for merging (site ``layers``) and the resize + merge split: targets met, no collapse."""

from __future__ import annotations

import random

import pytest
import torch

import tokenthin
from tiny import build, max_diff, outputs
from tokenthin import budget, solver
from tokenthin.adapters.registry import find_adapter
from tokenthin.flops import EncoderDims

VITS = EncoderDims(hidden=384, mlp_hidden=1536, mlp_mats=2, num_layers=12, patch=(14, 14), channels=3, num_protected=1)


def _resolve(dims: EncoderDims, grid: tuple[int, int], flops: float, rule: str = solver.DEFAULT_RULE, **kw):
    return budget.resolve(
        kind="merge",
        sites=("layers",),
        default_site="layers",
        name="tome",
        site=None,
        r=None,
        keep=None,
        flops=flops,
        dims=dims,
        grid=grid,
        rule=rule,
        **kw,
    )


@pytest.mark.parametrize("rule", solver.RULES)
@pytest.mark.parametrize("target", [0.25, 0.4, 0.5, 0.75, 0.9])
def test_flops_target_is_met(rule: str, target: float) -> None:
    s = _resolve(VITS, (16, 16), target, rule)
    got = budget.flops_fraction(s, VITS, (16, 16))
    if rule == "constant":  # the closest constant r, as before
        assert abs(got - target) < 0.01
    else:
        assert target - solver.BELOW - 1e-9 <= got <= target + solver.ABOVE + 1e-9, (rule, got)
    n = 256
    for r in s.r:  # every layer merges at most half of what it holds
        assert 0 <= r <= n // 2
        n -= r


def test_the_old_constant_rule_is_kept_and_collapses() -> None:
    s = _resolve(VITS, (16, 16), 0.25, "constant")
    assert len(set(s.r[:3])) == 1  # a constant r (clamped by halves at the end)
    _, out = budget.tokens_per_layer(s, 256, 1)
    assert out <= 3  # what the default rule fixes: the image collapses to [CLS] + a token or two


def _random_case(rng: random.Random):
    layers = rng.randint(3, 12)
    dims = EncoderDims(64, 128, 2, layers, (16, 16), 3, rng.randint(0, 3))
    grid = (rng.randint(4, 20), rng.randint(4, 20))

    def cost(rs: tuple[int, ...]) -> float:
        return budget.flops_fraction(budget.Schedule("layers", layers, r=rs), dims, grid)

    return grid[0] * grid[1], layers - 1, cost, rng.uniform(0.3, 0.95)


def _in_window(f: float, target: float) -> bool:
    return target - solver.BELOW <= f <= target + solver.ABOVE


def test_default_never_collapses_below_the_old_constant_rule() -> None:
    """Property, on random shapes and targets: the default schedule keeps at least the tokens the old constant-r
    choice kept (where both meet the target), and no candidate schedule meeting the target merges a smaller share
    of a layer's tokens."""
    rng = random.Random(0)
    for _ in range(12):
        n, steps, cost, target = _random_case(rng)
        rs, f = solver.solve(n, steps, cost, target)
        if not _in_window(f, target):
            continue
        const, g = solver.solve(n, steps, cost, target, "constant")
        if _in_window(g, target):
            assert min(solver.counts_of(rs, n)) >= min(solver.counts_of(const, n)), (n, steps, target, rs, const)
        worst = solver.worst_share(rs, n)
        for other in solver.candidates(n, steps, "smooth"):
            if _in_window(cost(other), target):
                assert solver.worst_share(other, n) >= worst - 1e-3, (other, rs)


def test_hold_rule_keeps_the_most_tokens() -> None:
    """Property: the ``hold`` rule's smallest token count is the largest of every candidate meeting the target."""
    rng = random.Random(1)
    for _ in range(8):
        n, steps, cost, target = _random_case(rng)
        rs, _ = solver.solve(n, steps, cost, target, "hold")
        best = min(solver.counts_of(rs, n))
        for other in solver.candidates(n, steps, "hold"):
            if _in_window(cost(other), target):
                assert min(solver.counts_of(other, n)) <= best, (other, rs)


def test_the_solver_is_fast() -> None:
    import time

    t0 = time.perf_counter()
    _resolve(VITS, (37, 37), 0.5)  # DINOv2's 518 px default: 1369 patches
    assert time.perf_counter() - t0 < 1.0


def test_unknown_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown schedule rule"):
        _resolve(VITS, (16, 16), 0.5, "fastest")


def test_resize_split_shrinks_only_when_merging_would_keep_too_little() -> None:
    from tokenthin.methods.downsample import scaled_size

    def input_patches(f: float) -> int:
        h, w = scaled_size(224, 224, 14, f)
        return (h // 14) * (w // 14)

    def plan(target: float, min_keep: float) -> budget.Schedule:
        return _resolve(VITS, (16, 16), target, input_patches=input_patches, min_keep=min_keep)

    assert plan(0.5, 0.2) == _resolve(VITS, (16, 16), 0.5)  # merging alone keeps enough: no resize
    assert plan(1.0, 0.2).input_keep is None and sum(plan(1.0, 0.2).r) == 0
    for target in (0.25, 0.3):
        s = plan(target, 0.2)
        ip = input_patches(s.input_keep)
        assert ip < 256 and solver.counts_of(s.r, ip)[-1] >= 0.2 * ip
        got = budget.flops_fraction(s, VITS, (16, 16), ip)
        assert target - solver.BELOW - 1e-9 <= got <= target + solver.ABOVE + 1e-9
        # the largest such size: one size up, merging keeps less than asked
        up = min((k / 1000 for k in range(5, 1001, 5) if input_patches(k / 1000) > ip), key=input_patches)
        n_up = input_patches(up)

        def cost(c: tuple[int, ...], up: float = up, n_up: int = n_up) -> float:
            return budget.flops_fraction(budget.Schedule("layers", 12, r=c, input_keep=up), VITS, (16, 16), n_up)

        rs, _ = solver.solve(n_up, 11, cost, target)
        assert solver.counts_of(rs, n_up)[-1] < 0.2 * n_up
    assert input_patches(plan(0.25, 0.4).input_keep) < input_patches(plan(0.25, 0.2).input_keep)


def test_resize_tome_resizes_then_merges(images: torch.Tensor) -> None:
    model = build("dinov2")  # 8x8 patches at the 32 px fed; interpolates position embeddings
    ref = outputs(model, images)
    with tokenthin.applied(model, "resize-tome", flops=1.0):
        assert max_diff(ref, outputs(model, images)) <= 1e-5
    big = torch.randn(2, 3, 64, 64)
    tokenthin.apply(model, "resize-tome", flops=0.3, unmerge=True)
    with torch.no_grad():
        out = model(pixel_values=big)
    info = tokenthin.info(model)
    assert info.tokens_per_layer[0] < 257 and info.tokens_per_layer[-1] < info.tokens_per_layer[0]
    assert out.last_hidden_state.shape[1] == 257  # unmerged to the original 16x16 grid
    rt = tokenthin.runtime_of(model)
    plan = rt.plan_for(find_adapter(model).layout_for(64))
    assert plan.input_keep is not None and "input_keep" in plan.describe()
    tokenthin.remove(model)
    assert max_diff(ref, outputs(model, images)) == 0.0


def test_resize_tome_is_refused_where_the_input_cannot_be_resized() -> None:
    assert tokenthin.support("resize-tome", "hf_text") is not None
    assert tokenthin.support("resize-tome", "hf_vision") is None
    from test_adapters_hf_text import build as build_text

    with pytest.raises(tokenthin.TokenThinError, match="resizes the input"):
        tokenthin.apply(build_text("bert"), "resize-tome", flops=0.5)


@pytest.mark.parametrize("family", ["vit", "dinov2-reg"])
def test_resize_tome_under_flops_keeps_the_invariants(family: str) -> None:
    """The resize path (flops < 1 shrinks the image, then merges): batch == singles and SDPA == eager."""
    x = torch.randn(3, 3, 64, 64)
    sdpa, eager = build(family, "sdpa"), build(family, "eager")
    eager.load_state_dict(sdpa.state_dict())
    for m in (sdpa, eager):
        tokenthin.apply(m, "resize-tome", flops=0.3)
    got = outputs(sdpa, x)
    info = tokenthin.info(sdpa)
    assert info.tokens_per_layer[0] < info.num_protected + 256  # resized
    assert info.tokens_per_layer[-1] < info.tokens_per_layer[0]  # and merged
    assert max_diff(got, outputs(eager, x)) <= 1e-4
    for i in range(x.shape[0]):
        for key, v in outputs(sdpa, x[i : i + 1]).items():
            assert torch.allclose(got[key][i : i + 1], v, atol=2e-5, rtol=1e-4), (key, i)
