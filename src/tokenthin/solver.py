"""The FLOPs solver for merging after every layer (site ``layers``): which per-layer ``r`` meets a FLOPs target.

Many schedules cost the same FLOPs; they differ in how many tokens the layers see. The solver searches these
families of schedules, each clamped so that one layer merges at most half of its tokens and at least one token
is left:

* ``constant``: the same ``r`` after every layer (ToMe's default);
* ``tome``: ToMe's decreasing ``(r, inflect)`` schedules, ``inflect`` -0.5 and -1 (see ``budget.tome_schedule``);
* ``geometric``: every layer keeps the same fraction ``q`` of its tokens (0.5 <= q <= 1, steps of 0.001);
* ``hold``: front-loaded: merge as fast as one layer may (half) down to ``m`` tokens, then hold ``m``.

Among the schedules whose FLOPs land in [target - 0.01, target + 0.001] (or, where none does, the closest ones), a
**rule** picks one:

* ``"smooth"`` (the default): the smallest largest share of a layer's tokens merged after it, ties by the larger
  minimum count; over every family, so it is about the ``geometric`` schedule: gentle merging everywhere;
* ``"hold"``: the largest minimum token count (= the count the last layer and the head see), ties by the larger
  sum of log token counts; over every family, so it is the ``hold`` schedule of the largest ``m`` that fits. It
  never collapses to a handful of tokens while a schedule that keeps more exists;
* ``"sum_log"``: the largest sum over layers of log(tokens entering the layer) (the geometric mean count), over
  every family;
* ``"constant"``: constant ``r`` only, the closest to the target (tokenthin before 0.1.0's solver fix; ToMe's own
  choice).

Measured on the real DINOv2-S (``benchmarks/bench_solver.py``: ``tokenthin bench``'s 16 images at 224 px, 256
patches, 12 layers), [CLS] cosine / saliency Pearson r to the unreduced model at 25% / 50% / 75% FLOPs:

| rule | ToMe | PiToMe |
|---|---|---|
| ``smooth`` | 0.725 / 0.422, **0.979 / 0.959**, **0.997 / 0.992** | 0.734 / 0.304, 0.913 / 0.789, 0.982 / 0.931 |
| ``hold`` (= ``sum_log``) | **0.732 / 0.559**, 0.905 / 0.811, - | **0.755 / 0.602**, 0.892 / 0.790, - |
| ``constant`` (old) | 0.637 / -0.002, 0.956 / 0.927, 0.997 / 0.993 | 0.655 / 0.001, **0.917 / 0.818**, 0.982 / 0.928 |

Merging half the tokens after the first layers (``hold``) costs more fidelity than keeping many tokens to the end
gains; ``smooth`` is the default. At 25% no merge schedule does well (the first layer alone costs 1/12): there a
smaller image is better, which ``resize-tome`` combines with merging (:func:`solve_resized`).

Pure Python on a few hundred candidates (about 10 ms for 256 patches, 12 layers); the runtime caches one plan per
input shape.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence

Cost = Callable[[tuple[int, ...]], float]  # a schedule (r after each layer but the last) -> its FLOPs fraction

RULES = ("smooth", "hold", "sum_log", "constant")
DEFAULT_RULE = "smooth"
# the window around the target a schedule may land in (the token-keeping rules pick near its top)
BELOW, ABOVE = 0.01, 0.001


def counts_of(rs: Sequence[int], n: int) -> list[int]:
    """Patch tokens entering each layer for a schedule ``rs`` (one ``r`` after each layer but the last)."""
    out = [n]
    for r in rs:
        out.append(out[-1] - r)
    return out


def _clamped(wanted: Sequence[int], n: int) -> tuple[int, ...]:
    rs = []
    for r in wanted:
        step = max(0, min(r, n // 2, n - 1))
        rs.append(step)
        n -= step
    return tuple(rs)


def _from_counts(counts: Sequence[int]) -> tuple[int, ...]:
    return tuple(a - b for a, b in itertools.pairwise(counts))


def _geometric(n: int, steps: int, q: float) -> tuple[int, ...]:
    counts = [n]
    for _ in range(steps):
        c = counts[-1]
        counts.append(max(1, -(-c // 2), min(c, round(c * q))))
    return _from_counts(counts)


def _hold(n: int, steps: int, m: int) -> tuple[int, ...]:
    counts = [n]
    for _ in range(steps):
        c = counts[-1]
        counts.append(max(min(m, c), -(-c // 2)))
    return _from_counts(counts)


def candidates(n: int, steps: int, rule: str) -> Iterator[tuple[int, ...]]:
    """The schedules ``rule`` chooses among, for ``n`` patch tokens and ``steps`` reduction points."""
    stride = max(1, n // 512)  # a few hundred candidates per family, also for long sequences
    for r in range(0, n // 2 + 1, 1 if rule == "constant" else stride):
        yield _clamped([r] * steps, n)
    if rule == "constant":
        return
    for inflect in (-0.5, -1.0):
        for r in range(1, n // 2 + 1, stride):
            lo = int(r * (1.0 - inflect))
            step = (2 * r - 2 * lo) / max(steps - 1, 1)
            yield _clamped([int(lo + step * i) for i in range(steps)], n)
    for q in range(500, 1001):
        yield _geometric(n, steps, q / 1000)
    for m in range(1, n + 1, stride):
        yield _hold(n, steps, m)


def _objective(rule: str, counts: Sequence[int]) -> tuple[float, ...]:
    logs = sum(math.log(c) for c in counts)
    if rule == "smooth":  # the smallest largest share of a layer's tokens merged, then the most tokens kept
        worst = max((a - b) / a for a, b in itertools.pairwise(counts))
        return (-round(worst, 3), min(counts), logs)
    if rule == "hold":
        return (min(counts), logs)
    return (logs,)


def solve(n: int, steps: int, cost: Cost, target: float, rule: str = DEFAULT_RULE) -> tuple[tuple[int, ...], float]:
    """The schedule ``rule`` picks for ``target`` (a FLOPs fraction) and its FLOPs fraction. Where no schedule is
    in the window [target - BELOW, target + ABOVE], the closest ones are the candidates (the caller checks that the
    target is reachable)."""
    if rule not in RULES:
        raise ValueError(f"unknown schedule rule {rule!r}; rules: {', '.join(RULES)}")
    scored: dict[tuple[int, ...], tuple[float, list[int]]] = {}
    for rs in candidates(n, steps, rule):
        if rs not in scored:
            counts = counts_of(rs, n)
            scored[rs] = (cost(rs), counts)
    ok = [(rs, f, c) for rs, (f, c) in scored.items() if target - BELOW <= f <= target + ABOVE]
    if not ok:
        best_err = min(abs(f - target) for f, _ in scored.values()) + 1e-12
        ok = [(rs, f, c) for rs, (f, c) in scored.items() if abs(f - target) <= best_err]
    if rule == "constant":  # the closest constant r, as before the fix (ties: the smaller r)
        rs, f, _ = min(ok, key=lambda t: (abs(t[1] - target), sum(t[0])))
        return rs, f
    rs, f, _ = max(ok, key=lambda t: (*_objective(rule, t[2]), -abs(t[1] - target)))
    return rs, f


def worst_share(rs: Sequence[int], n: int) -> float:
    """The largest share of a layer's tokens that ``rs`` merges after it."""
    return max((r / c for r, c in zip(rs, counts_of(rs, n))), default=0.0)


def input_sizes(input_patches: Callable[[float], int]) -> dict[int, float]:
    """The input sizes the downsampling baseline offers (keep fractions 0.005 .. 1 in steps of 0.005): patch count
    -> the largest fraction giving it."""
    sizes: dict[int, float] = {}
    for k in range(1000, 4, -5):
        sizes.setdefault(input_patches(k / 1000), k / 1000)
    return sizes


def resized_candidates(
    target: float,
    rule: str,
    n: int,
    steps: int,
    input_patches: Callable[[float], int],
    cost: Callable[[float | None, tuple[int, ...]], float],
) -> list[tuple[float | None, tuple[int, ...], float]]:
    """What joint calibration of ``resize-tome`` scores (:func:`tokenthin.calibrate`): (input fraction or None for
    the image as given, schedule, FLOPs fraction) for the full size and every smaller downsampling size that costs at
    least ``target - BELOW`` unreduced, each with ``rule``'s merge schedule for ``target`` (kept where it lands in
    [target - BELOW, target + ABOVE]), and the largest smaller size that meets ``target`` without merging."""
    none = (0,) * steps
    out: dict[tuple[float | None, tuple[int, ...]], float] = {}
    plain = False  # the largest smaller size meeting the target unreduced is in
    sizes = [(n, None)] + [(ip, f) for ip, f in sorted(input_sizes(input_patches).items(), reverse=True) if ip < n]
    for ip, f in sizes:
        unreduced = cost(f, none)
        if f is not None and not plain and unreduced <= target + ABOVE:
            out[(f, none)], plain = unreduced, True
        if unreduced < target - BELOW:  # merging cannot spend the budget here, nor at any smaller size
            break
        rs, reached = solve(ip, steps, lambda c, f=f: cost(f, c), target, rule)  # type: ignore[misc]
        if target - BELOW <= reached <= target + ABOVE:
            out.setdefault((f, rs), reached)
    return [(f, rs, reached) for (f, rs), reached in out.items()]


def solve_resized(
    target: float,
    min_keep: float,
    rule: str,
    n: int,
    steps: int,
    input_patches: Callable[[float], int],
    cost: Callable[[float | None, tuple[int, ...]], float],
) -> tuple[float | None, tuple[int, ...], float]:
    """Resize and merge (``resize-tome``): the input-patch fraction (None: the image as given), the schedule and its
    FLOPs fraction. The largest input (among the downsampling baseline's sizes, not below the target on its own)
    whose merge schedule for ``target`` (:func:`solve` with ``rule``) still keeps at least ``min_keep`` of the
    input's patches after the last merge; where none does, the smallest. ``cost(fraction, schedule)``: the FLOPs
    fraction of the image resized to ``fraction`` and merged by ``schedule``. The share kept only shrinks as the
    input grows, so the size is found by bisection (a few solves)."""
    sizes = input_sizes(input_patches)
    none = (0,) * steps
    order: list[tuple[int, float | None]] = [(n, None)]
    order += [(ip, f) for ip, f in sorted(sizes.items(), reverse=True) if ip < n and cost(f, none) >= target - BELOW]
    cache: dict[int, tuple[tuple[int, ...], float]] = {}

    def at(i: int) -> tuple[tuple[int, ...], float]:
        if i not in cache:
            ip, f = order[i]
            cache[i] = solve(ip, steps, lambda rs: cost(f, rs), target, rule)
        return cache[i]

    lo, hi = 0, len(order) - 1  # find the first (largest) size whose schedule merges gently enough
    while lo < hi:
        mid = (lo + hi) // 2
        rs, reached = at(mid)
        gentle = counts_of(rs, order[mid][0])[-1] >= min_keep * order[mid][0] and reached <= target + ABOVE
        if gentle:
            hi = mid
        else:
            lo = mid + 1
    rs, reached = at(lo)
    return order[lo][1], rs, reached
