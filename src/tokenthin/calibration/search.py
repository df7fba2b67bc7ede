"""The searches behind :func:`tokenthin.calibrate`, on plain schedules: no model here, only two callables,
``flops_of(schedule) -> fraction`` (analytic) and ``fidelity(schedule) -> float`` (higher is better, 1.0 at no
reduction; the caller runs the model on calibration images and caches by schedule).

* :func:`greedy_layers`: G-Search-like greedy over per-layer ``r`` (merging, site ``layers``);
* :func:`sigmoid_layers`: P-Sigmoid-like parametric keep curve over the layers, grid + coordinate search;
* :func:`best_site`: the site ``k`` (and the keep it allows under the target) for single-site pruning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from ..budget import Schedule
from ..errors import BudgetError

Fidelity = Callable[[Schedule], float]
FlopsOf = Callable[[Schedule], float]


def valid_r(rs: Sequence[int], n_patches: int) -> bool:
    """Every layer merges at most half of the patch tokens it has (and leaves at least one)."""
    n = n_patches
    for r in rs:
        if r < 0 or r > n // 2 or n - r < 1:
            return False
        n -= r
    return True


def layers(rs: Sequence[int], num_layers: int) -> Schedule:
    return Schedule("layers", num_layers, r=tuple(int(r) for r in rs))


def clamp_r(rs: Sequence[int], n_patches: int) -> list[int]:
    """``rs`` with every layer's ``r`` lowered (if needed) to at most half of the tokens it has."""
    n, out = n_patches, []
    for r in rs:
        r = max(0, min(int(r), n // 2, n - 1))
        out.append(r)
        n -= r
    return out


def _step(rs: list[int], i: int, save: float, n_patches: int, L: int, flops_of: FlopsOf) -> list[int] | None:
    """``rs`` with the smallest increase of ``r`` after layer ``i`` that saves ``save`` of the FLOPs (or the largest
    possible increase, if none saves that much); later layers merge less where they would exceed half of their
    (now fewer) tokens. None when layer ``i`` can merge no more."""
    base = flops_of(layers(rs, L))
    n_i = n_patches - sum(rs[:i])
    top = min(n_i // 2, n_i - 1) - rs[i]
    if top <= 0:
        return None

    def bump(d: int) -> list[int]:
        out = list(rs)
        out[i] += d
        return clamp_r(out, n_patches)

    lo, hi = 1, top
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if base - flops_of(layers(bump(mid), L)) >= save else (mid + 1, hi)
    cand = bump(lo)
    return cand if flops_of(layers(cand, L)) < base else None


def greedy_layers(
    n_patches: int,
    num_layers: int,
    target: float | Sequence[float],
    flops_of: FlopsOf,
    fidelity: Fidelity,
    *,
    steps: int = 16,
    on_step: Callable[[Schedule, float, float], None] | None = None,
) -> list[Schedule]:
    """Start from no reduction; at each step, try merging more after every layer (each candidate sized to save
    ``(1 - lowest target) / steps`` of the FLOPs, or only what is left to the next target) and keep the one that
    loses the least fidelity per FLOP saved. One pass serves several targets: the schedule is recorded where it
    reaches each (highest first). About ``steps`` x (layers - 1) fidelity evaluations. Returns one schedule per
    target, in the order given."""
    L = num_layers
    targets = [float(target)] if isinstance(target, (int, float)) else [float(t) for t in target]
    todo = sorted(set(targets), reverse=True)
    found: dict[float, Schedule] = {}
    rs = [0] * (L - 1)
    cur_f, cur_fid = 1.0, fidelity(layers(rs, L))
    save_step = (1.0 - todo[-1]) / max(1, steps)
    while todo:
        if cur_f <= todo[0] + 1e-9:
            found[todo.pop(0)] = layers(rs, L)
            continue
        save = min(save_step, cur_f - todo[0])
        best: tuple[float, list[int], float, float] | None = None
        for i in range(L - 1):
            cand = _step(rs, i, save, n_patches, L, flops_of)
            if cand is None:
                continue
            f = flops_of(layers(cand, L))
            fid = fidelity(layers(cand, L))
            cost = (cur_fid - fid) / max(cur_f - f, 1e-12)
            if best is None or cost < best[0]:
                best = (cost, cand, f, fid)
        if best is None:
            raise BudgetError(
                f"flops={todo[0]} is unreachable by merging after every layer (reached {cur_f:.3f}: each layer "
                "merges at most half of its tokens); use a larger target"
            )
        _, rs, cur_f, cur_fid = best  # every step lowers the FLOPs by at least one token's worth: the loop ends
        if on_step is not None:
            on_step(layers(rs, L), cur_f, cur_fid)
    return [found[t] for t in targets]


def sigmoid_counts(n_patches: int, num_layers: int, slope: float, center: float, floor: float) -> list[int]:
    """Patch tokens left after each layer but the last on the curve ``floor + (1 - floor) * h(x)``, ``x = j / (L-1)``
    the depth of boundary ``j``, ``h`` a logistic step of ``slope`` centred at ``center`` rescaled to fall from 1 at
    x=0 to 0 at x=1; clamped so that a layer merges at most half of its tokens."""
    L = num_layers

    def g(x: float) -> float:
        return 1.0 / (1.0 + math.exp(max(-60.0, min(60.0, slope * (x - center)))))

    g0, g1 = g(0.0), g(1.0)
    span = max(g0 - g1, 1e-12)
    n, out = n_patches, []
    for j in range(1, L):
        keep = floor + (1.0 - floor) * (g(j / (L - 1)) - g1) / span
        want = round(keep * n_patches)
        n = max(n - n // 2, min(n, want))
        out.append(n)
    return out


def _sigmoid_schedule(
    n_patches: int, L: int, slope: float, center: float, target: float, flops_of: FlopsOf
) -> Schedule | None:
    """The curve's schedule with ``floor`` bisected so that its FLOPs are at most ``target`` (None: unreachable)."""

    def sched(floor: float) -> Schedule:
        counts = sigmoid_counts(n_patches, L, slope, center, floor)
        prev = [n_patches, *counts[:-1]]
        return layers([p - c for p, c in zip(prev, counts)], L)

    if flops_of(sched(0.0)) > target + 1e-9:
        return None
    lo, hi = 0.0, 1.0  # flops_of(sched(lo)) <= target; find the largest such floor
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if flops_of(sched(mid)) <= target + 1e-9 else (lo, mid)
    return sched(lo)


SLOPES = (2.0, 5.0, 10.0, 20.0, 40.0)
CENTERS = (0.0, 0.2, 0.4, 0.6, 0.8)


def sigmoid_layers(
    n_patches: int,
    num_layers: int,
    target: float,
    flops_of: FlopsOf,
    fidelity: Fidelity,
    *,
    rounds: int = 2,
    on_step: Callable[[Schedule, float, float], None] | None = None,
) -> Schedule:
    """A grid over (slope, center) with the floor solved for the target, then ``rounds`` of coordinate search around
    the best point (halving the steps)."""
    L = num_layers
    seen: dict[tuple[float, float], tuple[float, Schedule] | None] = {}

    def score(slope: float, center: float) -> float:
        key = (round(slope, 6), round(center, 6))
        if key not in seen:
            s = _sigmoid_schedule(n_patches, L, slope, center, target, flops_of)
            seen[key] = None if s is None else (fidelity(s), s)
            if s is not None and on_step is not None:
                on_step(s, flops_of(s), seen[key][0])  # type: ignore[index]
        v = seen[key]
        return -math.inf if v is None else v[0]

    grid = [(s, c) for s in SLOPES for c in CENTERS]
    best = max(grid, key=lambda p: score(*p))
    if score(*best) == -math.inf:
        raise BudgetError(f"flops={target} is unreachable by merging after every layer; use a larger target")
    ds, dc = 2.0, 0.1  # slope moves by a factor, center by an offset
    for _ in range(rounds):
        for cand in (
            (best[0] * ds, best[1]),
            (best[0] / ds, best[1]),
            (best[0], best[1] + dc),
            (best[0], best[1] - dc),
        ):
            if score(*cand) > score(*best):
                best = cand
        ds, dc = math.sqrt(ds), dc / 2
    return seen[(round(best[0], 6), round(best[1], 6))][1]  # type: ignore[index]


def best_site(
    candidates: Sequence[Schedule],
    fidelity: Fidelity,
    on_step: Callable[[Schedule, float, float], None] | None = None,
    flops_of: FlopsOf | None = None,
) -> Schedule:
    """The most faithful of the single-site schedules (one per feasible layer, each with the keep the target allows)."""
    if not candidates:
        raise BudgetError("no site can reach this FLOPs target with one reduction; use a larger target")
    scored = []
    for s in candidates:
        fid = fidelity(s)
        scored.append((fid, s))
        if on_step is not None and flops_of is not None:
            on_step(s, flops_of(s), fid)
    return max(scored, key=lambda t: t[0])[1]
