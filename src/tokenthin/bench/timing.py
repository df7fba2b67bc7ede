"""Wall-clock timing that tells the truth on a noisy machine: warm-up, then the median of interleaved repeats."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

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
