"""Speech-recognition bench on the real Whisper tiny.en: word error rate when the decoder reads fewer audio tokens.

Clips are the labelled pocketsphinx test clips (:mod:`tokenthin.bench.speech`: 5 LibriVox sentences, 5 short card
names), padded to Whisper's 30 s window (1500 encoder tokens). Each is decoded greedily (KV cache,
``model.generate``) by the unreduced model once; then, for every method and keep fraction (of the 1500 tokens;
site ``output`` by default: the encoder runs in full and the decoder's cross-attention reads the reduced tokens),
the reduced decode is scored against the references (WER) and against the unreduced decode (WER and exact
agreement). Times are ratios reduced/full measured in the same run, alternating the two; peak memory and
tokenthin's own share of the reduced decode are measured once each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from .speech import clips as speech_clips
from .speech import wer
from .timing import alternate, memory_and_own
from .variants import apply_kwargs, base_name

BASELINES = ("random", "pool")


def run_asr_bench(
    methods: Sequence[str],
    keeps: Sequence[float] = (0.75, 0.5, 0.25, 0.1),
    site: str = "output",
    n_clips: int = 10,
    max_new_tokens: int = 64,
    repeats: int = 1,
    baselines: bool = True,
) -> list[dict[str, Any]]:
    """One row per (method, keep), after a ``none`` row for the unreduced model: ``wer`` (vs the references),
    ``wer_full`` and ``exact`` (vs the unreduced decode), ``generate_time_ratio`` and ``encode_time_ratio``
    (reduced/full, alternating runs), ``memory_ratio`` (peak of a whole decode), ``own_share`` (tokenthin's time in
    it) and ``tokens`` (mean kept per clip). ``random`` and ``pool`` are included unless ``baselines=False``. A
    method that cannot run on this model gets a row with an ``"error"`` instead of numbers."""
    from .. import api
    from ..errors import TokenThinError
    from ..models import whisper as wh

    model, processor = wh.load_whisper()
    chosen = speech_clips()[:n_clips]
    refs = [c.text for c in chosen]
    feats = processor.feature_extractor(
        [c.audio() for c in chosen], sampling_rate=wh.SAMPLE_RATE, return_tensors="pt"
    ).input_features.to(model.dtype)

    def decode() -> list[str]:
        with torch.inference_mode():
            ids = model.generate(feats, max_new_tokens=max_new_tokens)
        return [t.strip() for t in processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def encode() -> None:
        with torch.inference_mode():
            model.model.encoder(feats)

    full = decode()
    rows: list[dict[str, Any]] = [
        {"method": "none", "keep": 1.0, "wer": wer(full, refs), "wer_full": 0.0, "exact": 1.0, "tokens": 1500.0}
    ]
    names = list(dict.fromkeys([*methods, *BASELINES])) if baselines else list(methods)
    for name, keep in tqdm([(n, k) for n in names for k in keeps], desc="asr", unit="config"):
        row: dict[str, Any] = {"method": name, "keep": keep}
        try:
            api.apply(model, base_name(name), keep=keep, site=site, **apply_kwargs(name))
        except TokenThinError as exc:
            rows.append({**row, "error": str(exc).split(";")[0]})
            continue
        rt = api.runtime_of(model)
        try:
            try:
                out = decode()
            except TokenThinError as exc:
                rows.append({**row, "error": str(exc).split(";")[0]})
                continue
            kept = sum(rt.last.kept) / len(rt.last.kept) if rt.last is not None else float("nan")
            t = alternate(rt, repeats, (encode, decode))  # reduced? -> [encode s, generate s]
            mem_ratio, own = memory_and_own(rt, decode)  # peak of a whole decode, own time in it
        finally:
            api.remove(model)
        rows.append(
            {
                **row,
                "wer": wer(out, refs),
                "wer_full": wer(out, full),
                "exact": sum(a == b for a, b in zip(out, full)) / len(full),
                "generate_time_ratio": t[True][1] / t[False][1],
                "encode_time_ratio": t[True][0] / t[False][0],
                "memory_ratio": mem_ratio,
                "own_share": own,
                "tokens": kept,
            }
        )
    return rows


def format_asr_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`run_asr_bench` rows."""
    head = "| method | keep | WER | WER vs full | exact | generate time | encode time | peak memory | own time |"
    head += " tokens |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['keep']:.2f} | n/a: {r['error']} | | | | | | | |")
            continue
        cost = [f"{r[k]:.2f}" if k in r else "-" for k in ("generate_time_ratio", "encode_time_ratio", "memory_ratio")]
        own = f"{100 * r['own_share']:.1f}%" if "own_share" in r else "-"
        lines.append(
            f"| {r['method']} | {r['keep']:.2f} | {r['wer']:.3f} | {r['wer_full']:.3f} | {r['exact']:.2f} | "
            f"{' | '.join(cost)} | {own} | {r['tokens']:.0f} |"
        )
    return "\n".join(lines)
