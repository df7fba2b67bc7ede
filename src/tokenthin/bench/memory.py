"""Peak memory of a block of torch code.

CUDA: the caching allocator's peak above what was allocated before. CPU has no such counter (and the process's
resident set does not grow when the allocator reuses freed pages), so on CPU a dispatch mode tracks every tensor
storage that torch ops create inside the block, alive until its last tensor is garbage-collected, and reports the
largest total: the peak of activation memory (weights and inputs made before the block do not count).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _StorageTracker(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.known: set[int] = set()

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.current -= self.sizes.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if key == 0:
                continue
            if key not in self.refs:
                if key in self.known:  # a storage made before the block (an input or a weight): not ours
                    continue
                self.refs[key] = 0
                self.sizes[key] = st.nbytes()
                self.current += st.nbytes()
                self.peak = max(self.peak, self.current)
            self.refs[key] += 1
            weakref.finalize(t, self._release, key)
        return out


@contextlib.contextmanager
def peak_memory(device: torch.device, exclude: tuple[torch.Tensor, ...] = ()) -> Iterator[dict[str, float | None]]:
    """``with peak_memory(dev) as m: ...`` then ``m["mb"]`` is the block's peak memory in MiB."""
    res: dict[str, float | None] = {"mb": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield res
        torch.cuda.synchronize(device)
        res["mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return
    tracker = _StorageTracker()
    tracker.known = {t.untyped_storage().data_ptr() for t in exclude}
    with tracker:
        yield res
    res["mb"] = tracker.peak / 2**20
