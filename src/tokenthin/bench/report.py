"""Turn result rows (see :mod:`tokenthin.bench.store`) into a summary table (CSV + markdown) and a Pareto plot."""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["BASELINES", "COLUMNS", "QUALITY", "pareto_plot", "summary_table", "write_summary"]

BASELINES = frozenset({"random", "pool", "downsample"})
REFERENCE = "none"

COLUMNS = (
    "model",
    "method",
    "budget",
    "baseline",
    "flops",
    "tokens_out",
    "cosine",
    "knn_acc",
    "knn_retained",
    "sal_pearson",
    "sal_iou20",
    "speedup",
    "predicted_speedup",
    "time_ratio",
    "peak_mem_mb",
    "overhead_share",
)

# summary column -> (task, metric name in that task's row)
_SOURCES: dict[str, tuple[str, str]] = {
    "tokens_out": ("cost", "tokens_out"),
    "cosine": ("features", "cosine_mean"),
    "knn_acc": ("knn", "accuracy"),
    "knn_retained": ("knn", "retained"),
    "sal_pearson": ("saliency", "pearson"),
    "sal_iou20": ("saliency", "iou20"),
    "speedup": ("cost", "speedup"),
    "predicted_speedup": ("cost", "predicted_speedup"),
    "time_ratio": ("cost", "time_ratio"),
    "peak_mem_mb": ("cost", "peak_mem_mb"),
    "overhead_share": ("cost", "overhead_share"),
}

# quality columns the Pareto plot can draw: axis label, and whether the unreduced model scores 1.0 by definition
QUALITY: dict[str, tuple[str, bool]] = {
    "cosine": ("[CLS] feature cosine to full", True),
    "knn_retained": ("k-NN accuracy retained (reduced / full)", True),
    "sal_pearson": ("saliency Pearson r vs full", True),
    "sal_iou20": ("saliency top-20% IoU vs full", True),
    "knn_acc": ("k-NN accuracy", False),
}
DEFAULT_QUALITY = ("cosine", "knn_retained", "sal_pearson")

_QUALITY_FMT = {"cosine", "knn_acc", "knn_retained", "sal_pearson", "sal_iou20"}  # 3 decimals
_RATIO_FMT = {"budget", "flops", "speedup", "predicted_speedup", "time_ratio", "overhead_share"}  # 2 decimals


# ------------------------------------------------------------------------------------------------- summary table


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _mean(values: Iterable[Any]) -> float | None:
    nums = [x for x in (_number(v) for v in values) if x is not None]
    return sum(nums) / len(nums) if nums else None


def _sort_key(rec: Mapping[str, Any]) -> tuple:
    return (rec["model"], -rec["budget"], rec["method"] != REFERENCE, rec["method"])


def summary_table(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One record per (model, method, budget), with the four tasks' metrics merged into flat columns.

    Columns are :data:`COLUMNS`. A metric with no row (a task not run, or a non-numeric value) is ``None``.
    When several rows share model, method, budget and task (several seeds or runs), their metrics are
    averaged. ``flops`` is the cost task's measured ``flops_fraction`` when there is one, otherwise the mean
    of the rows' ``flops`` (the k-NN rows' only where no other task ran: they are measured on the k-NN images).
    Records are sorted by model, then budget (highest first), then method, with the unreduced reference
    ``"none"`` first within its budget.
    """
    groups: dict[tuple[str, str, float], dict[str, list[Mapping[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        budget = _number(row.get("budget"))
        if budget is None:
            continue
        gkey = (str(row.get("model", "")), str(row.get("method", "")), budget)
        groups[gkey][str(row.get("task", ""))].append(row)

    table = []
    for (model, method, budget), by_task in groups.items():
        all_rows = [r for rs in by_task.values() for r in rs]
        flags = [r["baseline"] for r in all_rows if isinstance(r.get("baseline"), bool)]
        rec: dict[str, Any] = {
            "model": model,
            "method": method,
            "budget": budget,
            "baseline": any(flags) if flags else method in BASELINES,
        }
        cost = by_task.get("cost", [])
        flops = _mean((r.get("metrics") or {}).get("flops_fraction") for r in cost)
        if flops is None:  # the evaluation images' (k-NN rows record their own images' FLOPs: dtome differs there)
            flops = _mean(r.get("flops") for r in all_rows if r.get("task") != "knn")
        rec["flops"] = flops if flops is not None else _mean(r.get("flops") for r in all_rows)
        for col, (task, metric) in _SOURCES.items():
            rec[col] = _mean((r.get("metrics") or {}).get(metric) for r in by_task.get(task, []))
        table.append({c: rec.get(c) for c in COLUMNS})
    table.sort(key=_sort_key)
    return table


# -------------------------------------------------------------------------------------------------- CSV/markdown


def _fmt(col: str, v: Any) -> str:
    if v is None:
        return "-"
    if col == "baseline":
        return "yes" if v else ""
    if isinstance(v, str):
        return v.replace("|", "\\|")
    if col == "budget":  # 2 decimals unless that would hide a digit (0.125)
        return f"{v:.2f}" if abs(v - round(v, 2)) < 1e-9 else f"{v:.3f}"
    if col in _QUALITY_FMT:
        return f"{v:.3f}"
    if col in _RATIO_FMT:
        return f"{v:.2f}"
    if col == "tokens_out":
        return f"{v:.0f}" if abs(v - round(v)) < 0.05 else f"{v:.1f}"
    if col == "peak_mem_mb":
        return f"{v:.0f}"
    return f"{v:.3g}"


_HEADERS = {
    "model": "model",
    "method": "method",
    "budget": "budget",
    "baseline": "baseline",
    "flops": "FLOPs",
    "tokens_out": "tokens out",
    "cosine": "cosine",
    "knn_acc": "k-NN acc",
    "knn_retained": "k-NN kept",
    "sal_pearson": "sal. r",
    "sal_iou20": "sal. IoU20",
    "speedup": "speedup",
    "predicted_speedup": "pred. speedup",
    "time_ratio": "time ratio",
    "peak_mem_mb": "peak MB",
    "overhead_share": "overhead",
}

_LEGEND = (
    "budget = target FLOPs fraction; FLOPs = achieved analytic FLOPs fraction; cosine = mean [CLS] feature "
    "cosine to the full model; k-NN acc / kept = k-NN accuracy and its ratio to the full model's; sal. r / "
    "IoU20 = saliency Pearson r and top-20% IoU vs the full model; speedup = measured (1 / time ratio), pred. "
    "speedup = 1 / FLOPs; time ratio = reduced / full wall time; peak MB = peak memory; overhead = share of "
    "forward time spent in tokenthin's own ops; baseline = naive reference method; - = not measured."
)


def _markdown(table: Sequence[Mapping[str, Any]]) -> str:
    models = sorted({r["model"] for r in table})
    cols = [c for c in COLUMNS if not (c == "model" and len(models) <= 1)]
    title = f"Results for {models[0]}." if len(models) == 1 and models[0] else "Results."
    lines = [f"{title} {_LEGEND}", ""]
    lines.append("| " + " | ".join(_HEADERS[c] for c in cols) + " |")
    lines.append("|" + "|".join(":---" if c in ("model", "method", "baseline") else "---:" for c in cols) + "|")
    for r in table:
        lines.append("| " + " | ".join(_fmt(c, r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_summary(rows: Iterable[Mapping[str, Any]], out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``summary.csv`` (every column, full precision, empty cells for missing values) and ``summary.md``
    (a GitHub-markdown table with a one-line legend to paste into a README or PR) to ``out_dir``.

    Returns ``(csv_path, md_path)``. The markdown drops the model column when there is a single model and names
    it in the title line.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = summary_table(rows)
    csv_path, md_path = out / "summary.csv", out / "summary.md"
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(COLUMNS))
        writer.writeheader()
        for r in table:
            writer.writerow({c: ("" if r[c] is None else r[c]) for c in COLUMNS})
    md_path.write_text(_markdown(table), encoding="utf-8")
    return csv_path, md_path


# ----------------------------------------------------------------------------------------------------- Pareto plot

_METHOD_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h", "<", ">", "p", "*")
_BASELINE_STYLES = {  # neutral greys, dashed, so the real methods stand out
    "random": ("#555555", "x"),
    "pool": ("#8c6d46", "s"),
    "downsample": ("#9a9a9a", "v"),
}


def _styles(methods: Sequence[str], baselines: set[str]) -> dict[str, dict[str, Any]]:
    from matplotlib import colormaps

    palette = list(colormaps["tab10"].colors) + list(colormaps["Dark2"].colors)
    palette = [c for i, c in enumerate(palette) if i not in (5, 7)]  # tab10 brown and grey: used by baselines
    styles: dict[str, dict[str, Any]] = {}
    i = 0
    for m in methods:
        if m in baselines:
            color, marker = _BASELINE_STYLES.get(m, ("#777777", "d"))
            styles[m] = {"color": color, "marker": marker, "linestyle": "--"}
        else:
            styles[m] = {
                "color": palette[i % len(palette)],
                "marker": _METHOD_MARKERS[i % len(_METHOD_MARKERS)],
                "linestyle": "-",
            }
            i += 1
    return styles


def pareto_plot(
    rows: Iterable[Mapping[str, Any]],
    out_path: str | os.PathLike[str],
    quality: Sequence[str] | None = None,
) -> Path:
    """Quality against cost for every method across budgets; writes a PNG and returns its path.

    One row of panels per quality metric. ``quality`` names summary columns (see :data:`QUALITY`). The
    default is feature ``cosine``, ``knn_retained`` and ``sal_pearson``, keeping those with data. Each model
    gets two columns: x = achieved analytic FLOPs fraction, and x = measured speedup (from the cost rows of
    the same method and budget; a point without one is left out; no speedup column where no row was timed).
    Each method is one line across its
    budgets. Baselines (random, pool, downsample) are dashed greys. The unreduced model is a star at
    (1.0, 1.0), or at its measured value for metrics that are not relative to it (``knn_acc``). The legend
    sits outside, to the right. Rendered with the Agg canvas directly, so pyplot's global state is untouched.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("pareto_plot needs matplotlib: pip install matplotlib") from e

    rows = list(rows)
    table = summary_table(rows)
    if quality is None:
        quality = [q for q in DEFAULT_QUALITY if any(r[q] is not None for r in table)]
    else:
        quality = list(quality)
        unknown = [q for q in quality if q not in QUALITY]
        if unknown:
            raise ValueError(f"unknown quality metric(s) {unknown}; choose from {sorted(QUALITY)}")
    if not quality:
        raise ValueError("pareto_plot: no quality metric (cosine, knn_retained, sal_pearson) in the rows")

    models = sorted({r["model"] for r in table})
    methods = sorted({r["method"] for r in table if r["method"] != REFERENCE})
    baselines = {r["method"] for r in table if r["baseline"]} | (BASELINES & set(methods))
    methods = [m for m in methods if m not in baselines] + [m for m in methods if m in baselines]
    styles = _styles(methods, baselines)

    xcols = [("flops", "analytic FLOPs fraction  (← cheaper)")]
    if any(r["speedup"] is not None for r in table):  # no timed rows (a quality-only run): no empty speed panels
        xcols.append(("speedup", "measured speedup, ×  (faster →)"))
    per = len(xcols)
    n_rows, n_cols = len(quality), per * len(models)
    fig = Figure(figsize=(4.6 * n_cols + 2.2, 3.5 * n_rows + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False, sharey="row")

    for qi, q in enumerate(quality):
        label, relative = QUALITY[q]
        for mi, model in enumerate(models):
            recs = [r for r in table if r["model"] == model]
            ref_rows = [r for r in recs if r["method"] == REFERENCE and r[q] is not None]
            ref_y = 1.0 if relative else (ref_rows[0][q] if ref_rows else None)
            if ref_y is None and q == "knn_acc":
                ref_y = _mean(
                    (r.get("metrics") or {}).get("accuracy_full")
                    for r in rows
                    if isinstance(r, Mapping) and r.get("model") == model and r.get("task") == "knn"
                )
            for xi, (xcol, xlabel) in enumerate(xcols):
                ax = axes[qi][per * mi + xi]
                for m in methods:
                    pts = sorted(
                        (r["budget"], r[xcol], r[q])
                        for r in recs
                        if r["method"] == m and r[xcol] is not None and r[q] is not None
                    )
                    if not pts:
                        continue
                    st = styles[m]
                    ax.plot(
                        [p[1] for p in pts],
                        [p[2] for p in pts],
                        color=st["color"],
                        marker=st["marker"],
                        linestyle=st["linestyle"],
                        linewidth=1.6 if st["linestyle"] == "-" else 1.3,
                        markersize=5.5,
                        label=m,
                    )
                if ref_y is not None:
                    ax.plot([1.0], [ref_y], marker="*", color="black", markersize=14, linestyle="none", zorder=5)
                if xcol == "speedup":
                    ax.axvline(1.0, color="0.75", linewidth=0.8, zorder=0)
                ax.grid(True, alpha=0.3)
                ax.tick_params(labelsize=9)
                if qi == n_rows - 1:
                    ax.set_xlabel(xlabel, fontsize=10)
                if per * mi + xi == 0:
                    ax.set_ylabel(label, fontsize=10)
                if qi == 0:
                    title = "vs analytic FLOPs" if xcol == "flops" else "vs measured wall-clock speedup"
                    ax.set_title(f"{model}: {title}" if len(models) > 1 else title, fontsize=10)

    handles = [
        Line2D(
            [],
            [],
            color=styles[m]["color"],
            marker=styles[m]["marker"],
            linestyle=styles[m]["linestyle"],
            label=m + (" (baseline)" if m in baselines else ""),
        )
        for m in methods
    ]
    handles.append(Line2D([], [], color="black", marker="*", markersize=12, linestyle="none", label="unreduced"))
    fig.legend(
        handles=handles,
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        fontsize=9,
        frameon=False,
        title="method",
        title_fontsize=10,
    )
    if len(models) == 1 and models[0]:
        fig.suptitle(f"{models[0]}: quality vs cost per method across FLOPs budgets", fontsize=11)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    return out
