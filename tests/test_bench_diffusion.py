"""benchmarks/bench_diffusion.py --quick on tiny shapes: every shape builds and runs, rows and table are written,
shapes without a registered host are skipped with a message."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_diffusion.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_diffusion", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_writes_rows_and_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenthin.denoise import cost

    monkeypatch.setattr(cost, "ENABLED", False)  # the quick shapes' blocks cost less than a ToMA plan
    bench = _load()
    assert "tomesd" in bench.denoiser_methods() and "tome" not in bench.denoiser_methods()
    argv = [
        "--quick",
        "--ratios",
        "0.5",
        "--eager-ratios",
        "0.25",
        "--processors",
        "sdpa,eager",
        "--out",
        str(tmp_path),
    ]
    rows = bench.main(argv)
    done = [r for r in rows if "skipped" not in r]
    assert {r["shape"] for r in done} >= {"sd15", "sdxl"}
    for r in done:
        assert r["time_ratio"] > 0 and r["memory_ratio"] > 0 and 0 <= r["own_share"] < 1 and r["merged_tokens"] > 0
        assert len(r["round_ratios"]) == 1 and r["processor"] in ("sdpa", "eager")
    assert all("time_ratio_extrapolated" in r for r in done if r["shape"] == "sdxl")
    assert all(0 < r["level0_attention_share"] < 1 and r["time_ratio_from_modules"] > 0 for r in done)
    saved = json.loads((tmp_path / "bench_diffusion.json").read_text())
    assert saved["meta"]["threads"] >= 1 and len(saved["rows"]) == len(rows)
    md = (tmp_path / "bench_diffusion.md").read_text()
    assert md.startswith("| shape |") and "SD-1.5" in md and "| tomesd | 0.50 |" in md


@pytest.mark.parametrize("shape", ["dit", "pixart"])
def test_transformer_shapes_run_unreduced(shape: str) -> None:
    """The DiT / PixArt inputs are valid calls whether or not a host takes them yet."""
    bench = _load()
    model, kw, _ = bench.SHAPES[shape][1](True, None)
    with torch.inference_mode():
        out = model(**kw).sample
    assert out.shape[0] == 2 and bool(torch.isfinite(out).all())
