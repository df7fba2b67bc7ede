"""Timing helpers shared by ``bench_methods_own.py`` and ``own_generate.py`` (not a test).

Own time is the runtime's measure of its reductions; reduced and unreduced calls alternate in one process (drift
hits both); the one-thread CPU variants time the work on ``time.thread_time`` with torch on one thread, which other
processes on a busy machine hardly change.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from tokenthin.bench.timing import set_reduced  # attach / detach once (a second attach doubles the hooks)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def own_and_time(rt: Any, fn: Callable[[], object], repeats: int) -> tuple[float, float, float]:
    """Median own seconds (the runtime's wall-clock measure of its reductions), median wall seconds of ``fn`` and
    median thread CPU seconds inside the method's ``reduce`` (robust to a busy machine; bookkeeping excluded)."""
    method = rt.method
    cpu = [0.0]
    plain = method.reduce

    def reduce(*args: Any, **kw: Any) -> Any:  # an instance attribute, dropped again below
        t0 = time.thread_time()
        try:
            return plain(*args, **kw)
        finally:
            cpu[0] += time.thread_time() - t0

    own, wall, cpus = [], [], []
    method.reduce = reduce
    try:
        for _ in range(repeats):
            rt.measure, rt.overhead_s, cpu[0] = True, 0.0, 0.0
            wall.append(timed(fn))
            own.append(rt.overhead_s)
            cpus.append(cpu[0])
    finally:
        rt.measure = False
        del method.reduce
    return statistics.median(own), statistics.median(wall), statistics.median(cpus)


def interleaved(rt: Any, fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall seconds of ``fn`` unreduced and reduced, alternating (drift hits both)."""
    t: dict[bool, list[float]] = {True: [], False: []}
    for r in range(repeats):
        for reduced in (r % 2 == 1, r % 2 == 0):
            set_reduced(rt, reduced)
            t[reduced].append(timed(fn))
    set_reduced(rt, True)
    return statistics.median(t[False]), statistics.median(t[True])


def interleaved_cpu(rt: Any, fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median thread CPU seconds of ``fn`` unreduced and reduced on one thread: the work each does, which a busy
    machine (other processes on the cores) hardly changes, unlike wall time."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    t: dict[bool, list[float]] = {True: [], False: []}
    try:
        for r in range(repeats):
            for reduced in (r % 2 == 1, r % 2 == 0):
                set_reduced(rt, reduced)
                t0 = time.thread_time()
                fn()
                t[reduced].append(time.thread_time() - t0)
    finally:
        set_reduced(rt, True)
        torch.set_num_threads(before)
    return statistics.median(t[False]), statistics.median(t[True])


def own_cpu(rt: Any, fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median thread CPU seconds inside tokenthin's reductions and of the whole reduced ``fn``, on one thread: own
    share as work done, which other processes on the machine distort far less than wall time."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    own, tot = [], []
    try:
        rt.clock, rt.measure = time.thread_time, True
        for _ in range(repeats):
            rt.overhead_s = 0.0
            t0 = time.thread_time()
            fn()
            tot.append(time.thread_time() - t0)
            own.append(rt.overhead_s)
    finally:
        rt.clock, rt.measure = time.perf_counter, False
        torch.set_num_threads(before)
    return statistics.median(own), statistics.median(tot)


def measure_all(rt: Any, fn: Callable[[], object], repeats: int) -> dict[str, float]:
    """The four measures every row takes of one applied method, in this order: own time and wall time of the reduced
    ``fn`` with the method's thread CPU (:func:`own_and_time`), the one-thread CPU own share (:func:`own_cpu`), and
    unreduced vs reduced interleaved, wall (:func:`interleaved`) and one-thread CPU (:func:`interleaved_cpu`).
    Times in seconds except the ``_ms`` fields; ``full`` / ``red`` (wall) and ``full_cpu`` / ``red_cpu`` medians."""
    own, wall, cpu = own_and_time(rt, fn, repeats)
    own_c, red_cpu_own = own_cpu(rt, fn, repeats)
    full, red = interleaved(rt, fn, repeats)
    full_cpu, red_cpu = interleaved_cpu(rt, fn, repeats)
    return dict(
        own_ms=own * 1e3,
        reduce_cpu_ms=cpu * 1e3,
        share=own / wall,
        share_cpu=own_c / red_cpu_own,
        reduced_ms=wall * 1e3,
        full=full,
        red=red,
        full_cpu=full_cpu,
        red_cpu=red_cpu,
    )
