"""Summary table (``summary.md``, ``summary.csv``) and Pareto plot (``pareto.png``) of a vqa run's per-sample rows.

One record per (method, budget): samples, accuracy (mean of ``correct`` over samples with references), agreement
with the unreduced answer, visual tokens before -> after (means), and cost ratios reduced / unreduced over the same
samples: prefill FLOPs, prefill time, time to first token, decode step, peak memory (the unreduced means given in
parentheses).
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

REFERENCE = "none"
COSTS = (("flops", "prefill FLOPs"), ("prefill_s", "prefill time"), ("ttft_s", "TTFT"))
COSTS += (("decode_step_s", "decode step"), ("peak_mb", "peak memory"))


def _mean(vals: Iterable[Any]) -> float | None:
    xs = [float(v) for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return sum(xs) / len(xs) if xs else None


def summarize(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Records per (method, budget), unreduced first, then methods by name and budget (highest first)."""
    rows = list(rows)
    ref = {r["sample"]: r["metrics"] for r in rows if r["method"] == REFERENCE and "error" not in r}
    groups: dict[tuple[str, Any], list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["budget"])].append(r)
    out = []
    for (method, budget), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        rec: dict[str, Any] = {
            "method": method,
            "budget": budget,
            "baseline": any(r.get("baseline") for r in rs),
            "site": next((r["site"] for r in ok if r.get("site")), None),
            "samples": len(ok),
            "errors": len(rs) - len(ok),
            "error": next((r["error"] for r in rs if "error" in r), None),
        }
        m = [r["metrics"] for r in ok]
        for k in ("correct", "exact", "contains", "agree", "visual_tokens", "visual_after", "kept", "llm_tokens"):
            rec[k] = _mean(x.get(k) for x in m)
        for k, _ in COSTS:
            pairs = [(r["metrics"].get(k), ref.get(r["sample"], {}).get(k)) for r in ok]
            pairs = [(a, b) for a, b in pairs if isinstance(a, (int, float)) and isinstance(b, (int, float))]
            base = sum(b for _, b in pairs)
            rec[f"{k}_ratio"] = sum(a for a, _ in pairs) / base if pairs and base > 0 else None
            rec[f"{k}_full"] = base / len(pairs) if pairs else None
        out.append(rec)
    out.sort(key=lambda r: (r["method"] != REFERENCE, r["method"], -float(r["budget"] or 0)))
    return out


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _cost(rec: Mapping[str, Any], k: str) -> str:
    ratio, full = rec.get(f"{k}_ratio"), rec.get(f"{k}_full")
    if ratio is None:
        return "-"
    if k == "flops":
        return f"{ratio:.2f}x (of {full / 1e9:.3g} G)"
    if k == "peak_mb":
        return f"{ratio:.2f}x (of {full:.3g} MB)"
    ms = 1000 * full
    return f"{ratio:.2f}x (of {ms:.0f} ms)" if ms >= 100 else f"{ratio:.2f}x (of {ms:.3g} ms)"


def markdown(table: list[dict[str, Any]], model: str) -> str:
    head = "| method | keep | site | accuracy | agreement | visual tokens | " + " | ".join(n for _, n in COSTS) + " |"
    lines = [
        f"vqa results for {model}: accuracy = mean correct (the file's metric, over samples with answers); agreement "
        "= same normalised answer as the unreduced model; visual tokens = mean per sample before -> after; costs = "
        "reduced / unreduced over the same samples (unreduced mean in parentheses); prefill time = the model's first "
        "forward (the vision tower runs before it), TTFT = from the generate() call (tower included); peak memory: of "
        "the whole generate on CUDA, of a prefill forward on the CPU.",
        "",
        head,
        "|" + "---|" * (6 + len(COSTS)),
    ]
    for r in table:
        keep = "-" if r["method"] == REFERENCE else str(r["budget"])
        name = r["method"] + (" (baseline)" if r["baseline"] else "")
        if not r["samples"]:
            lines.append(f"| {name} | {keep} | | n/a: {r['error']} |" + " |" * (2 + len(COSTS)))
            continue
        vis = f"{r['visual_tokens']:.0f} -> {r['visual_after']:.0f}"
        costs = " | ".join(_cost(r, k) for k, _ in COSTS)
        lines.append(
            f"| {name} | {keep} | {r['site'] or '-'} | {_num(r['correct'], '.3f')} | {_num(r['agree'], '.3f')} | "
            f"{vis} | {costs} |"
        )
    return "\n".join(lines) + "\n"


def write_vqa_summary(rows: Iterable[Mapping[str, Any]], out_dir: str | os.PathLike[str], model: str) -> Path:
    """Write ``summary.md`` and ``summary.csv``; returns the markdown's path."""
    out = Path(out_dir)
    table = summarize(rows)
    (out / "summary.md").write_text(markdown(table, model), encoding="utf-8")
    cols = list(table[0]) if table else []
    with open(out / "summary.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in table)
    return out / "summary.md"


def vqa_pareto(rows: Iterable[Mapping[str, Any]], out_path: str | os.PathLike[str], model: str) -> Path:
    """Agreement (and accuracy, when the data has answers) against prefill FLOPs and measured TTFT speedup, one line
    per method across budgets; baselines dashed grey; the unreduced model a star at (1, 1)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .report import _styles

    table = [r for r in summarize(rows) if r["samples"]]
    quality = [("agree", "agreement with unreduced")]
    if any(r["correct"] is not None for r in table):
        quality.append(("correct", "accuracy"))
    methods = sorted({r["method"] for r in table if r["method"] != REFERENCE})
    baselines = {r["method"] for r in table if r["baseline"]}
    styles = _styles([m for m in methods if m not in baselines] + sorted(baselines), baselines)
    fig = Figure(figsize=(10.5, 3.6 * len(quality) + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(quality), 2, squeeze=False, sharey="row")
    ref = next((r for r in table if r["method"] == REFERENCE), None)
    for qi, (q, label) in enumerate(quality):
        for xi, (xlabel, xfn) in enumerate(
            (
                ("prefill FLOPs, reduced / full  (← cheaper)", lambda r: r["flops_ratio"]),
                (
                    "measured TTFT speedup, ×  (faster →)",
                    lambda r: 1 / r["ttft_s_ratio"] if r["ttft_s_ratio"] else None,
                ),
            )
        ):
            ax = axes[qi][xi]
            for m in methods:
                pts = sorted((xfn(r), r[q]) for r in table if r["method"] == m and xfn(r) and r[q] is not None)
                if pts:
                    st = styles[m]
                    ax.plot(*zip(*pts), color=st["color"], marker=st["marker"], linestyle=st["linestyle"], label=m)
            if ref is not None and ref[q] is not None:
                ax.plot([1.0], [ref[q]], marker="*", color="black", markersize=13, linestyle="none")
            ax.grid(True, alpha=0.3)
            ax.set_xlabel(xlabel, fontsize=9)
            if xi == 0:
                ax.set_ylabel(label, fontsize=10)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9, frameon=False)
    fig.suptitle(f"{model}: vqa quality vs cost per method across keep budgets", fontsize=11)
    fig.tight_layout()
    out = Path(out_path)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    return out
