"""Merge the issue-10 result files into ``docs/bench/goals/dinov2s_summary.md`` and ``pareto.png``: the rerun's rows
(``dinov2s_budgets.jsonl``) replace the first run's (``dinov2s_features_saliency.jsonl``) for every method it reran.

    PYTHONPATH=src python benchmarks/goals_plot.py
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from tokenthin.bench.report import pareto_plot, write_summary

GOALS = Path(__file__).resolve().parents[1] / "docs" / "bench" / "goals"


def main() -> None:
    new = [json.loads(line) for line in (GOALS / "dinov2s_budgets.jsonl").read_text().splitlines() if line.strip()]
    old = [json.loads(line) for line in (GOALS / "dinov2s_features_saliency.jsonl").read_text().splitlines() if line]
    rerun = {r["method"] for r in new}
    rows = [r for r in old if r["method"] not in rerun] + new
    with tempfile.TemporaryDirectory() as d:
        _, md = write_summary(rows, d)
        shutil.copy(md, GOALS / "dinov2s_summary.md")
    pareto_plot(rows, GOALS / "pareto.png")
    print(f"{len(rows)} rows -> {GOALS / 'dinov2s_summary.md'}, {GOALS / 'pareto.png'}")


if __name__ == "__main__":
    main()
