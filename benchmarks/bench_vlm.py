"""Prefill and decode cost of every VLM method on LLaVA-shaped models at realistic visual-token counts (not a test).

Two hosts, built from config classes (random weights: this measures cost, not quality):

* ``576``: LLaVA-1.5 token layout: a CLIP tower at 336 px / patch 14 (576 visual tokens per image);
* ``2880``: LLaVA-NeXT AnyRes at 672 x 672 px: a base view plus 4 crops of 576 tokens (2880 visual tokens, plus
  48 row-end tokens).

The models are narrow and shallow (vision tower 64 wide x 2 layers, language model 1024 wide x 8 layers; LLaVA-1.5-7B
is 4096 x 32) so that a CPU run finishes in minutes; the token counts, and so the attention's share of the work,
are the real ones. tokenthin's own time is nearly fixed per call, so its share here is larger than on a 7B model.
For each method at ``--keep`` it reports, measured side by side in one run (interleaved repeats, medians):

* prefill FLOPs (``torch.utils.flop_counter`` over the whole model, the method's own ops included) and time,
  reduced / full;
* one decoding step's time with the KV cache, reduced / full (median of ``--steps`` greedy steps after a prefill);
* peak memory of the prefill, reduced / full;
* the method's own time (selection and bookkeeping, single-threaded) as a share of the reduced prefill.

    PYTHONPATH=src python benchmarks/bench_vlm.py [--tokens 576,2880] [--keep 0.25] [--resume]

Rows go to ``--out``/vlm.jsonl as they finish (``--resume`` skips rows already there); the table is printed and
written to ``--out``/vlm.md.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

try:
    import tokenthin
except ImportError:  # a checkout without PYTHONPATH=src
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import tokenthin
from tokenthin.bench.memory import peak_memory
from tokenthin.errors import TokenThinError

IMAGE_TOKEN = 31
METHODS = [
    ("fastervlm", "output", {}),
    ("visionzip", "output", {}),
    ("divprune", "output", {}),
    ("kcenter", "output", {}),
    ("random", "output", {}),
    ("hiprune", "output", {}),
    ("hired", "output", {}),
    ("globalcom2", "output", {}),
    ("holov", "output", {}),
    ("mmtok", "output", {}),
    ("recoverable", "output", {}),
    ("fastv", "llm:1", {}),
    ("aim", None, {}),
    ("todre", None, {}),
]


VISION = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=336,
    patch_size=14,
    projection_dim=64,
)
TEXT = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=16,
    vocab_size=512,
    max_position_embeddings=4096,
)


def build(
    tokens: int, vision: dict | None = None, text: dict | None = None
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The LLaVA (576) or LLaVA-NeXT (2880) host; ``vision`` / ``text`` override the tower's / language model's
    config (benchmarks/gpu.py builds a LLaVA-1.5-7B-wide language model this way)."""
    from transformers import CLIPVisionConfig, LlamaConfig

    torch.manual_seed(0)
    vc = CLIPVisionConfig(**{**VISION, **(vision or {})})
    tc = LlamaConfig(**{**TEXT, **(text or {})})
    g = torch.Generator().manual_seed(1)
    before, after = list(range(40, 48)), list(range(50, 82))
    if tokens == 576:
        from transformers import LlavaConfig, LlavaForConditionalGeneration

        cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2)
        model = LlavaForConditionalGeneration(cfg).eval()
        ids = torch.tensor([[1, *before, *([IMAGE_TOKEN] * 576), *after]])
        return model, {"input_ids": ids, "pixel_values": torch.randn(1, 3, 336, 336, generator=g)}
    if tokens == 2880:
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

        cfg = LlavaNextConfig(
            vision_config=vc,
            text_config=tc,
            image_token_id=IMAGE_TOKEN,
            vision_feature_layer=-2,
            image_grid_pinpoints=[[672, 672]],
        )
        model = LlavaNextForConditionalGeneration(cfg).eval()
        sizes = torch.tensor([[672, 672]])
        pv = torch.randn(1, 5, 3, 336, 336, generator=g)
        with torch.no_grad():
            n = model.model.get_image_features(pixel_values=pv, image_sizes=sizes, return_dict=True).pooler_output[0]
        ids = torch.tensor([[1, *before, *([IMAGE_TOKEN] * n.shape[0]), *after]])
        return model, {"input_ids": ids, "pixel_values": pv, "image_sizes": sizes}
    raise SystemExit(f"--tokens: 576 or 2880, not {tokens}")


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(model, inputs, method: str, site: str | None, params: dict, keep: float, steps: int, repeats: int):
    tokenthin.apply(model, method, keep=keep, site=site, **params)
    rt = tokenthin.runtime_of(model)

    def prefill() -> None:
        with torch.no_grad():
            model(**inputs)

    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def decode() -> float:
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
            cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
            tok = out.logits[:, -1:].argmax(-1)
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                out = model(input_ids=tok, use_cache=True, **{cache_kw: cache})
                times.append(time.perf_counter() - t0)
                tok = out.logits[:, -1:].argmax(-1)
        return statistics.median(times)

    def flops() -> float:
        with FlopCounterMode(display=False) as fc:
            prefill()
        return float(fc.get_total_flops())

    out: dict[str, float] = {}
    try:
        for state in ("full", "reduced"):
            (rt.detach if state == "full" else rt.attach)()
            out[f"{state}_flops"] = flops()
            with peak_memory(torch.device("cpu")) as mem:
                prefill()
            out[f"{state}_mb"] = float(mem["mb"] or 0.0)
        # interleave full and reduced so that drift on a busy machine hits both
        pre = {"full": [], "reduced": []}
        dec = {"full": [], "reduced": []}
        for _ in range(repeats):
            for state in ("full", "reduced"):
                (rt.detach if state == "full" else rt.attach)()
                pre[state].append(_median_time(prefill, 1))
                dec[state].append(decode())
        rt.measure, rt.overhead_s = True, 0.0
        t_red = _median_time(prefill, repeats)
        own = rt.overhead_s / repeats
        info = tokenthin.info(model)
    finally:
        tokenthin.remove(model)
    med = {k: {s: statistics.median(v) for s, v in d.items()} for k, d in (("pre", pre), ("dec", dec))}
    return {
        "site": rt.schedule.site,
        "visual": info.visual_tokens[0],
        "kept": info.kept[0],
        "flops_ratio": out["reduced_flops"] / out["full_flops"],
        "prefill_ms": med["pre"]["full"] * 1e3,
        "prefill_ratio": med["pre"]["reduced"] / med["pre"]["full"],
        "decode_ms": med["dec"]["full"] * 1e3,
        "decode_ratio": med["dec"]["reduced"] / max(med["dec"]["full"], 1e-9),
        "memory_ratio": out["reduced_mb"] / max(out["full_mb"], 1e-9),
        "own_share": own / t_red,
    }


def table(rows: list[dict]) -> str:
    head = (
        "| visual tokens | method | site | kept | prefill FLOPs | prefill time | decode step | peak memory | "
        "method's own time |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['visual']} | {r['method']} | | n/a: {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {r['visual']} | {r['method']} | {r['site']} | {r['kept']} | {r['flops_ratio']:.2f}x | "
            f"{r['prefill_ratio']:.2f}x (of {r['prefill_ms']:.0f} ms) | {r['decode_ratio']:.2f}x "
            f"(of {r['decode_ms']:.1f} ms) | {r['memory_ratio']:.2f}x | {100 * r['own_share']:.1f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="576,2880")
    p.add_argument("--keep", type=float, default=0.25)
    p.add_argument("--methods", default=",".join(m for m, _, _ in METHODS))
    p.add_argument("--steps", type=int, default=8, help="decoding steps timed per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--resume", action="store_true", help="skip rows already in --out/vlm.jsonl")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "vlm.jsonl"
    done: dict[str, dict] = {}
    if args.resume and store.exists():
        for line in store.read_text().splitlines():
            row = json.loads(line)
            done[row["key"]] = row
    elif store.exists():
        store.unlink()
    wanted = [m for m in METHODS if m[0] in args.methods.split(",")]
    torch.manual_seed(0)
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; keep={args.keep}", flush=True)
    for tokens in (int(t) for t in args.tokens.split(",")):
        model, inputs = build(tokens)
        for name, site, params in wanted:
            key = f"{tokens}/{name}/{site}/{args.keep}"
            if key in done:
                rows.append(done[key])
                continue
            t0 = time.perf_counter()
            try:
                got = measure(model, inputs, name, site, params, args.keep, args.steps, args.repeats)
            except TokenThinError as exc:  # e.g. a method that needs one image grid, on AnyRes views
                if tokenthin.is_applied(model):
                    tokenthin.remove(model)
                got = {"visual": tokens, "error": str(exc).split(":")[0]}
            row = {"key": key, "method": name, **got}
            rows.append(row)
            with store.open("a") as f:  # one line per finished row: an interrupted run resumes from here
                f.write(json.dumps(row) + "\n")
            print(f"{key}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    text = table(rows)
    (out / "vlm.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
