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


def alternate(
    rt: Any, repeats: int, fns: Sequence[Callable[[], object]], cpu: dict[bool, list[float]] | None = None
) -> dict[bool, list[float]]:
    """Seconds of each of ``fns``, summed over ``repeats``, with the runtime's hooks on (True) and off (False), the
    order of the two flipping every repeat so that drift hits both. Leaves the hooks on. With ``cpu`` (a dict), the
    calling thread's CPU seconds (``time.thread_time``) of the same calls go there too: with one torch thread every
    op runs on that thread, and other jobs on a shared machine distort it far less than the wall clock."""
    t = {True: [0.0] * len(fns), False: [0.0] * len(fns)}
    if cpu is not None:
        cpu.update({True: [0.0] * len(fns), False: [0.0] * len(fns)})
    for r in range(repeats):
        for reduced in (r % 2 == 1, r % 2 == 0):
            set_reduced(rt, reduced)
            for j, fn in enumerate(fns):
                c0 = time.thread_time()
                t[reduced][j] += timed(fn)
                if cpu is not None:
                    cpu[reduced][j] += time.thread_time() - c0
    set_reduced(rt, True)
    return t


def memory_and_own(rt: Any, fn: Callable[[], object]) -> tuple[float, float]:
    """One call of ``fn`` unreduced, one reduced: (peak-memory ratio reduced / unreduced, tokenthin's own share of
    the reduced call's time). Leaves the hooks on and measuring off."""
    from .memory import peak_memory

    mem, own = {}, 0.0
    for reduced in (False, True):
        set_reduced(rt, reduced)
        rt.measure, rt.overhead_s = reduced, 0.0
        with peak_memory(torch.device("cpu")) as m:
            t = timed(fn)
        mem[reduced] = m["mb"] or 0.0
        if reduced:
            own = rt.overhead_s / t
    rt.measure = False
    return mem[True] / max(mem[False], 1e-9), own
