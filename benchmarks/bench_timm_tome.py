"""tokenthin ToMe on a timm VisionTransformer vs the official ToMe timm patch (not a test).

The official patch (facebookresearch/ToMe, ``tome.patch.timm``) is imported from a local checkout given by
``--tome-repo``; none of its code is copied here. Both run on the same random-weight ViT-B/16-shaped model
(224 px, 12 blocks, width 768, 12 heads, no classifier: the call returns the [CLS] features) with the same r.

Where the two differ by design: the official patch merges inside each block, between attention and MLP, in all
12 blocks; tokenthin merges at the block boundary (after the MLP, through a forward hook) after blocks 0-10, so
the same r gives the same token count in every attention, while the official MLPs see r fewer tokens. For the
pick comparison the official patch gets ``r = [r] * 11 + [0]`` ("matched": same merges, same final count);
speed is reported for both that and the official constant r ("official").

Reported per r:
* speed: interleaved runs (full, tokenthin, official matched, official constant, and the full model on timm's
  explicit attention path, which is what the official ``Attention`` copy computes instead of SDPA), ratio to the
  full model per round, median over rounds;
* agreement of the final [CLS] features: cosine (lowest over the batch) and max abs vs the unreduced model and
  between the two;
* merge picks: the groups of original patches each output token stands for (a partition), as the fraction of
  patches whose group is the same set on both sides; "first layer"
  merges at block 0 only (both see identical keys, so the picks must be identical), "all layers" is the full
  schedule (the states differ after the first merge because the official MLP runs on merged tokens).
LayerScale check: ViT-B with ``init_values`` set, r = 0: the official copied ``Block.forward`` skips ``ls1`` /
``ls2`` (``Attention`` / ``Block`` of timm 1.0.x), so its output differs from the untouched model already.

    PYTHONPATH=src python benchmarks/bench_timm_tome.py --tome-repo /work/ToMe [--r 8 13] [--batch 4] \
        [--rounds 7] [--device cpu] [--out results/timm_tome.json]
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
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

VIT_B = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, num_classes=0)


def load_official(repo: str) -> Any:
    """``tome.patch.timm`` from a local ToMe checkout. Exits with the exact import error if it breaks."""
    root = Path(repo).expanduser().resolve()
    if not (root / "tome" / "patch" / "timm.py").is_file():
        sys.exit(f"--tome-repo {root}: no tome/patch/timm.py there (clone facebookresearch/ToMe)")
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module("tome.patch.timm")
    except Exception as e:  # report what breaks on this timm, e.g. a class the patch imports by name
        import timm

        sys.exit(f"the official ToMe timm patch does not import on timm {timm.__version__}: {type(e).__name__}: {e}")


def build(seed: int, device: str, **kw: Any) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(**{**VIT_B, **kw}).to(device).eval()


def official(patch: Any, base: nn.Module, r: Any, trace: bool = True) -> nn.Module:
    m = copy.deepcopy(base)
    patch.apply_patch(m, trace_source=trace, prop_attn=True)
    m.r = r
    return m


def official_groups(m: nn.Module) -> torch.Tensor:
    """(B, N0) original token -> output token, from the official (B, N_out, N0) source adjacency."""
    return m._tome_info["source"].argmax(1)


def same_groups(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Two (B, N0) token -> group maps: fraction of samples with the identical partition, and fraction of
    tokens whose group (as a set of original tokens) is identical in both."""
    ca = a.unsqueeze(2) == a.unsqueeze(1)
    cb = b.unsqueeze(2) == b.unsqueeze(1)
    tok = (ca == cb).all(2)
    return float(tok.all(1).float().mean()), float(tok.float().mean())


def compare(y: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    cos = torch.nn.functional.cosine_similarity(y.double(), ref.double(), dim=-1)
    return {"cos_min": float(cos.min()), "max_abs": float((y - ref).abs().max())}


def timed(m: nn.Module, x: torch.Tensor) -> float:
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    m(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


@torch.inference_mode()
def run_r(patch: Any, base: nn.Module, x: torch.Tensor, r: int, rounds: int) -> dict[str, Any]:
    L = len(base.blocks)
    full = base(x)
    tt = copy.deepcopy(base)
    out: dict[str, Any] = {"r": r}

    # picks with a single merge after block 0: identical inputs and keys on both sides
    tokenthin.apply(tt, "tome", r=[r] + [0] * (L - 2))
    tt(x)
    one = official(patch, base, [r] + [0] * (L - 1))
    one(x)
    out["picks_first_layer"] = same_groups(tokenthin.info(tt).source, official_groups(one))

    tokenthin.apply(tt, "tome", r=r, replace=True)
    matched = official(patch, base, [r] * (L - 1) + [0])
    const = official(patch, base, r)
    y_tt, y_m, y_c = tt(x), matched(x), const(x)
    out["tokens_out"] = {
        "tokenthin": tokenthin.info(tt).kept[0],
        "official_matched": int(matched._tome_info["source"].shape[1]),
        "official": int(const._tome_info["source"].shape[1]),
    }
    out["picks_all_layers"] = same_groups(tokenthin.info(tt).source, official_groups(matched))
    out["vs_full"] = {"tokenthin": compare(y_tt, full), "official_matched": compare(y_m, full)}
    out["vs_full"]["official"] = compare(y_c, full)
    out["tokenthin_vs_official_matched"] = compare(y_tt, y_m)

    # timed without source tracking (the official (B, N, N0) source adjacency costs a lot)
    matched, const = official(patch, base, [r] * (L - 1) + [0], False), official(patch, base, r, False)
    explicit = copy.deepcopy(base)  # the official Attention copy computes softmax(q k^T) v without SDPA
    for blk in explicit.blocks:
        blk.attn.fused_attn = False
    models = {"full": base, "tokenthin": tt, "official_matched": matched, "official": const, "full_explicit": explicit}
    for m in models.values():  # warm-up
        m(x)
    ratios: dict[str, list[float]] = {k: [] for k in models if k != "full"}
    secs: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        t = {k: timed(m, x) for k, m in models.items()}
        for k, v in t.items():
            secs[k].append(v)
            if k != "full":
                ratios[k].append(v / t["full"])
    out["speed_ratio_median"] = {k: statistics.median(v) for k, v in ratios.items()}
    out["seconds_median"] = {k: statistics.median(v) for k, v in secs.items()}
    tokenthin.remove(tt)
    return out


@torch.inference_mode()
def layerscale_check(patch: Any, x: torch.Tensor, seed: int, device: str, values: list[float]) -> list[dict]:
    rows = []
    for v in values:
        base = build(seed, device, init_values=v)
        full = base(x)
        tt = tokenthin.apply(copy.deepcopy(base), "tome", r=0)
        rows.append(
            {
                "init_values": v,
                "tokenthin_r0": compare(tt(x), full),
                "official_r0": compare(official(patch, base, 0)(x), full),
            }
        )
    return rows


def table(res: dict[str, Any]) -> str:
    lines = [
        "| r | tokens out (tt / official) | speed tt | speed official (matched / const) | full, explicit attn | "
        "cos tt vs full | cos official vs full (matched) | max abs tt vs official | picks: 1st layer / all layers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in res["rows"]:
        s, t, v = row["speed_ratio_median"], row["tokens_out"], row["vs_full"]
        lines.append(
            f"| {row['r']} | {t['tokenthin']} / {t['official_matched']} ({t['official']}) | {s['tokenthin']:.3f} | "
            f"{s['official_matched']:.3f} / {s['official']:.3f} | {s['full_explicit']:.3f} | "
            f"{v['tokenthin']['cos_min']:.5f} | "
            f"{v['official_matched']['cos_min']:.5f} | {row['tokenthin_vs_official_matched']['max_abs']:.3g} | "
            f"{row['picks_first_layer'][1]:.3f} / {row['picks_all_layers'][1]:.3f} |"
        )
    lines += ["", "| LayerScale init_values | tokenthin r=0 max abs vs full | official r=0 max abs vs full |"]
    lines.append("|---|---|---|")
    for row in res["layerscale"]:
        lines.append(
            f"| {row['init_values']:g} | {row['tokenthin_r0']['max_abs']:.3g} | {row['official_r0']['max_abs']:.3g} "
            f"(cos {row['official_r0']['cos_min']:.4f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tome-repo", required=True, help="local checkout of facebookresearch/ToMe")
    ap.add_argument("--r", type=int, nargs="+", default=[8, 13])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layerscale", type=float, nargs="*", default=[1e-5, 0.1, 1.0])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default="results/timm_tome.json")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    import timm

    patch = load_official(a.tome_repo)
    g = torch.Generator().manual_seed(a.seed + 1)
    x = torch.randn(a.batch, 3, 224, 224, generator=g).to(a.device)
    base = build(a.seed, a.device)
    res: dict[str, Any] = {
        "timm": timm.__version__,
        "torch": torch.__version__,
        "device": a.device,
        "threads": torch.get_num_threads(),
        "batch": a.batch,
        "rounds": a.rounds,
        "rows": [run_r(patch, base, x, r, a.rounds) for r in a.r],
        "layerscale": layerscale_check(patch, x[:1], a.seed, a.device, a.layerscale),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"timm {res['timm']}, torch {res['torch']}, {a.device}, {res['threads']} threads, batch {a.batch}")
    print(table(res))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
