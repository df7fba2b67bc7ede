"""Where an SD-1.5-shaped denoiser step spends its time, unreduced and reduced (random weights; not a test).

One process, one torch thread, every configuration run in interleaved rounds (the order rotated every round).
Each call is timed twice: wall clock and ``time.thread_time`` (the CPU time of the calling thread; with one torch
thread every op runs on it, so other jobs on a shared machine distort it far less than the wall clock). Every
call is also split by forward hooks (thread time, inclusive) into:

* ``transformer L<k>``: the ``Transformer2DModel`` s at level k (0: 64 x 64 = 4096 tokens at 512 px, C 320;
  1: 32 x 32, C 640; 2: 16 x 16, C 1280; 3 has none on SD-1.5), and inside the level-0 ones ``attn1`` (self-attention,
  the merge included), ``attn2`` (cross-attention), ``ff`` (feed-forward);
* ``resnets L<k>``: the ``ResnetBlock2D`` s at level k; ``samplers``: down / upsampling convolutions;
* ``other``: the rest (conv_in / conv_out, time embedding, norms outside blocks);
* tokenthin's own time (the runtime's ``overhead_by``): ``plan`` (the method's matching, once per block call),
  ``merge`` and ``unmerge`` (per merged part).

From the unreduced split it prints the Amdahl bound of each level set: the step's speed-up if those levels'
transformer blocks cost nothing, and if their token cost scaled perfectly with ``1 - ratio``.

    PYTHONPATH=src python benchmarks/profile_diffusion.py [--configs "tomesd:ratio=0.5;tomesd:ratio=0.5,merge_mlp=1"]
        [--rounds 3] [--hw 64] [--layers 2] [--processor sdpa] [--out results/diffusion/profile.json]

A config is ``method:key=value,...`` (ints, floats, booleans as 0/1; ``ratio`` / ``keep`` / ``downsample_factor``
are budgets as in ``tokenthin.apply``). ``--layers 1`` halves the UNet (1 ResNet + transformer per down level) for
a quicker run; ``--hw 32`` a 256 px latent.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    import tokenthin
except ImportError:  # running from a checkout without PYTHONPATH=src
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import tokenthin

Config = tuple[str, dict[str, Any]]


def build_sd15(hw: int, layers: int) -> tuple[nn.Module, dict[str, Any]]:
    """SD-1.5's UNet config at full width (random weights), ``layers`` per down block, an ``hw`` latent, batch 2."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=hw,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=layers,
        cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).eval()
    g = torch.Generator().manual_seed(1)
    kw = {
        "sample": torch.randn(2, 4, hw, hw, generator=g),
        "timestep": torch.tensor([500.0, 500.0]),
        "encoder_hidden_states": torch.randn(2, 77, 768, generator=g),
    }
    return unet, kw


def parse_config(text: str) -> Config:
    method, _, rest = text.partition(":")
    kw: dict[str, Any] = {}
    for item in [s for s in rest.split(",") if s]:
        k, _, v = item.partition("=")
        if k.startswith("merge_") or k == "use_rand":
            kw[k] = bool(int(v))
        else:
            kw[k] = float(v) if "." in v else int(v)
    return method, kw


def label(cfg: Config | None) -> str:
    if cfg is None:
        return "none"
    return cfg[0] + (":" + ",".join(f"{k}={v}" for k, v in cfg[1].items()) if cfg[1] else "")


def categories(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """(category, module) pairs of an SD-1.5-layout ``UNet2DConditionModel``; levels by resolution."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    n = len(unet.down_blocks)
    groups = [(j, b) for j, b in enumerate(unet.down_blocks)] + [(n - 1, unet.mid_block)]
    groups += [(n - 1 - j, b) for j, b in enumerate(unet.up_blocks)]
    out: list[tuple[str, nn.Module]] = []
    for level, g in groups:
        for m in g.modules():
            if isinstance(m, Transformer2DModel):
                out.append((f"transformer L{level}", m))
            elif isinstance(m, ResnetBlock2D):
                out.append((f"resnets L{level}", m))
            elif isinstance(m, (Downsample2D, Upsample2D)):
                out.append(("samplers", m))
            elif level == 0 and isinstance(m, BasicTransformerBlock):
                out += [("L0 attn1", m.attn1), ("L0 attn2", m.attn2), ("L0 ff", m.ff)]
    return out


def _hooks(pairs: list[tuple[str, nn.Module]], acc: dict[str, float]) -> list[Any]:
    handles = []
    for cat, m in pairs:
        start: list[float] = [0.0]

        def pre(*_: Any, s: list[float] = start) -> None:
            s[0] = time.thread_time()

        def post(*_: Any, s: list[float] = start, c: str = cat) -> None:
            acc[c] = acc.get(c, 0.0) + time.thread_time() - s[0]

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    return handles


def one_call(unet: nn.Module, kw: dict[str, Any], cfg: Config | None, pairs) -> dict[str, Any]:
    """Time one denoiser call under ``cfg`` (hooks first, so a module's time includes tokenthin's merge before it
    and excludes the unmerge after it; tokenthin's own split comes from the runtime)."""
    acc: dict[str, float] = {}
    handles = _hooks(pairs, acc)
    own: dict[str, float] = {}
    try:
        if cfg is not None:
            tokenthin.apply(unet, cfg[0], **cfg[1])
            rt = tokenthin.api.runtime_of(unet)
            rt.measure, rt.clock, rt.overhead_s, rt.overhead_by = True, time.thread_time, 0.0, {}
        w0, c0 = time.perf_counter(), time.thread_time()
        with torch.inference_mode():
            unet(**kw)
        wall, cpu = time.perf_counter() - w0, time.thread_time() - c0
        if cfg is not None:
            own = dict(rt.overhead_by)
            merged = sum(tokenthin.info(unet).merged)
    finally:
        if cfg is not None:
            tokenthin.remove(unet)
        for h in handles:
            h.remove()
    inner = sum(v for k, v in acc.items() if not k.startswith("L0 "))
    acc["other"] = cpu - inner  # plan, merge and unmerge run inside the transformer blocks
    return {"wall": wall, "cpu": cpu, "parts": acc, "own": own, "merged": merged if cfg is not None else 0}


def amdahl(parts: dict[str, float], total: float, ratio: float) -> list[dict[str, Any]]:
    """The step's speed-up bound when the transformer blocks of the first k levels cost 0, or ``1 - ratio``."""
    rows, acc = [], 0.0
    for k in range(4):
        t = parts.get(f"transformer L{k}", 0.0)
        if not t:
            continue
        acc += t
        rows.append(
            {
                "levels": f"0..{k}",
                "share": acc / total,
                "bound_free": total / (total - acc),
                "bound_scaled": total / (total - ratio * acc),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="tomesd:ratio=0.25;tomesd:ratio=0.5;tomesd:ratio=0.75")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--shape", default="sd15", help="sd15 (the split below), or dit / pixart (whole-call times only)")
    p.add_argument("--dit-layers", type=int, default=4, help="dit / pixart: layers of 28")
    p.add_argument("--hw", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--processor", default="sdpa", choices=("sdpa", "eager"))
    p.add_argument("--ratio", type=float, default=0.5, help="the ratio of the Amdahl 'scaled' bound")
    p.add_argument("--out", default="results/diffusion/profile.json")
    p.add_argument("--resummarize", default="", help="summarise the calls saved in this file again (no run)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.resummarize:
        unet, kw = nn.Identity(), {}
    elif args.shape == "sd15":
        unet, kw = build_sd15(args.hw, args.layers)
    else:  # the diffusion-transformer shapes of bench_diffusion.py
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_diffusion

        unet, kw, _ = bench_diffusion.SHAPES[args.shape][1](False, args)
    if args.processor == "eager" and not args.resummarize:
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
    configs: list[Config | None] = [None, *(parse_config(c) for c in args.configs.split(";") if c)]
    if args.resummarize:  # the calls of an earlier run (its .json or .partial.json), summarised again
        saved = json.loads(Path(args.resummarize).read_text())
        calls = saved.get("calls", saved)
        configs = [None if k == "none" else parse_config(k.replace("True", "1").replace("False", "0")) for k in calls]
        calls = {label(c): v for c, v in zip(configs, calls.values(), strict=True)}
        return summarize(calls, configs, args)
    pairs = categories(unet) if args.shape == "sd15" else []
    one_call(unet, kw, None, pairs)  # warm-up
    calls: dict[str, list[dict[str, Any]]] = {label(c): [] for c in configs}
    for r in range(args.rounds):
        k = r % len(configs)
        for cfg in configs[k:] + configs[:k]:
            res = one_call(unet, kw, cfg, pairs)
            calls[label(cfg)].append(res)
            print(f"round {r} {label(cfg)}: wall {res['wall']:.2f} s, cpu {res['cpu']:.2f} s", flush=True)
        if args.out:  # after every round: a run cut short keeps what it measured
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).with_suffix(".partial.json").write_text(json.dumps(calls))
    return summarize(calls, configs, args)


def summarize(calls: dict[str, list[dict[str, Any]]], configs: list[Config | None], args: argparse.Namespace):
    """Medians per config, the tables (printed) and the result file."""
    rounds = min(len(v) for v in calls.values())
    calls = {k: v[:rounds] for k, v in calls.items()}  # a run cut short: its whole rounds
    summary: dict[str, Any] = {}
    base = calls["none"]
    for name, cs in calls.items():
        cats = sorted({k for c in cs for k in c["parts"]})
        row = {
            "wall_s": statistics.median(c["wall"] for c in cs),
            "cpu_s": statistics.median(c["cpu"] for c in cs),
            "wall_ratio": statistics.median(c["wall"] / b["wall"] for c, b in zip(cs, base, strict=True)),
            "cpu_ratio": statistics.median(c["cpu"] / b["cpu"] for c, b in zip(cs, base, strict=True)),
            "wall_ratios": [c["wall"] / b["wall"] for c, b in zip(cs, base, strict=True)],
            "cpu_ratios": [c["cpu"] / b["cpu"] for c, b in zip(cs, base, strict=True)],
            "parts_s": {k: statistics.median(c["parts"].get(k, 0.0) for c in cs) for k in cats},
            "own_s": {k: statistics.median(c["own"].get(k, 0.0) for c in cs) for k in ("plan", "merge", "unmerge")},
            "merged": cs[0]["merged"],
        }
        summary[name] = row
    for name, row in summary.items():  # the estimate that needs only the merged levels' transformer times
        cfg = next(c for c in configs if label(c) == name)
        md = 1 if cfg is None else int(cfg[1].get("max_downsample", 1))
        merged = [f"transformer L{k}" for k in range(4) if 2**k <= md]
        full_t = sum(summary["none"]["parts_s"].get(k, 0.0) for k in merged)
        red_t = sum(row["parts_s"].get(k, 0.0) for k in merged)
        row["cpu_ratio_from_modules"] = 1 - (full_t - red_t) / summary["none"]["cpu_s"] if full_t else None
    full = summary["none"]
    bounds = amdahl(full["parts_s"], full["cpu_s"], args.ratio)
    print("\n| config | cpu s | cpu ratio (rounds) | from modules | wall ratio (rounds) | plan | merge | unmerge |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in summary.items():
        o = row["own_s"]
        cr = ", ".join(f"{v:.2f}" for v in row["cpu_ratios"])
        wr = ", ".join(f"{v:.2f}" for v in row["wall_ratios"])
        fm = "-" if row["cpu_ratio_from_modules"] is None else f"{row['cpu_ratio_from_modules']:.3f}"
        print(
            f"| {name} | {row['cpu_s']:.2f} | {row['cpu_ratio']:.3f} ({cr}) | {fm} | {row['wall_ratio']:.2f} ({wr}) | "
            f"{o['plan']:.3f} | {o['merge']:.3f} | {o['unmerge']:.3f} |"
        )
    print("\n| part | " + " | ".join(summary) + " |")
    print("|---|" + "---|" * len(summary))
    for k in sorted(full["parts_s"]):
        print(f"| {k} | " + " | ".join(f"{row['parts_s'].get(k, 0.0):.2f}" for row in summary.values()) + " |")
    print("\n| transformer levels | share of the step | bound if free | bound if scaled by 1 - ratio |")
    print("|---|---|---|---|")
    for b in bounds:
        print(f"| {b['levels']} | {100 * b['share']:.1f}% | {b['bound_free']:.2f}x | {b['bound_scaled']:.2f}x |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="minutes"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_avg": os.getloadavg(),
        "argv": sys.argv[1:],
    }
    result = {"meta": meta, "summary": summary, "amdahl": bounds, "calls": calls}
    out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
