"""OCR fidelity bench on the real latex-ocr model: how much of the unreduced decode survives token reduction.

Formulas come from a small deterministic generator (fractions, powers, roots, sums, greek letters) and are
rendered with :func:`tokenthin.models.latex_ocr.render_formula`. Each is decoded greedily (KV cache) by the
unreduced model once; then, for every method and keep fraction of the visual tokens (site ``output``;
``downsample`` at ``input``), the reduced decode is compared with it: exact agreement and normalised edit
distance. Times are ratios reduced/full measured in the same run, alternating the two.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from .timing import alternate, memory_and_own
from .variants import apply_kwargs, base_name

BASELINES = ("random", "pool", "downsample")
_GREEK = (r"\alpha", r"\beta", r"\gamma", r"\theta", r"\lambda", r"\mu", r"\pi", r"\sigma", r"\omega", r"\phi")
_LATIN = ("a", "b", "c", "x", "y", "z", "n", "k", "t")


def _atom(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.3:
        return rng.choice(_GREEK)
    if r < 0.8:
        return rng.choice(_LATIN)
    return str(rng.randint(1, 9))


def _term(rng: random.Random, depth: int) -> str:
    kind = rng.choice(("atom", "pow", "frac", "sqrt", "sub") if depth > 0 else ("atom", "pow", "sub"))
    if kind == "pow":
        return f"{_atom(rng)}^{{{rng.randint(2, 9)}}}"
    if kind == "sub":
        return f"{rng.choice(_LATIN)}_{{{rng.choice(_LATIN)}}}"
    if kind == "frac":
        return rf"\frac{{{_expr(rng, depth - 1, 2)}}}{{{_expr(rng, depth - 1, 2)}}}"
    if kind == "sqrt":
        return rf"\sqrt{{{_expr(rng, depth - 1, 2)}}}"
    return _atom(rng)


def _expr(rng: random.Random, depth: int, max_terms: int, min_terms: int = 1) -> str:
    terms = [_term(rng, depth) for _ in range(rng.randint(min_terms, max_terms))]
    out = terms[0]
    for t in terms[1:]:
        out += rng.choice(("+", "-", "=")) + t
    return out


def formulas(n: int, seed: int = 0) -> list[str]:
    """``n`` deterministic LaTeX formulas; every fourth one a sum with limits."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        body = _expr(rng, 2, 3, min_terms=2)
        if i % 4 == 3:
            k = rng.choice(("i", "k", "n"))
            body = rf"\sum_{{{k}=1}}^{{{rng.choice(('n', 'N', 'm'))}}}{body}"
        out.append(body)
    return out


def levenshtein(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Edit distance (insertions, deletions, substitutions), two-row dynamic programme."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def normalised_edit(a: str, b: str) -> float:
    """Levenshtein / max length, in [0, 1] (0 for two empty strings)."""
    m = max(len(a), len(b))
    return levenshtein(a, b) / m if m else 0.0


def run_ocr_bench(
    methods: Sequence[str],
    keeps: Sequence[float] = (0.75, 0.5, 0.25, 0.1),
    n_formulas: int = 12,
    max_new_tokens: int = 48,
    seed: int = 0,
    repeats: int = 1,
) -> list[dict[str, Any]]:
    """One row per (method, keep): exact agreement and mean normalised edit distance with the unreduced decode,
        encode and decode (whole ``generate``) time ratios reduced/full from alternating runs, tokens kept (mean per
        image). ``random``, ``pool`` and ``downsample`` are always included. A method that cannot run on this model
    (the encoder has no [CLS] token) gets rows with an ``"error"`` instead of numbers."""
    from .. import api
    from ..errors import TokenThinError
    from ..models import latex_ocr as lo

    model = lo.load_latex_ocr()
    vocab = lo.load_vocab()
    texts = formulas(n_formulas, seed)
    pv = lo.preprocess([lo.render_formula(t) for t in texts])

    def decode() -> list[str]:
        return lo.greedy_decode(model, pv, max_new_tokens=max_new_tokens, vocab=vocab)

    def encode() -> None:
        with torch.inference_mode():
            model.encoder(pixel_values=pv)

    full = decode()
    n_tokens = api.explain(model)["tokens"]
    layers = api.explain(model)["layers"]
    names = list(dict.fromkeys([*methods, *BASELINES]))
    rows = []
    combos = [(name, keep) for name in names for keep in keeps]
    for name, keep in tqdm(combos, desc="ocr", unit="config"):
        site = "input" if name == "downsample" else "output"
        kw: dict[str, Any] = {"keep": keep, "site": site}
        if name == "dtome":  # no keep budget: the ToMe r per layer that leaves about keep of the tokens
            kw = {"r": max(0, round(n_tokens * (1 - keep) / layers)), "calibration": pv}
        row: dict[str, Any] = {"method": name, "keep": keep}
        try:
            api.apply(model, base_name(name), **kw, **apply_kwargs(name))
        except TokenThinError as exc:
            rows.append({**row, "error": str(exc).split(";")[0]})
            continue
        rt = api.runtime_of(model)
        try:
            try:
                out = decode()
            except TokenThinError as exc:  # e.g. a [CLS]-scoring method on this CLS-free encoder
                rows.append({**row, "error": str(exc).split(";")[0]})
                continue
            kept = sum(rt.last.kept) / len(rt.last.kept) if rt.last is not None else float("nan")
            t = alternate(rt, repeats, (encode, decode))  # reduced? -> [encode s, decode s]
            mem_ratio, own = memory_and_own(rt, decode)  # peak of a whole decode, own time in it
        finally:
            api.remove(model)
        rows.append(
            {
                **row,
                "exact": sum(a == b for a, b in zip(out, full)) / len(full),
                "edit": sum(normalised_edit(a, b) for a, b in zip(out, full)) / len(full),
                "decode_time_ratio": t[True][1] / t[False][1],
                "encode_time_ratio": t[True][0] / t[False][0],
                "memory_ratio": mem_ratio,
                "own_share": own,
                "tokens": kept,
            }
        )
    return rows


def format_ocr_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`run_ocr_bench` rows."""
    head = "| method | keep | exact | edit | decode time | encode time | peak memory | own time | tokens |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['keep']:.2f} | n/a: {r['error']} | | | | | | |")
            continue
        mem = f"{r['memory_ratio']:.2f}" if "memory_ratio" in r else "-"
        own = f"{100 * r['own_share']:.1f}%" if "own_share" in r else "-"
        lines.append(
            f"| {r['method']} | {r['keep']:.2f} | {r['exact']:.2f} | {r['edit']:.3f} | "
            f"{r['decode_time_ratio']:.2f} | {r['encode_time_ratio']:.2f} | {mem} | {own} | {r['tokens']:.0f} |"
        )
    return "\n".join(lines)
