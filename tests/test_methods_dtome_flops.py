"""DToMe with ``flops=``: the thresholds are fitted so that the FLOPs they realise on the calibration images meet the
target (see the dtome docstring); the ``r=`` path stays the official calibration."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tokenthin

IMAGE, PATCH, LAYERS = 56, 8, 6


def build(seed: int = 0) -> nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    cfg = Dinov2Config(
        hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, mlp_ratio=2, image_size=IMAGE, patch_size=PATCH
    )
    return Dinov2Model(cfg).eval()


@pytest.fixture
def calib() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, IMAGE, IMAGE, generator=g)
    smooth = torch.nn.functional.avg_pool2d(x, 7, 1, 3)  # smoother images: more similar neighbours
    return torch.cat([x, smooth])


def realised(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        model(pixel_values=x)
    f = tokenthin.info(model).flops_fraction
    assert f is not None
    return f


@pytest.mark.parametrize("target", [0.45, 0.6, 0.8])
def test_realised_flops_meet_the_target_on_the_calibration_images(calib: torch.Tensor, target: float) -> None:
    model = build()
    tokenthin.apply(model, "dtome", flops=target, calibration=calib)
    got = realised(model, calib)
    assert target - 0.01 <= got <= target + 1e-9
    cal = tokenthin.explain(model)["applied"]["calibration"]
    assert cal["flops_target"] == target
    assert cal["flops_realised_calibration"] == pytest.approx(got, abs=1e-12)
    info = tokenthin.info(model)
    per = info.sample_flops
    assert per is not None and len(per) == calib.shape[0] and len(set(per)) > 1  # images keep different counts
    # the padded batch computes every image at the largest image's counts: more than any one image
    assert info.batch_flops_fraction is not None and info.batch_flops_fraction >= max(per) > got


@pytest.mark.parametrize("target", [0.3, 0.52, 0.9])
def test_fit_bisects_one_shared_offset(target: float) -> None:
    """A made-up realised-FLOPs curve (rising with the offset, flat at the ends): the fit lands just below target."""
    from tokenthin.methods.dtome import DToMe

    m = DToMe()
    curve = lambda: min(1.0, max(0.2, 0.55 + 0.4 * m.offset))  # noqa: E731
    m.fit_flops(target, curve)
    assert target - DToMe.FIT_TOL <= m.flops_realised <= target
    assert m.flops_realised == curve()
    with pytest.raises(tokenthin.BudgetError, match="unreachable"):
        m.fit_flops(0.1, curve)


def test_r_path_is_the_official_calibration(calib: torch.Tensor) -> None:
    model = build()
    tokenthin.apply(model, "dtome", r=4, calibration=calib)
    m = tokenthin.runtime_of(model).method
    assert m.offset == 0.0 and m.flops_target is None and m.flops_realised is None


def test_batch_equals_singles_after_the_fit(calib: torch.Tensor) -> None:
    model = build()
    tokenthin.apply(model, "dtome", flops=0.5, calibration=calib)
    x = calib[[0, 7, 2]]
    with torch.no_grad():
        out = model(pixel_values=x).pooler_output
        singles = torch.cat([model(pixel_values=x[i : i + 1]).pooler_output for i in range(3)])
    assert (out - singles).abs().max() <= 1e-5


def test_flops_one_is_identity(calib: torch.Tensor) -> None:
    model = build()
    with torch.no_grad():
        ref = model(pixel_values=calib).last_hidden_state
    tokenthin.apply(model, "dtome", flops=1.0, calibration=calib)
    with torch.no_grad():
        got = model(pixel_values=calib).last_hidden_state
    assert got.shape == ref.shape and (got - ref).abs().max() <= 1e-5
    assert realised(model, calib) == pytest.approx(1.0)


def test_info_flops_match_the_plan_for_fixed_counts(calib: torch.Tensor) -> None:
    model = build()
    tokenthin.apply(model, "tome", flops=0.5)
    got = realised(model, calib)
    assert got == pytest.approx(tokenthin.explain(model)["applied"]["flops_fraction"], abs=1e-9)


def test_batch_flops_equal_the_mean_for_a_fixed_count_method(calib: torch.Tensor) -> None:
    model = build()
    tokenthin.apply(model, "tome", flops=0.6)
    got = realised(model, calib)
    assert tokenthin.info(model).batch_flops_fraction == pytest.approx(got, abs=1e-12)
