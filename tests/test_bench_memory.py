"""The CPU peak-memory tracker counts storages made inside the block, alive at the same time."""

from __future__ import annotations

import torch

from tokenthin.bench.memory import peak_memory


def test_peak_counts_simultaneous_allocations_only() -> None:
    x = torch.ones(1024, 256)  # 1 MiB, made before the block: not counted
    with peak_memory(torch.device("cpu"), exclude=(x,)) as m:
        a = x * 2  # 1 MiB
        b = a + 1  # 2 MiB alive
        del a, b
        c = x * 3  # back to 1 MiB
        del c
    assert m["mb"] is not None and 1.99 <= m["mb"] <= 2.01


def test_views_do_not_double_count() -> None:
    x = torch.ones(1024, 256)
    with peak_memory(torch.device("cpu"), exclude=(x,)) as m:
        a = x * 2
        views = [a.view(-1), a[:10], a.t()]
        del views, a
    assert m["mb"] is not None and 0.99 <= m["mb"] <= 1.01
