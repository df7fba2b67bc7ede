"""``tokenthin bench --task vqa`` on a tiny LLaVA checkpoint and a 6-line JSONL: rows, scores, reports, resume; and
the same run data-parallel on 2 CPU processes under torchrun, one rank crashing and the run resumed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tokenthin.bench.vqa import VQARun, run_vqa
from tokenthin.cli import app
from tokenthin.eval.tiny import make_vqa_data, save_tiny

SRC = Path(__file__).resolve().parents[1] / "src"
runner = CliRunner()
KEEPS = (0.25, 8)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("llava", tmp_path_factory.mktemp("ckpt") / "tiny-llava", image_size=112)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_vqa_data(tmp_path_factory.mktemp("vqa"))


def _args(ckpt: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "bench",
        "--task",
        "vqa",
        "--model",
        str(ckpt),
        "--data",
        str(data),
        "--methods",
        "visionzip,fastv",
        "--budgets",
        ",".join(map(str, KEEPS)),
        "--batch-size",
        "4",
        "--max-new-tokens",
        "4",
        "--repeats",
        "1",
        "--out",
        str(out),
        "--run-name",  # not --run: torchrun's own parser would read it as its --run-path
        "r",
        *extra,
    ]


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def single(ckpt: Path, data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single")
    res = runner.invoke(app, _args(ckpt, data, out))
    assert res.exit_code == 0, res.output
    return out / "r"


def test_vqa_rows_reports_and_budgets(single: Path) -> None:
    rows = _rows(single / "results.jsonl")
    configs = [("none", 1.0)] + [(m, k) for m in ("visionzip", "fastv", "random", "pool") for k in KEEPS]
    assert len(rows) == 6 * len(configs) and len({r["key"] for r in rows}) == len(rows)
    assert [(r["index"], r["method"], r["budget"]) for r in rows] == [(i, m, k) for i in range(6) for m, k in configs]
    for r in rows:
        m = r["metrics"]
        assert "error" not in r and m["visual_tokens"] == 64 and m["new_tokens"] >= 1
        assert m["kept"] == (64 if r["method"] == "none" else 16 if r["budget"] == 0.25 else 8)
        assert m["ttft_s"] > 0 and m["flops"] > 0 and m["peak_mb"] > 0 and m["correct"] in (0.0, 1.0)
        assert r["site"] == {"none": None, "fastv": "llm:1"}.get(r["method"], "output")
    assert all(r["metrics"]["agree"] == 1.0 for r in rows if r["method"] == "none")
    full = {r["sample"]: r["metrics"]["flops"] for r in rows if r["method"] == "none"}
    assert all(r["metrics"]["flops"] < full[r["sample"]] for r in rows if r["method"] != "none")
    md = (single / "summary.md").read_text()
    assert "| visionzip | 8 | output |" in md and "| random (baseline) | 0.25 |" in md and "64 -> 16" in md
    assert (single / "pareto.png").stat().st_size > 1000 and (single / "summary.csv").exists()


def test_accuracy_and_agreement_are_scored_against_the_file(single: Path, ckpt: Path, tmp_path: Path) -> None:
    """References set to the unreduced model's own answers for 3 lines: its accuracy is exactly 0.5."""
    rows = _rows(single / "results.jsonl")
    own = [r["answer"] for r in rows if r["method"] == "none"]
    data = make_vqa_data(tmp_path / "data", answers=own[:3] + ["no such answer"] * 3)
    got = run_vqa(VQARun(str(ckpt), str(data), ("random",), (8,), max_new_tokens=4), tmp_path / "out", False, "x")
    none = [r for r in got if r["method"] == "none"]
    assert [r["answer"] for r in none] == own  # the same answers from a second run
    assert [r["metrics"]["correct"] for r in none] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    from tokenthin.bench.vqa_report import summarize

    rec = {(r["method"], r["budget"]): r for r in summarize(got)}
    assert rec[("none", 1.0)]["correct"] == 0.5 and rec[("none", 1.0)]["agree"] == 1.0
    rnd = [r for r in got if r["method"] == "random"]
    assert rec[("random", 8)]["agree"] == sum(a["answer"] == b["answer"] for a, b in zip(rnd, none)) / 6


def test_resume_adds_nothing_and_a_rerun_without_it_refuses(single: Path, ckpt: Path, data: Path) -> None:
    before = (single / "results.jsonl").read_text()
    res = runner.invoke(app, _args(ckpt, data, single.parent))
    assert res.exit_code != 0 and "--resume" in res.output
    res = runner.invoke(app, _args(ckpt, data, single.parent, "--resume"))
    assert res.exit_code == 0, res.output
    assert (single / "results.jsonl").read_text() == before


def test_a_method_that_cannot_act_gets_error_rows_and_the_run_goes_on(ckpt: Path, data: Path, tmp_path: Path) -> None:
    got = run_vqa(VQARun(str(ckpt), str(data), ("dtome",), (8,), max_new_tokens=2), tmp_path, False, "x")
    err = [r for r in got if r["method"] == "dtome"]
    assert len(err) == 6 and all("error" in r for r in err)
    assert all("error" not in r for r in got if r["method"] != "dtome")


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="no torchrun")
def test_two_processes_under_torchrun_with_a_crash_and_resume(ckpt: Path, data: Path, tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    small = ["--methods", "visionzip", "--budgets", "8"]  # 4 configurations (none, visionzip, random, pool) x 6

    def launch(*extra: str, fault: str = "") -> subprocess.CompletedProcess:
        cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 400), "-m", "tokenthin"]
        return subprocess.run(
            [*cmd, *_args(ckpt, data, tmp_path / "dp", *small, *extra)],
            env={**env, "TOKENTHIN_FAULT": fault},
            capture_output=True,
            text=True,
            timeout=240,
        )

    crashed = launch(fault="1:5")  # rank 1 dies abruptly after its 5th row
    shards = tmp_path / "dp" / "r" / "shards"
    assert crashed.returncode != 0 and (shards / "rank-1.jsonl").exists(), crashed.stderr[-3000:]
    assert len(_rows(shards / "rank-1.jsonl")) == 5 and not (tmp_path / "dp" / "r" / "results.jsonl").exists()
    done = launch("--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    merged = _rows(tmp_path / "dp" / "r" / "results.jsonl")
    res = runner.invoke(app, _args(ckpt, data, tmp_path / "one", *small))  # the same run in one process
    assert res.exit_code == 0, res.output
    ref = _rows(tmp_path / "one" / "r" / "results.jsonl")
    assert len(ref) == 24 and [r["key"] for r in merged] == [r["key"] for r in ref]  # same order, no dup, none lost
    assert [r["answer"] for r in merged] == [r["answer"] for r in ref]
    assert {r["rank"] for r in merged} == {0, 1} and all(r["index"] % 2 == r["rank"] for r in merged)
    assert sum(len(_rows(p)) for p in shards.glob("rank-*.jsonl")) == 24
    assert "| visionzip | 8 | output |" in done.stdout  # rank 0 printed the summary, once
    assert done.stdout.count("| visionzip | 8 |") == 1
