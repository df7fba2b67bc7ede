"""CLI smoke tests on a tiny random model and a handful of images; resume writes no duplicate rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tiny import build
from tokenthin.cli import app

runner = CliRunner()


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "tiny-dinov2"
    build("dinov2").save_pretrained(d)
    return d


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / f"im{i}.png")
    return d


def _bench(model: Path, images: Path, out: Path, *extra: str):
    args = [
        "bench",
        "--model",
        str(model),
        "--images-dir",
        str(images),
        "--images",
        "4",
        "--image-size",
        "32",
        "--budgets",
        "0.9,0.75",
        "--methods",
        "tome,divprune",
        "--task",
        "features,cost",
        "--repeats",
        "1",
        "--batch-size",
        "2",
        "--out",
        str(out),
        "--run",
        "smoke",
        "--no-viz",
        *extra,
    ]
    return runner.invoke(app, args)


def test_bench_smoke_writes_every_report(tiny_model_dir: Path, image_dir: Path, tmp_path: Path) -> None:
    res = _bench(tiny_model_dir, image_dir, tmp_path / "res")
    assert res.exit_code == 0, res.output
    run = tmp_path / "res" / "smoke"
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    methods = {r["method"] for r in rows}
    assert methods == {"tome", "divprune", "random", "pool", "downsample"}  # baselines always run
    assert len(rows) == 5 * 2 * 2  # methods x budgets x tasks
    assert len({r["key"] for r in rows}) == len(rows)
    cost = [r for r in rows if r["task"] == "cost" and r["method"] == "tome"]
    assert all(0 < r["metrics"]["time_ratio"] and r["metrics"]["tokens_per_layer"] for r in cost)
    feats = [r for r in rows if r["task"] == "features"]
    assert all(-1 <= r["metrics"]["cosine_mean"] <= 1 for r in feats)
    for name in ("summary.csv", "summary.md", "pareto.png"):
        assert (run / name).stat().st_size > 0
    assert "| tome |" in (run / "summary.md").read_text()


def test_bench_resume_writes_no_duplicates(tiny_model_dir: Path, image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "res"
    assert _bench(tiny_model_dir, image_dir, out).exit_code == 0
    path = out / "smoke" / "results.jsonl"
    lines = path.read_text().splitlines()
    # simulate an interrupted run: drop the last rows and leave a torn line behind
    path.write_text("\n".join(lines[:7]) + "\n" + lines[7][:25])
    again = _bench(tiny_model_dir, image_dir, out, "--resume")
    assert again.exit_code == 0, again.output
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip().endswith("}")]
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == len(lines)
    # without --resume an existing run is refused instead of being mixed
    refused = _bench(tiny_model_dir, image_dir, out)
    assert refused.exit_code != 0 and "--resume" in refused.output


def test_flops_and_methods_commands() -> None:
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0 and "| tome |" in res.output and "2210.09461" in res.output


def test_bench_rejects_bad_arguments(tiny_model_dir: Path, image_dir: Path, tmp_path: Path) -> None:
    res = _bench(tiny_model_dir, image_dir, tmp_path / "r", "--budgets", "1.5")
    assert res.exit_code != 0


def test_bench_skips_unreachable_budgets_and_goes_on(tiny_model_dir: Path, image_dir: Path, tmp_path: Path) -> None:
    res = _bench(tiny_model_dir, image_dir, tmp_path / "r", "--budgets", "0.3")  # too low for 3 layers of ToMe
    assert res.exit_code == 0, res.output
    assert "skipped tome" in res.output
    rows = (tmp_path / "r" / "smoke" / "results.jsonl").read_text().splitlines()
    assert rows and all('"tome"' not in r for r in rows)


def test_flops_command(tiny_model_dir: Path) -> None:
    res = runner.invoke(
        app, ["flops", "--model", str(tiny_model_dir), "--method", "tome", "--budget", "0.8", "--image-size", "32"]
    )
    assert res.exit_code == 0, res.output
    assert "GFLOPs per image" in res.output and "schedule: site=layers r=" in res.output
