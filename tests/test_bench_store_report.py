"""The results store (append-only JSONL, resumable) and the report (summary table, markdown, Pareto plot)."""

from __future__ import annotations

import csv
import json
import math
import os
import warnings

import pytest

from tokenthin.bench.report import COLUMNS, pareto_plot, summary_table, write_summary
from tokenthin.bench.store import ResultStore, ResultStoreWarning, config_key, environment

TASKS = ("features", "knn", "saliency", "cost")


def _metrics(task: str, method: str, budget: float) -> dict:
    """Plausible numbers: quality falls as the budget shrinks, the baseline falls faster."""
    loss = (1.0 - budget) * (0.6 if method == "random" else 0.25)
    flops = budget + 0.01 if method != "none" else 1.0
    if task == "features":
        return {"cosine_mean": 1.0 - loss, "cosine_min": 1.0 - 2 * loss}
    if task == "knn":
        return {"accuracy": 0.8 * (1.0 - loss), "accuracy_full": 0.8, "retained": 1.0 - loss}
    if task == "saliency":
        return {"pearson": 1.0 - 1.5 * loss, "iou20": 1.0 - 2 * loss}
    ratio = flops * 1.1 if method != "none" else 1.0
    return {
        "flops_fraction": flops,
        "tokens_out": round(257 * budget),
        "tokens_per_layer": [257] * 4 + [round(257 * budget)] * 8,
        "img_per_s": 100.0 / ratio,
        "img_per_s_full": 100.0,
        "time_ratio": ratio,
        "speedup": 1.0 / ratio,
        "predicted_speedup": 1.0 / flops,
        "peak_mem_mb": 400.0 * budget + 100.0,
        "overhead_share": 0.0 if method == "none" else 0.04,
    }


def make_row(method: str, budget: float, task: str, model: str = "dinov2-s14", run: str = "test") -> dict:
    config = {"model": model, "method": method, "budget": budget, "task": task, "seed": 0, "images": 64}
    return {
        "key": config_key(config),
        "run": run,
        "model": model,
        "method": method,
        "budget": budget,
        "task": task,
        "baseline": method in ("random", "pool", "downsample"),
        "schedule": "n/a" if method == "none" else "constant",
        "flops": _metrics("cost", method, budget)["flops_fraction"],
        "metrics": _metrics(task, method, budget),
        "seed": 0,
        "versions": {"tokenthin": "0.1.0", "torch": "2.x", "transformers": "5.x"},
        "hardware": {"cpu": "test", "threads": 1, "device": "cpu"},
        "created": "2025-01-01T00:00:00+00:00",
    }


def synthetic_rows(methods=("tome", "random"), budgets=(0.75, 0.5, 0.25), model: str = "dinov2-s14") -> list[dict]:
    rows = [make_row("none", 1.0, t, model) for t in TASKS]
    rows += [make_row(m, b, t, model) for m in methods for b in budgets for t in TASKS]
    return rows


# ----------------------------------------------------------------------------------------------------- config_key


def test_config_key_stable_across_order_and_short():
    a = {"model": "m", "method": "tome", "budget": 0.5, "task": "knn", "seed": 0, "images": 64, "batch_size": 8}
    b = dict(reversed(list(a.items())))
    assert list(a) != list(b)
    assert config_key(a) == config_key(b)
    assert len(config_key(a)) == 16 and all(c in "0123456789abcdef" for c in config_key(a))
    assert config_key({"x": {"p": 1, "q": 2}}) == config_key({"x": {"q": 2, "p": 1}})  # nested too


def test_config_key_distinguishes_values_and_normalises_numbers():
    base = {"model": "m", "method": "tome", "budget": 0.5}
    assert config_key(base) != config_key({**base, "budget": 0.25})
    assert config_key(base) != config_key({**base, "method": "pitome"})
    assert config_key({"budget": 1}) == config_key({"budget": 1.0})
    assert config_key({"sizes": (1, 2)}) == config_key({"sizes": [1, 2]})
    # pinned: the key of a config must not change between releases, or every resume recomputes everything
    assert config_key({"a": 1}) == "015abd7f5cc57a2d"
    with pytest.raises(ValueError):
        config_key({"budget": math.nan})
    with pytest.raises(TypeError):
        config_key({"obj": object()})


# ---------------------------------------------------------------------------------------------------------- store


def test_append_rows_roundtrip(tmp_path):
    store = ResultStore.for_run("r1", root=tmp_path)
    assert store.path == tmp_path / "r1" / "results.jsonl"
    assert store.rows() == [] and store.keys() == set() and not store.has("x")
    rows = synthetic_rows()[:6]
    for r in rows:
        store.append(r)
    assert store.rows() == rows
    assert store.keys() == {r["key"] for r in rows}
    assert store.has(rows[0]["key"]) and not store.has("nope")
    assert len(store) == 6
    # a fresh store object on the same file sees the same thing
    assert ResultStore(store.path).rows() == rows
    text = store.path.read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 6


def test_append_refuses_missing_and_duplicate_keys(tmp_path):
    store = ResultStore(tmp_path / "results.jsonl")
    with pytest.raises(ValueError, match="key"):
        store.append({"method": "tome"})
    with pytest.raises(ValueError, match="key"):
        store.append({"key": ""})
    row = make_row("tome", 0.5, "features")
    store.append(row)
    # policy: append raises on a duplicate key (callers check has() first); the file is unchanged
    with pytest.raises(ValueError, match="already stored"):
        store.append({**row, "metrics": {"cosine_mean": 0.0}})
    # also when the row was written by another ResultStore object (the check reads the file)
    with pytest.raises(ValueError, match="already stored"):
        ResultStore(store.path).append(row)
    assert store.rows() == [row]


def test_non_finite_metrics_stored_as_null(tmp_path):
    store = ResultStore(tmp_path / "results.jsonl")
    row = make_row("tome", 0.5, "saliency")
    row["metrics"]["pearson"] = float("nan")
    with pytest.warns(ResultStoreWarning, match=r"metrics\.pearson"):
        store.append(row)
    line = store.path.read_text().strip()
    json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert store.rows()[0]["metrics"]["pearson"] is None


def test_truncated_last_line_is_skipped_and_next_append_is_clean(tmp_path):
    store = ResultStore(tmp_path / "results.jsonl")
    rows = synthetic_rows()[:4]
    for r in rows[:3]:
        store.append(r)
    # simulate a write interrupted half-way: part of a line, no newline
    fragment = json.dumps(rows[3]).encode()[:40]
    with open(store.path, "ab") as fh:
        fh.write(fragment)

    reader = ResultStore(store.path)
    with pytest.warns(ResultStoreWarning, match="incomplete last line"):
        assert reader.rows() == rows[:3]
    assert not reader.has(rows[3]["key"])  # cached: the file has not changed, no second warning

    reader.append(rows[3])  # must start on a fresh line, not glue onto the fragment
    lines = store.path.read_bytes().split(b"\n")
    assert lines[3] == fragment and lines[-1] == b""
    assert json.loads(lines[4]) == rows[3]
    with pytest.warns(ResultStoreWarning, match="unreadable line"):
        assert ResultStore(store.path).rows() == rows


def test_resume_after_crash_writes_only_missing_rows(tmp_path):
    configs = [{"model": "m", "method": "tome", "budget": b, "task": "features", "seed": 0} for b in (1, 0.8, 0.6)]
    configs += [{"model": "m", "method": "random", "budget": b, "task": "features", "seed": 0} for b in (0.8, 0.6)]
    computed: list[str] = []

    class Crash(RuntimeError):
        pass

    def run(store: ResultStore, crash_after: int | None = None) -> None:
        written = 0
        for cfg in configs:
            key = config_key(cfg)
            if store.has(key):
                continue
            if crash_after is not None and written == crash_after:
                raise Crash
            computed.append(key)  # stands in for the expensive measurement
            store.append({"key": key, **cfg, "metrics": {"cosine_mean": cfg["budget"]}})
            written += 1

    path = tmp_path / "run" / "results.jsonl"
    with pytest.raises(Crash):
        run(ResultStore(path), crash_after=3)
    assert len(ResultStore(path).rows()) == 3

    before = list(computed)
    run(ResultStore(path))  # the resumed pass, in a fresh process as far as the store knows
    assert computed[len(before) :] == [config_key(c) for c in configs[3:]]  # exactly the two missing ones

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean file: nothing skipped
        rows = ResultStore(path).rows()
    keys = [r["key"] for r in rows]
    assert len(rows) == 5 and len(set(keys)) == 5
    assert set(keys) == {config_key(c) for c in configs}
    assert len(path.read_text().splitlines()) == 5
    run(ResultStore(path))  # a third pass has nothing to do
    assert len(computed) == 5


def test_environment_fields():
    env = environment()
    assert set(env) == {"versions", "hardware"}
    assert {"tokenthin", "torch", "transformers"} <= set(env["versions"])
    assert {"cpu", "threads", "device"} <= set(env["hardware"])
    assert isinstance(env["hardware"]["threads"], int) and env["hardware"]["threads"] >= 1
    json.dumps(env)  # goes into rows as-is


# --------------------------------------------------------------------------------------------------------- report


def test_summary_table_columns_and_order():
    rows = synthetic_rows()
    table = summary_table(rows)
    assert len(table) == 1 + 2 * 3  # reference + two methods x three budgets
    assert all(list(rec) == list(COLUMNS) for rec in table)
    assert [(r["method"], r["budget"]) for r in table] == [
        ("none", 1.0),
        ("random", 0.75),
        ("tome", 0.75),
        ("random", 0.5),
        ("tome", 0.5),
        ("random", 0.25),
        ("tome", 0.25),
    ]
    by = {(r["method"], r["budget"]): r for r in table}
    tome = by[("tome", 0.5)]
    m = {t: _metrics(t, "tome", 0.5) for t in TASKS}
    assert tome["baseline"] is False and by[("random", 0.5)]["baseline"] is True
    assert tome["flops"] == pytest.approx(m["cost"]["flops_fraction"])
    assert tome["cosine"] == pytest.approx(m["features"]["cosine_mean"])
    assert tome["knn_acc"] == pytest.approx(m["knn"]["accuracy"])
    assert tome["knn_retained"] == pytest.approx(m["knn"]["retained"])
    assert tome["sal_pearson"] == pytest.approx(m["saliency"]["pearson"])
    assert tome["sal_iou20"] == pytest.approx(m["saliency"]["iou20"])
    assert tome["speedup"] == pytest.approx(m["cost"]["speedup"])
    assert tome["predicted_speedup"] == pytest.approx(m["cost"]["predicted_speedup"])
    assert tome["tokens_out"] == m["cost"]["tokens_out"]
    assert tome["overhead_share"] == pytest.approx(0.04)

    # a task that was not run leaves its columns empty, not an error
    partial = summary_table([r for r in rows if r["task"] != "saliency"])
    assert all(r["sal_pearson"] is None and r["sal_iou20"] is None for r in partial)
    assert summary_table([]) == []


def test_summary_table_averages_seeds():
    a, b = make_row("random", 0.5, "features"), make_row("random", 0.5, "features")
    a["metrics"]["cosine_mean"], b["metrics"]["cosine_mean"] = 0.6, 0.8
    b["key"], b["seed"] = "other", 1
    (rec,) = summary_table([a, b])
    assert rec["cosine"] == pytest.approx(0.7)
    assert rec["speedup"] is None


def test_write_summary_csv_and_markdown(tmp_path):
    rows = synthetic_rows()
    csv_path, md_path = write_summary(rows, tmp_path / "out")
    assert csv_path.name == "summary.csv" and md_path.name == "summary.md"

    with open(csv_path, newline="") as fh:
        records = list(csv.DictReader(fh))
    assert list(records[0]) == list(COLUMNS)
    assert len(records) == 7 and records[0]["method"] == "none"
    assert float(records[2]["cosine"]) == pytest.approx(_metrics("features", "tome", 0.75)["cosine_mean"])

    md = md_path.read_text()
    lines = md.strip().splitlines()
    assert "dinov2-s14" in lines[0] and "FLOPs" in lines[0]  # the one-line legend
    table = [ln for ln in lines if ln.startswith("|")]
    assert len(table) == 2 + 7  # header, separator, rows
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[:3] == ["method", "budget", "baseline"] and "cosine" in header and "speedup" in header
    assert set(table[1].replace("|", "").replace(":", "")) == {"-"}
    assert all(ln.count("|") == table[0].count("|") for ln in table)
    tome = next(ln for ln in table if ln.startswith("| tome | 0.50"))
    assert f"{_metrics('features', 'tome', 0.5)['cosine_mean']:.3f}" in tome
    assert f"{_metrics('cost', 'tome', 0.5)['speedup']:.2f}" in tome

    # missing values render as "-"
    _, md2 = write_summary([r for r in rows if r["task"] != "cost"], tmp_path / "out2")
    assert "| - |" in md2.read_text()


def test_write_summary_keeps_model_column_for_several_models(tmp_path):
    rows = synthetic_rows(model="a") + synthetic_rows(model="b")
    _, md = write_summary(rows, tmp_path)
    header = md.read_text().splitlines()[2]
    assert header.startswith("| model | method |")


def test_pareto_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = pareto_plot(synthetic_rows(), tmp_path / "plots" / "pareto.png")
    assert out == tmp_path / "plots" / "pareto.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000  # three metrics x two axes of lines, not an empty canvas

    # one quality metric only, and metrics with no data are left out by default
    one = pareto_plot(synthetic_rows(), tmp_path / "one.png", quality=["knn_acc"])
    assert one.stat().st_size > 5_000
    no_sal = [r for r in synthetic_rows() if r["task"] != "saliency"]
    assert pareto_plot(no_sal, tmp_path / "nosal.png").stat().st_size > 5_000
    # a quality-only run (no timed rows): one column of panels, no empty speedup axes
    untimed = [r for r in synthetic_rows() if r["task"] != "cost"]
    narrow = pareto_plot(untimed, tmp_path / "untimed.png").read_bytes()
    width = int.from_bytes(narrow[16:20], "big")
    assert width < int.from_bytes(data[16:20], "big") * 0.75
    with pytest.raises(ValueError):
        pareto_plot(synthetic_rows(), tmp_path / "bad.png", quality=["nope"])
    assert not os.path.exists(tmp_path / "bad.png")
