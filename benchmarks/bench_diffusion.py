"""Per-step denoiser cost of tokenthin's block-local methods on diffusion shapes (random weights; not a test).

For each shape (below), attention processor (diffusers' SDPA ``AttnProcessor2_0``, the default, and the eager
``AttnProcessor``), method (every registered method whose ``runtimes`` include ``"denoiser"``: tomesd today, the
others as they land) and ratio (the fraction of each merged block's tokens merged away; ``keep = 1 - ratio`` for a
method without a ``ratio`` parameter), one denoiser call (one sampling step, the CFG batch of 2 included) is timed:

* time ratio: reduced / unreduced, medians over ``--repeats`` rounds; each round runs the unreduced model and every
  configuration once, in an order rotated every round (drift hits all alike);
* peak memory: activation memory of one call (:mod:`tokenthin.bench.memory`: CUDA's allocator peak, on CPU every
  tensor storage made inside the call), reduced and unreduced, and their ratio;
* own share: tokenthin's planning, merging and unmerging as a share of the reduced call's time;
* ``time_ratio_from_modules``: 1 - (level-0 self-attention time saved) / unreduced step + own share, an
  estimate that needs only the merged modules' times (robust when other load on the machine makes whole-step times
  swing between rounds);
* level-0 self-attention share: the unreduced call's time inside the self-attention modules of the blocks tomesd
  merges by default (level 0): with only self-attention merged, the most a method can save (the ceiling).

Shapes (random weights, fixed seeds; ``--quick`` runs tiny versions of each, for the test):

* ``sd15``: SD-1.5's ``UNet2DConditionModel`` config at full width (320/640/1280/1280, 2 layers per block,
  cross-attention 768), 512 px (64 x 64 latent: 4096 tokens at level 0), 77 text tokens, batch 2;
* ``sdxl``: SDXL's config (320/640/1280, transformer depth 2 at 64 x 64 tokens, 10 at 32 x 32, cross-attention
  2048, text-time embeddings) at 1024 px (128 x 128 latent). CPU time: ``--sdxl-depth`` (default 2) replaces the
  depth 10 of the 32 x 32 level; the row also carries ``time_ratio_extrapolated``: the unmerged 32 x 32 transformer
  blocks' measured time scaled to depth 10 and added to both sides (they run the same with and without merging);
* ``dit``: DiT-XL/2 at 256 px (32 x 32 latent, patch 2: 256 tokens, width 1152, 16 heads), ``--dit-layers`` of 28;
* ``pixart``: PixArt-alpha at 512 px (64 x 64 latent, patch 2: 1024 tokens, width 1152, 120 T5 tokens of 4096),
  ``--dit-layers`` of 28. Every layer of a transformer sees the same tokens, so fewer layers leave the ratio nearly
  unchanged (the patch embedding and final layer weigh a little more).

A shape whose model no registered host takes (DiT / PixArt before their host lands) is skipped with a message,
and picked up with no edit here once ``tokenthin.hosts()`` has a host for it.

    PYTHONPATH=src python benchmarks/bench_diffusion.py [--shapes sd15,sdxl] [--methods tomesd] \
        [--ratios 0.25,0.5,0.75] [--processors sdpa,eager] [--repeats 3] [--threads 1] [--quick] \
        [--out results/diffusion]        # writes bench_diffusion.json and bench_diffusion.md there
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    import tokenthin
except ImportError:  # running from a checkout without PYTHONPATH=src
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import tokenthin

from tokenthin.adapters.registry import find_adapter
from tokenthin.bench.diffusion import budget
from tokenthin.bench.memory import peak_memory
from tokenthin.errors import TokenThinError
from tokenthin.methods.base import all_methods

Built = tuple[nn.Module, dict[str, Any], str]  # model, call kwargs, how it is scaled


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sd15(quick: bool, args: argparse.Namespace) -> Built:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    width, text, hw = ((16, 16, 32, 32), 32, 8) if quick else ((320, 640, 1280, 1280), 768, 64)
    unet = UNet2DConditionModel(
        sample_size=hw,
        block_out_channels=width,
        layers_per_block=1 if quick else 2,
        cross_attention_dim=text,
        attention_head_dim=8,
        norm_num_groups=8 if quick else 32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).eval()
    kw = {
        "sample": torch.randn(2, 4, hw, hw, generator=_g(1)),
        "timestep": torch.tensor([500.0, 500.0]),
        "encoder_hidden_states": torch.randn(2, 77, text, generator=_g(2)),
    }
    return unet, kw, "full model" if not quick else "tiny (quick)"


def sdxl(quick: bool, args: argparse.Namespace) -> Built:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    depth = args.sdxl_depth
    width, text, hw, heads = ((16, 32, 32), 32, 16, (2, 2, 4)) if quick else ((320, 640, 1280), 2048, 128, (5, 10, 20))
    unet = UNet2DConditionModel(
        sample_size=hw,
        block_out_channels=width,
        layers_per_block=1 if quick else 2,
        transformer_layers_per_block=(1, 2, depth),
        cross_attention_dim=text,
        attention_head_dim=heads,
        norm_num_groups=8 if quick else 32,
        use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time",
        addition_time_embed_dim=8 if quick else 256,
        projection_class_embeddings_input_dim=(6 * 8 + text) if quick else 2816,
    ).eval()
    kw = {
        "sample": torch.randn(2, 4, hw, hw, generator=_g(1)),
        "timestep": torch.tensor([500.0, 500.0]),
        "encoder_hidden_states": torch.randn(2, 77, text, generator=_g(2)),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(2, text if quick else 1280, generator=_g(3)),
            "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * 2),
        },
    }
    return unet, kw, f"transformer depth {depth} of 10 at 32x32 tokens" + (" (quick)" if quick else "")


def dit(quick: bool, args: argparse.Namespace) -> Built:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    layers, heads, dim, hw = (2, 2, 8, 8) if quick else (args.dit_layers, 16, 72, 32)
    model = DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=dim, in_channels=4, num_layers=layers, sample_size=hw
    ).eval()
    kw = {
        "hidden_states": torch.randn(2, 4, hw, hw, generator=_g(1)),
        "timestep": torch.tensor([500, 500]),
        "class_labels": torch.tensor([1, 1000]),  # cond + the null class (CFG)
    }
    return model, kw, f"{layers} of 28 layers"


def pixart(quick: bool, args: argparse.Namespace) -> Built:
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    layers, heads, dim, hw, cap = (2, 2, 8, 8, 32) if quick else (args.dit_layers, 16, 72, 64, 4096)
    model = PixArtTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=dim,
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        cross_attention_dim=heads * dim,
        sample_size=hw,
        caption_channels=cap,
        use_additional_conditions=False,
    ).eval()
    kw = {
        "hidden_states": torch.randn(2, 4, hw, hw, generator=_g(1)),
        "encoder_hidden_states": torch.randn(2, 120, cap, generator=_g(2)),
        "timestep": torch.tensor([500, 500]),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }
    return model, kw, f"{layers} of 28 layers"


SHAPES: dict[str, tuple[str, Callable[[bool, argparse.Namespace], Built]]] = {
    "sd15": ("SD-1.5 512 px (64x64 latent), batch 2", sd15),
    "sdxl": ("SDXL 1024 px (128x128 latent), batch 2", sdxl),
    "dit": ("DiT-XL/2 256 px (32x32 latent), batch 2", dit),
    "pixart": ("PixArt-alpha 512 px (64x64 latent), batch 2", pixart),
}


def _takes(method: str, ratio: float) -> bool:
    try:
        budget(method, ratio)
    except TokenThinError:
        return False
    return True


def denoiser_methods() -> list[str]:
    """Every registered method made for denoisers (``runtimes`` include ``"denoiser"``)."""
    return [name for name, cls in all_methods().items() if "denoiser" in cls.runtimes]


def set_processors(model: nn.Module, kind: str) -> int:
    """Switch every diffusers ``Attention`` on SDPA's processor to the eager one (or back); returns how many."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    n = 0
    for m in model.modules():
        if isinstance(m, Attention) and isinstance(m.processor, (AttnProcessor, AttnProcessor2_0)):
            m.set_processor(AttnProcessor2_0() if kind == "sdpa" else AttnProcessor())
            n += 1
    return n


def _timer(blocks: list[nn.Module], acc: list[float]) -> list[Any]:
    """Hooks adding the wall time of every call of ``blocks`` to ``acc[0]``."""
    start: list[float] = [0.0]

    def pre(*_: Any) -> None:
        start[0] = time.perf_counter()

    def post(*_: Any) -> None:
        acc[0] += time.perf_counter() - start[0]

    return [h for b in blocks for h in (b.register_forward_pre_hook(pre), b.register_forward_hook(post))]


def measure(
    model: nn.Module,
    kw: dict[str, Any],
    configs: list[tuple[str, float]],
    repeats: int,
    slow: list[nn.Module],
    attn: list[nn.Module],
):
    """Interleaved per-call times (unreduced and each config), then peak memory and own share of each config."""

    def call() -> None:
        with torch.inference_mode():
            model(**kw)

    def one(cfg: tuple[str, float] | None) -> tuple[float, float, float]:
        acc, att = [0.0], [0.0]
        hooks = _timer(slow, acc) + _timer(attn, att)
        try:
            if cfg is not None:
                tokenthin.apply(model, cfg[0], **budget(*cfg))
            t0 = time.perf_counter()
            call()
            dt = time.perf_counter() - t0
        finally:
            if cfg is not None:
                tokenthin.remove(model)
            for h in hooks:
                h.remove()
        return dt, acc[0], att[0]

    order: list[tuple[str, float] | None] = [None, *configs]
    for cfg in order:  # warm-up
        one(cfg)
    times: dict[Any, list[tuple[float, float, float]]] = {c: [] for c in order}
    for r in range(repeats):
        k = r % len(order)
        for cfg in order[k:] + order[:k]:
            times[cfg].append(one(cfg))
    with peak_memory(torch.device("cpu")) as m:
        call()
    full_mb = m["mb"] or 0.0
    out = []
    med = {c: tuple(statistics.median(t[j] for t in v) for j in range(3)) for c, v in times.items()}
    for cfg in configs:
        tokenthin.apply(model, cfg[0], **budget(*cfg))
        rt = tokenthin.api.runtime_of(model)
        try:
            rt.measure, rt.overhead_s = True, 0.0
            with peak_memory(torch.device("cpu")) as m:
                t0 = time.perf_counter()
                call()
                dt = time.perf_counter() - t0
            info = tokenthin.info(model)
            merged = sum(info.merged)
        finally:
            tokenthin.remove(model)
        out.append(
            {
                "method": cfg[0],
                "ratio": cfg[1],
                "time_full_s": med[None][0],
                "time_reduced_s": med[cfg][0],
                "time_ratio": med[cfg][0] / med[None][0],
                "round_ratios": [a[0] / b[0] for a, b in zip(times[cfg], times[None], strict=True)],
                "unmerged_blocks_s": (med[None][1], med[cfg][1]),
                # the self-attention modules of the blocks tomesd merges by default (level 0), unreduced and reduced
                "level0_attention_s": (med[None][2], med[cfg][2]),
                "level0_attention_share": med[None][2] / med[None][0],
                # a noise-robust estimate: the step minus what the merged modules saved, plus tokenthin's own time
                "time_ratio_from_modules": 1 - (med[None][2] - med[cfg][2]) / med[None][0] + rt.overhead_s / dt,
                "peak_full_mb": full_mb,
                "peak_reduced_mb": m["mb"] or 0.0,
                "memory_ratio": (m["mb"] or 0.0) / max(full_mb, 1e-9),
                "own_share": rt.overhead_s / dt,
                "merged_tokens": merged,
            }
        )
    return out


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m] or denoiser_methods()
    ratios = [float(r) for r in args.ratios.split(",")]
    rows: list[dict[str, Any]] = []
    for shape in [s for s in args.shapes.split(",") if s]:
        title, builder = SHAPES[shape]
        model, kw, scaled = builder(args.quick, args)
        try:
            adapter = find_adapter(model)
        except TokenThinError as e:
            print(f"{shape}: skipped, no registered host takes {type(model).__name__} ({e})", flush=True)
            rows.append({"shape": shape, "title": title, "skipped": f"no host for {type(model).__name__}"})
            continue
        usable = [m for m in methods if tokenthin.support(m, adapter.name) is None]
        for m in sorted(set(methods) - set(usable)):
            print(f"{shape}: {m} skipped ({tokenthin.support(m, adapter.name)})", flush=True)
        slow = [b.module for b in adapter.blocks if b.level >= 1] if shape == "sdxl" else []
        attn = [b.parts["attn"].attention for b in adapter.blocks if b.level == 0 and "attn" in b.parts]
        attn = [m for m in attn if m is not None]
        for proc in [p for p in args.processors.split(",") if p]:
            set_processors(model, proc)
            configs = [(m, r) for m in usable for r in (ratios if proc == "sdpa" else args.eager_ratios or ratios)]
            configs = [c for c in configs if _takes(*c)]  # ToDo: only the ratios its factor gives
            print(f"{shape} / {proc}: {len(configs)} configurations x {args.repeats} rounds ...", flush=True)
            for row in measure(model, kw, configs, args.repeats, slow, attn):
                row.update(shape=shape, title=title, processor=proc, scaled=scaled)
                if slow:  # SDXL: level 1 (32x32 tokens, never merged at max_downsample=1) scaled to depth 10
                    k = 10 / args.sdxl_depth - 1
                    full, red = (
                        t + k * s for t, s in zip((row["time_full_s"], row["time_reduced_s"]), row["unmerged_blocks_s"])
                    )
                    row["time_ratio_extrapolated"] = red / full
                rows.append(row)
                print(format_row(row), flush=True)
        del model
    return rows


def format_row(r: dict[str, Any]) -> str:
    if "skipped" in r:
        return f"| {r['title']} | - | - | - | skipped: {r['skipped']} | | | | | |"
    ext = f" ({r['time_ratio_extrapolated']:.2f} extrapolated)" if "time_ratio_extrapolated" in r else ""
    return (
        f"| {r['title']} | {r['processor']} | {r['method']} | {r['ratio']:.2f} | {r['time_ratio']:.2f}{ext} | "
        f"{r['time_full_s']:.2f} s | {1 / r['time_ratio']:.2f}x | {r['memory_ratio']:.2f} "
        f"({r['peak_full_mb']:.0f} MB full) | {100 * r['own_share']:.1f}% | {100 * r['level0_attention_share']:.0f}% |"
    )


def table(rows: list[dict[str, Any]]) -> str:
    head = "| shape | attention | method | ratio | time ratio | full step | speed-up | peak memory ratio | own time |"
    head += " level-0 self-attention share |"
    return "\n".join([head, "|---|---|---|---|---|---|---|---|---|---|", *(format_row(r) for r in rows)])


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="sd15,sdxl,dit,pixart", help=f"comma-separated: {', '.join(SHAPES)}")
    p.add_argument("--methods", default="", help="comma-separated (default: every method made for denoisers)")
    p.add_argument("--ratios", default="0.25,0.5,0.75")
    p.add_argument("--eager-ratios", default="", help="ratios for the eager processor (default: --ratios)")
    p.add_argument("--processors", default="sdpa,eager", help="sdpa, eager or both")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (medians)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--sdxl-depth", type=int, default=2, help="transformer depth at SDXL's 32x32 level (real: 10)")
    p.add_argument("--dit-layers", type=int, default=4, help="DiT / PixArt layers (real: 28)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 1 round (a smoke test)")
    p.add_argument("--out", default="results/diffusion")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = 1
    args.eager_ratios = [float(r) for r in args.eager_ratios.split(",")] if args.eager_ratios else None
    rows = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "argv": sys.argv[1:] if argv is None else argv,
    }
    (out / "bench_diffusion.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = table(rows)
    (out / "bench_diffusion.md").write_text(md + "\n")
    print(md)
    return rows


if __name__ == "__main__":
    main()
