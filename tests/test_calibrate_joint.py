"""Joint calibration of ``resize-tome``: input size x merge schedule, scored on calibration images; the schedule
records the input share and the per-layer r, apply(schedule=) honours both, and JSON round-trips."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

import tokenthin
from test_calibrate import _dinov2, _pixels  # the same tiny DINOv2 and calibration pixels
from tokenthin.calibration import CalibratedSchedule, calibrate
from tokenthin.calibration.joint import joint_candidates

LAYERS = 6


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return _dinov2(LAYERS)


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return _pixels(4, 11)


@pytest.fixture(scope="module")
def sched(model: torch.nn.Module, calib: torch.Tensor) -> CalibratedSchedule:
    return calibrate(model, "resize-tome", flops=0.3, images=calib, objective="cls", progress=False)


def _out(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=x).pooler_output


def _setup(model: torch.nn.Module):
    from tokenthin.adapters.registry import find_adapter
    from tokenthin.budget import flops_fraction
    from tokenthin.methods.downsample import scaled_size

    a = find_adapter(model)
    grid = (8, 8)

    def input_patches(f: float) -> int:
        hh, ww = scaled_size(32, 32, 4, f)
        return (hh // 4) * (ww // 4)

    def flops_of(s) -> float:
        f = s.input_fraction
        return flops_fraction(s, a.dims, grid, None if f is None else input_patches(f))

    return input_patches, flops_of


@pytest.mark.parametrize("target", [0.3, 0.5])
def test_candidates_span_sizes_and_include_plain_downsampling(model, target: float) -> None:
    input_patches, flops_of = _setup(model)
    cands = joint_candidates(target, 64, LAYERS, input_patches, flops_of)
    plain = [s for s in cands if not any(s.r or ()) and s.input_keep is not None]
    merged = [s for s in cands if any(s.r or ())]
    assert len(plain) == 1 and flops_of(plain[0]) <= target + 1e-3
    assert len({s.input_keep for s in merged}) >= 2  # several input sizes, each with its own merge schedule
    assert all(target - 0.01 <= flops_of(s) <= target + 1e-3 for s in merged)
    # the plain candidate is the largest smaller size meeting the target alone
    assert all(flops_of(dataclasses.replace(s, r=(0,) * (LAYERS - 1))) > target + 1e-3 for s in merged)


def test_calibrated_schedule_records_size_and_r_and_round_trips(sched: CalibratedSchedule, tmp_path) -> None:
    assert sched.method == "resize-tome" and sched.search == "joint" and sched.site == "layers"
    assert sched.flops <= 0.3 + 1e-3 and sched.input_keep is not None  # this model's best is a smaller image
    assert sched.resized_patches == sched.input_patches < 64
    assert sched.baseline_fidelity is None or sched.fidelity >= sched.baseline_fidelity - 1e-9
    back = CalibratedSchedule.load(sched.save(tmp_path / "rt.json"))
    assert back == sched and json.loads((tmp_path / "rt.json").read_text())["version"] == 2
    assert back.for_grid(back.grid) == sched.for_grid(sched.grid)
    assert back.for_grid(back.grid).input_keep == sched.input_keep


def test_apply_with_the_schedule_reproduces_the_calibrated_candidate(model, calib, sched, tmp_path) -> None:
    ref = _out(model, calib)
    tokenthin.apply(model, "resize-tome", schedule=sched.save(tmp_path / "s.json"))
    try:
        cos = F.cosine_similarity(_out(model, calib), ref, dim=-1).mean().item()
        first = tokenthin.info(model).tokens_per_layer[0]
    finally:
        tokenthin.remove(model)
    assert cos == pytest.approx(sched.fidelity, abs=1e-6)
    assert first == 1 + sched.input_patches


def test_a_resized_schedule_resizes_like_downsample(model, calib) -> None:
    """The plain-downsampling candidate as a schedule: resize-tome with it equals the downsample baseline."""
    input_patches, flops_of = _setup(model)
    plain = next(s for s in joint_candidates(0.3, 64, LAYERS, input_patches, flops_of) if not any(s.r or ()))
    cs = CalibratedSchedule(
        method="resize-tome",
        site="layers",
        num_layers=LAYERS,
        grid=(8, 8),
        protected=1,
        flops_target=0.3,
        flops=flops_of(plain),
        objective="cls",
        fidelity=0.0,
        search="joint",
        r=plain.r,
        input_keep=plain.input_keep,
        resized_patches=input_patches(plain.input_keep),
    )
    with tokenthin.applied(model, "resize-tome", schedule=cs):
        got = _out(model, calib)
        x = calib[[2, 0]]
        batch, singles = _out(model, x), torch.cat([_out(model, x[i : i + 1]) for i in range(2)])
    with tokenthin.applied(model, "downsample", keep=plain.input_keep):
        want = _out(model, calib)
    assert (got - want).abs().max() <= 1e-5
    assert (batch - singles).abs().max() <= 1e-5


def test_other_input_sizes_resize_to_the_same_share(model, sched: CalibratedSchedule) -> None:
    big = _pixels(2, 5, size=48)  # a 12 x 12 grid
    with tokenthin.applied(model, "resize-tome", schedule=sched):
        _out(model, big)
        first = tokenthin.info(model).tokens_per_layer[0]
    assert first == 1 + sched.resized((12, 12)) < 1 + 144


def test_flops_one_is_identity(model, calib) -> None:
    s = calibrate(model, "resize-tome", flops=1.0, images=calib, objective="cls", progress=False)
    assert s.input_keep is None and not any(s.r or ())
    ref = _out(model, calib)
    with tokenthin.applied(model, "resize-tome", schedule=s):
        assert (_out(model, calib) - ref).abs().max() <= 1e-5


def test_version_1_files_still_load(sched: CalibratedSchedule) -> None:
    d = {k: v for k, v in sched.to_dict().items() if k not in ("input_keep", "resized_patches")}
    old = CalibratedSchedule.from_dict({**d, "version": 1, "method": "tome", "r": [0] * (LAYERS - 1)})
    assert old.input_keep is None and old.version == 2
