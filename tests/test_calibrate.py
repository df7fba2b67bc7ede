"""tokenthin.calibrate: calibrated per-layer schedules, their JSON round trip and apply(schedule=)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import tokenthin
from tokenthin.budget import Schedule, flops_fraction
from tokenthin.calibration import CalibratedSchedule, calibrate
from tokenthin.calibration.search import greedy_layers, sigmoid_counts, valid_r
from tokenthin.errors import BudgetError, TokenThinError
from tokenthin.flops import EncoderDims

LAYERS = 6  # 3 layers cannot reach 50% FLOPs by merging (the first layer always sees every token)


def _dinov2(layers: int = LAYERS, seed: int = 0) -> torch.nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    cfg = Dinov2Config(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, image_size=32, patch_size=4, mlp_ratio=2
    )
    return Dinov2Model(cfg).eval()


def _pixels(n: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return _dinov2()


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return _pixels(4, 11)


@pytest.fixture(scope="module")
def tome_sched(model: torch.nn.Module, calib: torch.Tensor) -> CalibratedSchedule:
    return calibrate(model, "tome", flops=0.5, images=calib, steps=4, objective="cls", progress=False)


@pytest.fixture(scope="module")
def prune_sched(model: torch.nn.Module, calib: torch.Tensor) -> CalibratedSchedule:
    return calibrate(model, "divprune", flops=0.5, images=calib, objective="cls", progress=False)


def _out(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        o = model(pixel_values=x)
    return o.pooler_output, o.last_hidden_state


def _cos(model: torch.nn.Module, x: torch.Tensor, ref: torch.Tensor) -> float:
    return F.cosine_similarity(_out(model, x)[0], ref, dim=-1).mean().item()


# ----------------------------------------------------------------------------- the searches, without a model


def test_greedy_puts_the_reduction_where_it_costs_least() -> None:
    """A synthetic fidelity where merging after layer 3 is free and elsewhere expensive: the greedy search must
    spend the budget there first, and meet the target."""
    dims = EncoderDims(hidden=32, mlp_hidden=64, mlp_mats=2, num_layers=8, patch=(4, 4), channels=3, num_protected=1)
    grid = (8, 8)

    def flops_of(s: Schedule) -> float:
        return flops_fraction(s, dims, grid)

    def fidelity(s: Schedule) -> float:
        assert s.r is not None
        return 1.0 - sum(r * (0.0 if i == 3 else 1e-2) for i, r in enumerate(s.r))

    (s,) = greedy_layers(64, 8, 0.7, flops_of, fidelity, steps=4)
    assert s.r is not None and valid_r(s.r, 64)
    assert flops_of(s) <= 0.7 + 1e-9 and flops_of(s) > 0.65
    assert s.r[3] == max(s.r) and s.r[3] >= 16


def test_one_greedy_pass_serves_several_targets(model, calib) -> None:
    lo, hi = calibrate(model, "tome", flops=[0.5, 0.75], images=calib, steps=3, progress=False)
    assert (lo.flops_target, hi.flops_target) == (0.5, 0.75)
    for s in (lo, hi):
        assert abs(s.flops - s.flops_target) <= 0.02 and s.fidelity >= (s.baseline_fidelity or 0) - 1e-9
    assert lo.seconds == hi.seconds and lo.forwards == hi.forwards  # the cost of the whole call
    with pytest.raises(BudgetError, match="flops=\\[\\]"):
        calibrate(model, "tome", flops=[], images=calib, progress=False)


def test_sigmoid_counts_fall_and_keep_the_half_rule() -> None:
    counts = sigmoid_counts(256, 12, slope=10.0, center=0.3, floor=0.05)
    assert len(counts) == 11 and counts == sorted(counts, reverse=True)
    prev = [256, *counts[:-1]]
    assert all(c >= p - p // 2 for p, c in zip(prev, counts))
    assert sigmoid_counts(256, 12, 10.0, 0.3, floor=1.0) == [256] * 11


# ----------------------------------------------------------------------------- the schedule


def test_json_round_trip_is_exact(tome_sched: CalibratedSchedule, prune_sched: CalibratedSchedule, tmp_path) -> None:
    for s in (tome_sched, prune_sched):
        p = s.save(tmp_path / f"{s.method}.json")
        back = CalibratedSchedule.load(p)
        assert back == s
        assert json.loads(p.read_text())["version"] == 2
        assert back.for_grid(back.grid) == s.for_grid(s.grid)


def test_version_1_files_still_load(tome_sched: CalibratedSchedule) -> None:
    d = tome_sched.to_dict()
    for k in ("llm", "samples", "text_tokens", "visual_tokens", "input_keep", "resized_patches"):  # added in 2
        del d[k]
    back = CalibratedSchedule.from_dict({**d, "version": 1})
    assert back == tome_sched


def test_json_refuses_other_formats_and_versions(tome_sched: CalibratedSchedule, tmp_path) -> None:
    d = tome_sched.to_dict()
    with pytest.raises(BudgetError, match="version"):
        CalibratedSchedule.from_dict({**d, "version": 99})
    with pytest.raises(BudgetError, match="not a tokenthin calibrated schedule"):
        CalibratedSchedule.from_dict({**d, "format": "other"})
    with pytest.raises(BudgetError, match="unknown fields"):
        CalibratedSchedule.from_dict({**d, "surprise": 1})
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(BudgetError, match="holds no calibrated schedule"):
        CalibratedSchedule.load(bad)


def test_search_meets_the_flops_target(model, tome_sched: CalibratedSchedule, prune_sched: CalibratedSchedule) -> None:
    for s in (tome_sched, prune_sched):
        assert abs(s.flops - 0.5) <= 0.02, s.describe()
        assert s.images == 4 and s.forwards > 1 and s.seconds > 0
        with tokenthin.applied(model, s.method, schedule=s):
            assert tokenthin.explain(model)["applied"]["flops_fraction"] == pytest.approx(s.flops)
    assert tome_sched.r is not None and sum(tome_sched.r) > 0
    assert prune_sched.site == "layer" and prune_sched.keep is not None and prune_sched.keep < 1


def test_calibrated_is_at_least_as_faithful_as_the_default_solve(model, calib, tome_sched, prune_sched) -> None:
    """Measured independently here: the default flops= solve (constant r / the fixed site rule) on the same images."""
    ref = _out(model, calib)[0]
    sig = calibrate(model, "tome", flops=0.5, images=calib, search="sigmoid", objective="cls", progress=False)
    for s in (tome_sched, sig, prune_sched):
        with tokenthin.applied(model, s.method, flops=0.5):
            default = _cos(model, calib, ref)
        with tokenthin.applied(model, s.method, schedule=s):
            ours = _cos(model, calib, ref)
        assert ours == pytest.approx(s.fidelity, abs=1e-5)
        assert s.baseline_fidelity == pytest.approx(default, abs=1e-5)
        assert ours >= default - 1e-6, (s.describe(), default)


def test_zero_budget_is_the_identity(model, calib) -> None:
    x = _pixels(3, 5)
    ref = _out(model, x)
    for method in ("tome", "divprune"):
        s = calibrate(model, method, flops=1.0, images=calib, progress=False)
        assert s.flops == pytest.approx(1.0)
        with tokenthin.applied(model, method, schedule=s):
            got = _out(model, x)
        for a, b in zip(got, ref):
            assert (a - b).abs().max().item() <= 1e-5


def test_batch_equals_singles(model, tome_sched, prune_sched) -> None:
    x = _pixels(3, 7)
    for s in (tome_sched, prune_sched):
        with tokenthin.applied(model, s.method, schedule=s):
            batch = _out(model, x)[0]
            singles = torch.cat([_out(model, x[i : i + 1])[0] for i in range(3)])
        assert (batch - singles).abs().max().item() <= 1e-5


def test_other_input_sizes_keep_the_token_fractions(model, tome_sched: CalibratedSchedule) -> None:
    assert tome_sched.for_grid(tome_sched.grid).r == tome_sched.r  # exact at the calibrated size
    big = tome_sched.for_grid((12, 12))
    assert big.r is not None and valid_r(big.r, 144)
    left = [144 - sum(big.r[:i]) for i in range(LAYERS)]
    for n_cal, n_big in zip(tome_sched.tokens(), left):
        assert abs(n_big - n_cal * 144 / 64) <= 1.0
    with tokenthin.applied(model, "tome", schedule=tome_sched):
        _out(model, _pixels(2, 3, size=48))
        assert [n - 1 for n in tokenthin.info(model).tokens_per_layer] == left


def test_explain_plans_for_the_calibrated_size(model) -> None:
    s = calibrate(model, "tome", flops=0.8, images=_pixels(2, 9, size=48), steps=1, progress=False)
    assert s.grid == (12, 12) and s.image_size == (48, 48)
    with tokenthin.applied(model, "tome", schedule=s):
        plan = tokenthin.explain(model)["applied"]
        assert plan["planned_for"]["grid"] == (12, 12) and plan["flops_fraction"] == pytest.approx(s.flops)


def test_apply_schedule_from_a_path(model, tome_sched: CalibratedSchedule, tmp_path) -> None:
    p = tome_sched.save(tmp_path / "s.json")
    with tokenthin.applied(model, "tome", schedule=str(p)):
        assert tokenthin.explain(model)["applied"]["schedule"] == f"site=layers r={list(tome_sched.r or ())}"


def test_auto_objective_reads_the_patch_tokens_where_there_are_some(model, calib) -> None:
    s = calibrate(model, "tome", flops=0.75, images=calib, steps=1, progress=False)
    assert s.objective == "cls+patch"


def test_patch_objective(model, calib) -> None:
    s = calibrate(model, "tome", flops=0.75, images=calib, objective="patch", steps=2, progress=False)
    assert s.objective == "patch" and 0 < s.fidelity <= 1 + 1e-6 and abs(s.flops - 0.75) <= 0.02


def test_timm_host() -> None:
    from tiny_timm import images, vit

    m = vit("plain", depth=LAYERS)
    s = calibrate(m, "tome", flops=0.6, images=images(3, seed=2), steps=2, progress=False)
    assert abs(s.flops - 0.6) <= 0.02 and s.host
    assert s.objective == "cls"  # "auto": a timm model returns pooled features only
    x = images(2, seed=4)
    with tokenthin.applied(m, "tome", schedule=s), torch.no_grad():
        assert m(x).shape == (2, 32)
    with pytest.raises(TokenThinError, match="objective='cls'"):
        calibrate(m, "tome", flops=0.6, images=images(2), objective="patch", progress=False)


# ----------------------------------------------------------------------------- clear errors


def test_bad_inputs_raise_clear_errors(model, calib, tome_sched: CalibratedSchedule) -> None:
    with pytest.raises(TokenThinError, match="drop r="):
        tokenthin.apply(model, "tome", schedule=tome_sched, r=2)
    with pytest.raises(TokenThinError, match="calibrated for method 'tome'.*tokenthin.calibrate"):
        tokenthin.apply(model, "pitome", schedule=tome_sched)
    with pytest.raises(TokenThinError, match="CalibratedSchedule"):
        tokenthin.apply(model, "tome", schedule={"r": [1]})
    with pytest.raises(TokenThinError, match="calibrated with parameters"):
        tokenthin.apply(model, "tome", schedule=tome_sched, metric="x")
    assert not tokenthin.is_applied(model)
    with pytest.raises(BudgetError, match="calibrate again on this model"):
        tokenthin.apply(_dinov2(layers=4), "tome", schedule=tome_sched)
    with pytest.raises(TokenThinError, match="search='greedy'"):
        calibrate(model, "divprune", flops=0.5, images=calib, search="sigmoid", progress=False)
    with pytest.raises(TokenThinError, match="calibrates its own thresholds"):
        calibrate(model, "dtome", flops=0.5, images=calib, progress=False)
    with pytest.raises(TokenThinError, match="objective must be"):
        calibrate(model, "tome", flops=0.5, images=calib, objective="loss", progress=False)
    with pytest.raises(BudgetError, match="fraction"):
        calibrate(model, "tome", flops=1.5, images=calib, progress=False)
    with pytest.raises(TokenThinError, match="float"):
        calibrate(model, "tome", flops=0.5, images=calib.long(), progress=False)
    with pytest.raises(BudgetError, match="unreachable"):
        calibrate(model, "tome", flops=0.05, images=calib, steps=1, progress=False)
    with pytest.raises(TokenThinError, match="site"):
        calibrate(model, "downsample", flops=0.5, images=calib, progress=False)
    with tokenthin.applied(model, "tome", r=1), pytest.raises(TokenThinError, match="remove"):
        calibrate(model, "tome", flops=0.5, images=calib, progress=False)


# ----------------------------------------------------------------------------- command line and bench rows


@pytest.fixture
def tiny_dirs(tmp_path):
    import numpy as np
    from PIL import Image

    model_dir = tmp_path / "tiny-dinov2"
    _dinov2(layers=4).save_pretrained(model_dir)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(imgs / f"im{i}.png")
    return model_dir, imgs


def test_cli_calibrate_and_bench_calibrated_rows(tiny_dirs, tmp_path) -> None:
    from typer.testing import CliRunner

    from tokenthin.cli import app

    model_dir, imgs = tiny_dirs
    common = ["--model", str(model_dir), "--images-dir", str(imgs), "--image-size", "32"]
    out = tmp_path / "s.json"
    args = ["calibrate", *common, "--method", "tome", "--flops", "0.8", "--eval-images", "2", "--steps", "2"]
    res = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    s = CalibratedSchedule.load(out)
    assert s.method == "tome" and s.images == 2 and abs(s.flops - 0.8) <= 0.02  # the images after the first 2
    bench = ["bench", *common, "--images", "2", "--budgets", "0.8", "--methods", "tome,divprune", "--task"]
    bench += ["features", "--repeats", "1", "--out", str(tmp_path / "res"), "--run", "cal", "--no-viz", "--calibrated"]
    res = CliRunner().invoke(app, bench)
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (tmp_path / "res" / "cal" / "results.jsonl").read_text().splitlines()]
    cal = {r["method"]: r for r in rows if r["method"].endswith("+cal")}
    assert set(cal) == {"tome+cal", "divprune+cal"}
    for r in cal.values():
        m = r["metrics"]
        assert m["calibration_images"] == 2 and m["calibration_s"] > 0
        assert m["calibration_fidelity"] >= m["calibration_default_fidelity"] - 1e-9
        assert CalibratedSchedule.from_dict(m["calibrated_schedule"]).flops_target == 0.8
