"""The diffusion bench task: SSIM / PSNR, rows with resume on a tiny random terrain UNet, and (real) the CLI run on
the real terrain consistency UNet with 2 samples."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokenthin.bench import diffusion as D
from tokenthin.bench.store import ResultStore

pytest.importorskip("diffusers")


def restated_ssim(a, b, data_range: float = 2.0):
    """scikit-image's structural_similarity (gaussian_weights=True, sigma=1.5, use_sample_covariance=False),
    restated with scipy's gaussian_filter (truncate 3.5: 11 taps) and its border crop."""
    ndimage = pytest.importorskip("scipy.ndimage")

    def f(t):
        return ndimage.gaussian_filter(t, sigma=1.5, truncate=3.5, mode="reflect")

    a, b = a.astype("float64"), b.astype("float64")
    ux, uy = f(a), f(b)
    vx, vy, vxy = f(a * a) - ux * ux, f(b * b) - uy * uy, f(a * b) - ux * uy
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return s[5:-5, 5:-5].mean()


def test_ssim_matches_the_restatement_and_psnr_is_exact() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 1, 40, 36, generator=g) * 2 - 1
    b = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    got = D.ssim(a, b)
    for i in range(3):
        assert abs(float(got[i]) - restated_ssim(a[i, 0].numpy(), b[i, 0].numpy())) < 1e-10
    assert torch.allclose(D.ssim(a, a), torch.ones(3, dtype=torch.float64)) and bool((got < 0.9).all())
    mse = float(((a - b) ** 2).mean(dim=(1, 2, 3))[0])
    assert abs(float(D.psnr(a, b)[0]) - 10 * torch.log10(torch.tensor(4.0 / mse)).item()) < 1e-4
    try:  # scikit-image itself where it imports (its wheel needs lazy_loader)
        from skimage.metrics import structural_similarity
    except ImportError:
        return
    ref = structural_similarity(
        a[0, 0].numpy(), b[0, 0].numpy(), gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=2
    )
    assert abs(float(got[0]) - ref) < 1e-6


def tiny_denoiser():
    from tokenthin.models.terrain import build_denoiser, unet_config

    cfg = unet_config()
    cfg.update(
        block_out_channels=(32, 32, 32),
        layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
    )
    torch.manual_seed(0)
    return build_denoiser(cfg).eval()  # attention at 32 x 32 = 1024 tokens (and 16 x 16 in the mid block)


def test_rows_resume_and_plots_on_a_tiny_terrain_unet(tmp_path: Path) -> None:
    den = tiny_denoiser()
    store = ResultStore(tmp_path / "results.jsonl")
    kw = dict(ratios=(0.5,), n_samples=2, repeats=1, store=store, denoiser=den, progress=False)
    rows = D.run_diffusion_bench(["tomesd"], **kw)
    assert [r["method"] for r in rows] == ["none", "tomesd", "random", "pool"]
    for r in rows[1:]:
        assert 0 < r["ssim"] < 1 and r["psnr"] > 0 and r["time_ratio"] > 0 and r["merged"] > 0, r
        assert r["memory_ratio"] > 0 and 0 <= r["own_share"] < 1 and r["cpu_time_ratio"] > 0
    assert len(store.rows()) == 4
    again = D.run_diffusion_bench(["tomesd"], **kw)  # resumed: nothing recomputed, nothing appended
    assert len(store.rows()) == 4 and [r["ssim"] for r in again] == [r["ssim"] for r in rows]
    table = D.format_diffusion_table(rows)
    assert "| tomesd | 0.50 |" in table and "| none | 0.00 | inf |" in table
    D.plot_psnr_vs_time(rows, tmp_path / "p.png")
    D.plot_outputs(D.side_by_side(["tomesd"], 0.5, 2, 0, den), tmp_path / "o.png", "t")
    assert (tmp_path / "p.png").stat().st_size > 1000 and (tmp_path / "o.png").stat().st_size > 1000


@pytest.mark.real
def test_cli_diffusion_task_on_the_real_terrain_unet(tmp_path: Path) -> None:
    from tokenthin.bench.main import run_bench
    from tokenthin.models.terrain import TerrainMissingError, onnx_path

    try:
        onnx_path()
    except TerrainMissingError as exc:
        pytest.skip(str(exc))
    kw = dict(model="", batch_size=1, images=1, images_dir="", knn_train=1, knn_test=1, image_size=224, viz=False)
    out = run_bench(
        tasks="diffusion", methods="tomesd", budgets="0.5", repeats=1, out=str(tmp_path), run="t", resume=False,
        seed=0, samples=2, **kw,
    )  # fmt: skip
    rows = ResultStore(out / "results.jsonl").rows()
    tomesd = next(r for r in rows if r["method"] == "tomesd")
    assert tomesd["merged"] == 9 * 512 and 0.5 < tomesd["ssim"] < 1 and tomesd["psnr"] > 15
    for f in ("summary.md", "diffusion.md", "psnr_vs_time.png", "terrain_ratio0.5.png"):
        assert (out / f).is_file()
