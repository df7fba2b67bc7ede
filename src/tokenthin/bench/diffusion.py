"""Diffusion bench on real weights: adaptive-terrain-diffusion's consistency UNet (:mod:`tokenthin.models.terrain`).

The model turns noise into a 128 x 128 heightfield in one step, so its output is the generated sample: the
unreduced output of each of ``n_samples`` inputs (the package's own sampler inputs, :func:`terrain_inputs`: its
noise at ``sigma = 80`` and random difficulty levels, seeded) is the reference, and each method x ratio is scored
by the PSNR and SSIM of its output against it (on the [-1, 1] heightfields, data range 2; SSIM with an 11-tap
gaussian window, sigma 1.5, Wang et al.'s constants, averaged over the valid window positions and the samples).
Cost, measured in the same run: the per-call time ratio reduced / unreduced (alternating runs,
:func:`~tokenthin.bench.timing.alternate`), the peak-memory ratio of one call and tokenthin's own share of it.

Methods: every registered method made for denoisers (``runtimes`` include ``"denoiser"``) and the ``random`` and
``pool`` baselines (``keep = 1 - ratio``), on ``.unet`` (the ``UNet2DModel`` host) with their default blocks
(tomesd: ``max_downsample=1``, the 9 attention layers at 32 x 32 = 1024 tokens). Rows go to a
:class:`~tokenthin.bench.store.ResultStore` as they are made (``resume`` skips stored ones).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import TokenThinError
from .store import ResultStore, config_key
from .timing import alternate, memory_and_own

BASELINES = ("random", "pool")
DATA_RANGE = 2.0  # outputs in [-1, 1]


def denoiser_methods() -> list[str]:
    """Every registered method made for denoisers."""
    from ..methods.base import all_methods

    return [name for name, cls in all_methods().items() if "denoiser" in cls.runtimes]


def budget(method: str, ratio: float) -> dict[str, float]:
    """The apply() budget removing ``ratio`` of each block's tokens: ``ratio=`` for a method with that parameter
    (tomesd), ToDo's ``downsample_factor`` f where 1 - 1/f**2 is that ratio (0.75, 0.89, ...), else
    ``keep = 1 - ratio``; a ratio the method cannot take raises :class:`TokenThinError`."""
    from ..methods.base import all_methods

    params = all_methods()[method].params
    if "ratio" in params:
        return {"ratio": ratio}
    if "downsample_factor" in params:  # ToDo: its factor is the budget
        f = round((1.0 / (1.0 - ratio)) ** 0.5)
        if f < 2 or abs(1.0 - 1.0 / f**2 - ratio) > 0.01:
            raise TokenThinError(f"'{method}' removes 1 - 1/f^2 of the keys (0.75, 0.89, ...), not {ratio}")
        return {"downsample_factor": f}
    return {"keep": 1.0 - ratio}


def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = DATA_RANGE, size: int = 11, sigma: float = 1.5):
    """(B,) mean SSIM of (B, C, H, W) images: gaussian window (``size`` taps, ``sigma``), K1 0.01, K2 0.03,
    population covariances, averaged over the valid window positions (scikit-image's ``structural_similarity``
    with ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False``, whose mean crops the border)."""
    a, b = a.double(), b.double()
    g = _gaussian(size, sigma)
    c = a.shape[1]
    wy, wx = g.view(1, 1, size, 1).expand(c, 1, size, 1), g.view(1, 1, 1, size).expand(c, 1, 1, size)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, wy, groups=c), wx, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = DATA_RANGE) -> torch.Tensor:
    """(B,) PSNR in dB (inf where identical)."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def run_diffusion_bench(
    methods: Sequence[str] | None = None,
    ratios: Sequence[float] = (0.25, 0.5, 0.75),
    n_samples: int = 16,
    repeats: int = 3,
    seed: int = 0,
    store: ResultStore | None = None,
    denoiser: Any = None,
    baselines: bool = True,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One row per (method, ratio) after a ``none`` row: ``psnr`` / ``ssim`` (mean over samples, vs the unreduced
    output; ``psnr_min`` / ``ssim_min`` the worst sample), ``time_ratio``, ``memory_ratio``, ``own_share`` and
    ``merged`` (tokens merged away per call, all blocks, one sample). ``denoiser``: a
    :class:`~tokenthin.models.terrain.TerrainDenoiser` (default: the real one, :func:`load_terrain`). A method that
    cannot run gets a row with an ``"error"``. With a ``store``, rows already in it are skipped (resume)."""
    from .. import api
    from ..errors import TokenThinError
    from ..models.terrain import load_terrain, terrain_inputs

    model = load_terrain() if denoiser is None else denoiser
    x = terrain_inputs(n_samples, seed)

    def call() -> torch.Tensor:
        with torch.inference_mode():
            return model(x.noisy, x.sigma, x.difficulty)

    names = list(methods) if methods is not None else denoiser_methods()
    if baselines:
        names = list(dict.fromkeys([*names, *BASELINES]))
    base = {"task": "diffusion", "model": "terrain-consistency-unet", "samples": n_samples, "seed": seed}
    full = call()
    rows: list[dict[str, Any]] = []
    todo = [("none", 1.0)] + [(n, r) for n in names for r in ratios]
    for name, ratio in tqdm(todo, desc="diffusion", unit="config", disable=not progress):
        cfg = {**base, "method": name, "ratio": ratio if name != "none" else 0.0, "repeats": repeats}
        key = config_key(cfg)
        if store is not None and store.has(key):
            rows.append(next(r for r in store.rows() if r.get("key") == key))
            continue
        row: dict[str, Any] = {**cfg, "key": key}
        if name == "none":
            row.update(psnr=None, ssim=1.0, time_ratio=1.0, cpu_time_ratio=1.0, memory_ratio=1.0, own_share=0.0)
            row["merged"] = 0
        else:
            try:
                api.apply(model.unet, name, **budget(name, ratio))
            except TokenThinError as exc:
                row["error"] = str(exc).split(";")[0]
            else:
                rt = api.runtime_of(model.unet)
                try:
                    out = call()
                    merged = sum(api.info(model.unet).merged)  # per sample, over the call's blocks
                    cpu: dict[bool, list[float]] = {}
                    t = alternate(rt, repeats, (call,), cpu=cpu)
                    mem, own = memory_and_own(rt, call)
                finally:
                    api.remove(model.unet)
                p, s = psnr(out, full), ssim(out, full)
                row.update(
                    psnr=float(p.clamp(max=1e9).mean()),
                    psnr_min=float(p.min()),
                    ssim=float(s.mean()),
                    ssim_min=float(s.min()),
                    time_ratio=t[True][0] / t[False][0],
                    # the calling thread's CPU time: the whole call's when torch runs one thread (OMP_NUM_THREADS=1)
                    cpu_time_ratio=cpu[True][0] / cpu[False][0],
                    threads=torch.get_num_threads(),
                    memory_ratio=mem,
                    own_share=own,
                    merged=merged,
                )
        if store is not None:
            store.append(row)
        rows.append(row)
    return rows


def format_diffusion_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`run_diffusion_bench` rows."""
    lines = [
        "| method | ratio | PSNR vs full (dB) | worst | SSIM vs full | worst | time ratio | CPU time ratio "
        "| peak memory | own time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['ratio']:.2f} | n/a: {r['error']} | | | | | | | |")
        elif r["method"] == "none":
            lines.append("| none | 0.00 | inf | | 1.000 | | 1.00 | 1.00 | 1.00 | - |")
        else:
            cpu = f"{r['cpu_time_ratio']:.2f}" if "cpu_time_ratio" in r else "-"  # rows stored before it existed
            lines.append(
                f"| {r['method']} | {r['ratio']:.2f} | {r['psnr']:.1f} | {r['psnr_min']:.1f} | {r['ssim']:.3f} | "
                f"{r['ssim_min']:.3f} | {r['time_ratio']:.2f} | {cpu} | {r['memory_ratio']:.2f} | "
                f"{100 * r['own_share']:.1f}% |"
            )
    return "\n".join(lines)


def plot_psnr_vs_time(rows: Sequence[dict[str, Any]], path: Any) -> None:
    """PSNR vs time ratio, one line per method across its ratios (labelled), written as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["method"] != "none" and "error" not in r and r.get("psnr") is not None and math.isfinite(r["psnr"]):
            by.setdefault(r["method"], []).append(r)
    cpu = all("cpu_time_ratio" in r for rs in by.values() for r in rs)  # steadier than wall time on a shared machine
    key = "cpu_time_ratio" if cpu else "time_ratio"
    for name, rs in by.items():
        rs = sorted(rs, key=lambda r: r["ratio"])
        style = {"linestyle": "--", "color": "grey" if name == "random" else "silver"} if name in BASELINES else {}
        ax.plot([r[key] for r in rs], [r["psnr"] for r in rs], marker="o", label=name, **style)
        for r in rs:
            ax.annotate(f"{r['ratio']:g}", (r[key], r["psnr"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
    ax.axvline(1.0, color="k", linewidth=0.6)
    ax.set_xlabel(f"{'one-thread CPU' if cpu else 'wall'} time per call, reduced / unreduced (lower is faster)")
    ax.set_ylabel("PSNR vs unreduced output (dB)")
    ax.set_title("terrain consistency UNet: fidelity vs time (labels: ratio merged)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_outputs(outputs: dict[str, torch.Tensor], path: Any, title: str) -> None:
    """A grid of heightfields: one row per entry of ``outputs`` ((S, 1, H, W) in [-1, 1]), one column per sample."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(outputs)
    s = next(iter(outputs.values())).shape[0]
    fig = Figure(figsize=(1.9 * s + 0.8, 1.9 * len(names) + 0.5))
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        for j in range(s):
            ax = fig.add_subplot(len(names), s, i * s + j + 1)
            ax.imshow(outputs[name][j, 0].float().numpy(), cmap="terrain", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def side_by_side(
    methods: Sequence[str], ratio: float = 0.5, n: int = 4, seed: int = 0, denoiser: Any = None
) -> dict[str, torch.Tensor]:
    """The first ``n`` samples' outputs unreduced (``"unreduced"``) and with each method at ``ratio``."""
    from .. import api
    from ..errors import TokenThinError
    from ..models.terrain import load_terrain, terrain_inputs

    model = load_terrain() if denoiser is None else denoiser
    x = terrain_inputs(n, seed)
    run: Callable[[], torch.Tensor] = lambda: model(x.noisy, x.sigma, x.difficulty)  # noqa: E731
    with torch.inference_mode():
        out = {"unreduced": run()}
        for m in methods:
            try:
                with api.applied(model.unet, m, **budget(m, ratio)):
                    out[f"{m} {ratio:g}"] = run()
            except TokenThinError:
                continue
    return out
