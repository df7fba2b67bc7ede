"""benchmarks/gpu.py (never run in CI): it refuses clearly without CUDA, and --dry-run builds its table on CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu


def test_refuses_without_cuda(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU.*--dry-run"):
        gpu.main(["--out", str(tmp_path)])


def test_arguments_parse() -> None:
    args = gpu.parse(["--dtype", "bf16", "--batch", "64,128,256", "--models", "vit-l-timm,llava"])
    assert (args.dtype, args.batch, args.models) == ("bf16", "64,128,256", "vit-l-timm,llava")
    with pytest.raises(SystemExit):
        gpu.parse(["--dtype", "fp8"])


def test_dry_run_builds_the_table(tmp_path: Path) -> None:
    args = ["--dry-run", "--models", "vit-b-hf", "--methods", "tome,random", "--modes", "eager,compiled"]
    guards = torch._dynamo.config.skip_nnmodule_hook_guards
    rows = gpu.main([*args, "--out", str(tmp_path)])
    assert torch._dynamo.config.skip_nnmodule_hook_guards == guards  # the run's hook guards do not leak out
    assert [(r["mode"], r["method"]) for r in rows] == [
        ("eager", "tome"),
        ("eager", "random"),
        ("compiled", "tome"),
        ("compiled", "random"),
    ]
    for r in rows:
        assert "error" not in r, r
        assert r["full_per_s"] > 0 and r["red_per_s"] > 0 and r["predicted"] > 1.0
        assert (r["own"] is None) == (r["mode"] == "compiled")  # no own time inside a compiled graph
        assert r["full_mb"] is None  # peak memory is CUDA-only
        if r["mode"] == "compiled":  # the reduced forward is one graph with no break inside tokenthin's hooks
            assert (r["graphs"], r["graph_breaks"]) == (1, 0), r
    text = (tmp_path / "gpu.md").read_text()
    assert "| model | batch | dtype | mode | method | unreduced /s |" in text and "dry run" in text
    assert len((tmp_path / "gpu.jsonl").read_text().splitlines()) == len(rows)


def test_unknown_model_is_named(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="unknown model 'vit-h'"):
        gpu.main(["--dry-run", "--models", "vit-h", "--out", str(tmp_path)])
