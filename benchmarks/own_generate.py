"""Issue 9, goal 2: ``generate()`` time reduced / unreduced at site ``output`` on the real encoder-decoder tasks,
and tokenthin's own share of it (not a test; ``bench_methods_own.py --sizes ocr-1024,asr-1500`` runs it).

* ``ocr-1024``: the real latex-ocr model, 12 rendered formulas in one batch, 1024 visual tokens each.
* ``asr-1500``: the real Whisper tiny.en, the 10 pocketsphinx clips in one batch, 1500 audio tokens each.

Both generate greedily. With ``fixed_length`` (the default) every ``generate()`` makes exactly ``new_tokens``
tokens per sample (``min_new_tokens`` = ``max_new_tokens``), so a reduced model that would stop later or earlier
does the same decoding work as the unreduced one and the ratio is the method's cost and saving alone; without it
each model stops at its own end-of-sequence and the rows record both lengths (``steps_full`` / ``steps_reduced``,
the generated sequence length of the batch).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
from own_timing import measure_all

import tokenthin
from tokenthin.adapters.registry import find_adapter
from tokenthin.errors import TokenThinError


def ocr_rows(
    methods: list[str], keeps: list[float], repeats: int, new_tokens: int, fixed_length: bool = True
) -> list[dict[str, Any]]:
    from tokenthin.bench.ocr import formulas
    from tokenthin.models import latex_ocr as lo

    model = lo.load_latex_ocr()
    pv = lo.preprocess([lo.render_formula(t) for t in formulas(12, 0)])
    extra = {"min_new_tokens": new_tokens} if fixed_length else {}

    @torch.inference_mode()
    def decode() -> int:
        return int(lo.generate_ids(model, pv, new_tokens, **extra).shape[1])

    return generate_rows("ocr-1024", model, decode, pv[:4], 1024, pv.shape[0], methods, keeps, repeats)


def asr_rows(
    methods: list[str], keeps: list[float], repeats: int, new_tokens: int, fixed_length: bool = True
) -> list[dict[str, Any]]:
    from tokenthin.bench.speech import clips
    from tokenthin.models import whisper as wh

    model, processor = wh.load_whisper()
    chosen = clips()[:10]
    feats = processor.feature_extractor(
        [c.audio() for c in chosen], sampling_rate=wh.SAMPLE_RATE, return_tensors="pt"
    ).input_features.to(model.dtype)
    extra = {"min_new_tokens": new_tokens} if fixed_length else {}

    @torch.inference_mode()
    def decode() -> int:
        return int(model.generate(feats, max_new_tokens=new_tokens, **extra).shape[1])

    return generate_rows("asr-1500", model, decode, feats[:4], 1500, feats.shape[0], methods, keeps, repeats)


def generate_rows(
    size: str,
    model: torch.nn.Module,
    decode: Callable[[], int],
    cal: torch.Tensor,
    tokens: int,
    batch: int,
    methods: list[str],
    keeps: list[float],
    repeats: int,
) -> list[dict[str, Any]]:
    """Own time and ``generate()`` time reduced / unreduced (wall and one-thread CPU) at site ``output`` per keep."""
    host = find_adapter(model).name
    takes = [m["name"] for m in tokenthin.methods() if not tokenthin.support(m["name"], host)]
    methods = takes if methods == ["all"] else methods
    steps_full = decode()
    rows = []
    for name in [m for m in methods if m in takes]:
        for keep in keeps:
            row: dict[str, Any] = {"size": size, "method": name, "tokens": tokens, "batch": batch, "keep": keep}
            try:
                extra = {"calibration": cal} if name == "dtome" else {}
                tokenthin.apply(model, name, keep=keep, site="output", **extra)
                rt = tokenthin.runtime_of(model)
                row.update(steps_full=steps_full, steps_reduced=decode())
                m = measure_all(rt, decode, repeats)
                full, red, full_cpu, red_cpu = (m.pop(k) for k in ("full", "red", "full_cpu", "red_cpu"))
                row.update(m, of="generate()", ratio=red / full, cpu_ratio=red_cpu / full_cpu)
            except TokenThinError as exc:
                row["error"] = str(exc).split(";")[0]
            finally:
                if tokenthin.is_applied(model):
                    tokenthin.remove(model)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def slowdown_table(rows: list[dict[str, Any]]) -> str:
    """Issue 9, goal 2: ``generate()`` time reduced / unreduced per method and keep (below 1: faster); the last
    column gives the generated lengths (unreduced / reduced) where the rows recorded them."""
    lines = [
        "| size | method | keep | generate time ratio (wall) | (1-thread CPU) | own share (wall) | own share "
        "(1-thread CPU) | length (full / reduced) |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "cpu_ratio" in r and "share_cpu" in r:
            steps = f"{r['steps_full']} / {r['steps_reduced']}" if "steps_full" in r else "not recorded"
            lines.append(
                f"| {r['size']} | {r['method']} | {r['keep']} | {r['ratio']:.2f} | {r['cpu_ratio']:.2f} | "
                f"{100 * r['share']:.1f}% | {100 * r['share_cpu']:.1f}% | {steps} |"
            )
    return "\n".join(lines)
