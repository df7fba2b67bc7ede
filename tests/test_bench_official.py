"""Bench rows of a method's parity mode: METHOD+official runs the method with official=True."""

from __future__ import annotations

import json

import pytest
import torch

from tokenthin.bench.variants import OFFICIAL, apply_kwargs, base_name, check_names, with_official
from tokenthin.methods.base import all_methods


def test_names_and_kwargs() -> None:
    assert base_name("tome+official") == "tome" and base_name("tome+cal") == "tome" and base_name("tome") == "tome"
    assert apply_kwargs("tome+official") == {"official": True}
    assert apply_kwargs("tome") == {} and apply_kwargs("tome+cal") == {}
    known = all_methods()
    assert with_official(["tome", "divprune", "visionzip"], known) == [
        "tome",
        "tome+official",
        "divprune",
        "visionzip",
        "visionzip+official",
    ]
    assert with_official(["tome", "tome+official"], known) == ["tome", "tome+official"]  # not twice


def test_check_names_says_what_to_do() -> None:
    known = all_methods()
    assert check_names(["tome", "tome+official", "hiprune+official", "tome+cal"], known) is None
    msg = check_names(["divprune+official"], known)
    assert msg is not None and "no official=True mode" in msg and "tome" in msg
    msg = check_names(["nosuch"], known)
    assert msg is not None and "unknown method 'nosuch'" in msg


@pytest.fixture
def tiny_dirs(tmp_path):
    import numpy as np
    from PIL import Image
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, image_size=32, patch_size=4)
    model_dir = tmp_path / "tiny-dinov2"
    Dinov2Model(cfg).eval().save_pretrained(model_dir)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(imgs / f"im{i}.png")
    return model_dir, imgs


def _bench(tiny_dirs, tmp_path, *extra: str):
    from typer.testing import CliRunner

    from tokenthin.cli import app

    model_dir, imgs = tiny_dirs
    args = ["bench", "--model", str(model_dir), "--images-dir", str(imgs), "--image-size", "32", "--images", "2"]
    args += ["--task", "features", "--repeats", "1", "--out", str(tmp_path / "res"), "--run", "o", "--no-viz"]
    return CliRunner().invoke(app, [*args, *extra])


def test_bench_official_rows_run_the_parity_mode(tiny_dirs, tmp_path, monkeypatch) -> None:
    from tokenthin.bench import runner

    seen: dict[str, dict] = {}
    real = runner.api.applied

    def spy(model, method, **kw):
        seen.setdefault(method, {})[bool(kw.get("official"))] = kw
        return real(model, method, **kw)

    monkeypatch.setattr(runner.api, "applied", spy)
    res = _bench(tiny_dirs, tmp_path, "--budgets", "0.7", "--methods", "tome,divprune", "--official")
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (tmp_path / "res" / "o" / "results.jsonl").read_text().splitlines()]
    names = {r["method"] for r in rows}
    assert {"tome", f"tome{OFFICIAL}", "divprune"} <= names and f"divprune{OFFICIAL}" not in names
    assert set(seen["tome"]) == {False, True}  # the default row and the official row, each applied once
    assert set(seen["divprune"]) == {False}
    by = {r["method"]: r for r in rows}
    assert by[f"tome{OFFICIAL}"]["flops"] == pytest.approx(by["tome"]["flops"], abs=1e-9)  # same budget


def test_bench_refuses_bad_variants(tiny_dirs, tmp_path) -> None:
    res = _bench(tiny_dirs, tmp_path, "--methods", "divprune+official")
    assert res.exit_code != 0 and "no official=True mode" in res.output
    res = _bench(tiny_dirs, tmp_path, "--methods", "tome", "--calibrated", "--task", "ocr")
    assert res.exit_code != 0 and "calibrated rows" in res.output
