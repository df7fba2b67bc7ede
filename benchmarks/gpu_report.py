"""The Markdown table of ``benchmarks/gpu.py``'s rows (one per model, batch, mode and method)."""

from __future__ import annotations

COLUMNS = [
    ("model", "model", "{}"),
    ("batch", "batch", "{}"),
    ("dtype", "dtype", "{}"),
    ("mode", "mode", "{}"),
    ("method", "method", "{}"),
    ("full_per_s", "unreduced /s", "{:.0f}"),
    ("red_per_s", "reduced /s", "{:.0f}"),
    ("speedup", "speedup", "{:.2f}x"),
    ("predicted", "FLOPs-predicted", "{:.2f}x"),
    ("own", "own share", "{:.1%}"),
    ("full_mb", "peak MB unreduced", "{:.0f}"),
    ("red_mb", "peak MB reduced", "{:.0f}"),
    ("graphs", "graphs (compiled)", "{}"),
    ("graph_breaks", "graph breaks", "{}"),
]


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            v = r.get(key)
            cells.append("-" if v is None else fmt.format(v))
        if "error" in r:
            cells[5] = f"n/a: {r['error']}"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
