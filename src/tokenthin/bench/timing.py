"""Wall-clock timing that tells the truth on a noisy machine: warm-up, then the median of interleaved repeats."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def paired_ratio(
    base: Callable[[], object],
    other: Callable[[], object],
    repeats: int = 5,
    device: torch.device | None = None,
) -> tuple[float, float, float]:
    """Time ``base`` and ``other`` alternately (so drift hits both); returns (base s, other s, other/base)."""
    base()
    other()
    tb, to = [], []
    for _ in range(repeats):
        for fn, acc in ((base, tb), (other, to)):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            acc.append(time.perf_counter() - t0)
    b, o = statistics.median(tb), statistics.median(to)
    return b, o, o / b


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def set_reduced(rt: Any, reduced: bool) -> None:
    """Attach (reduced) or detach (unreduced) an applied runtime's hooks in place."""
    if reduced and not rt.handles:
        rt.attach()
    elif not reduced and rt.handles:
        rt.detach()


def alternate(rt: Any, repeats: int, fns: Sequence[Callable[[], object]]) -> dict[bool, list[float]]:
    """Seconds of each of ``fns``, summed over ``repeats``, with the runtime's hooks on (True) and off (False), the
    order of the two flipping every repeat so that drift hits both. Leaves the hooks on."""
    t = {True: [0.0] * len(fns), False: [0.0] * len(fns)}
    for r in range(repeats):
        for reduced in (r % 2 == 1, r % 2 == 0):
            set_reduced(rt, reduced)
            for j, fn in enumerate(fns):
                t[reduced][j] += timed(fn)
    set_reduced(rt, True)
    return t
