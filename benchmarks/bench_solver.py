"""Which FLOPs-solver rule and which resolution share are best: fidelity on the real DINOv2-S (bench defaults).

Measures, as ``tokenthin bench`` does (same model, the same 16 bundled images at 224 px, same metrics): [CLS] cosine
to the unreduced model, saliency-map Pearson r after unmerge, and (``--knn``) Fashion-MNIST k-NN accuracy kept.

* ``rule:<method>:<rule>``: a merge method at site ``layers`` with the schedule that solver rule picks
  (:mod:`tokenthin.solver`: ``hold``, ``sum_log``, ``constant``);
* ``cap:<m>[:<rule>]``: ``resize-tome`` with ``min_keep=m`` (and that solver rule);
* ``<method>``: a method with ``flops=`` as ``tokenthin bench`` applies it (e.g. ``downsample``);
* ``<method>+official``: the same with ``official=True`` (its parity mode, e.g. ``tome+official``).

    PYTHONPATH=src python benchmarks/bench_solver.py --budgets 0.25,0.5,0.75 rule:tome:hold rule:tome:constant \\
        cap:0.2 downsample [--knn]

Prints one line per configuration and budget (and appends them as JSON to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

import tokenthin
from tokenthin import budget, solver
from tokenthin.adapters.registry import find_adapter
from tokenthin.bench.main import load_data, load_model
from tokenthin.bench.runner import knn_accuracy, pearson

DEFAULT = solver.DEFAULT_RULE


def encode(bm, x: torch.Tensor, dense: bool, p: int, bs: int = 8):
    feats, maps = [], []
    with torch.no_grad():
        for i in range(0, x.shape[0], bs):
            out = bm.encoder(pixel_values=x[i : i + bs])
            feats.append(out.pooler_output.float())
            if dense:
                g = (x.shape[-2] // 14, x.shape[-1] // 14)
                maps.append(bm.head(out.last_hidden_state[:, p:], g).float())
    return torch.cat(feats), (torch.cat(maps) if maps else None)


def apply_config(bm, name: str, flops: float, grid: tuple[int, int]) -> str:
    enc = bm.encoder
    if name.startswith("rule:"):
        _, method, rule = name.split(":")
        a = find_adapter(enc)
        s = budget.resolve(
            kind="merge",
            sites=("layers",),
            default_site="layers",
            name=method,
            site=None,
            r=None,
            keep=None,
            flops=flops,
            dims=a.dims,
            grid=grid,
            rule=rule,
        )
        tokenthin.apply(enc, method, r=list(s.r or ()), unmerge=True, image_size=bm.image_size)
    elif name.startswith("cap:"):  # cap:<min_keep>[:<rule>]
        share = float(name.split(":")[1])
        solver.DEFAULT_RULE = name.split(":")[2] if name.count(":") == 2 else DEFAULT
        tokenthin.apply(enc, "resize-tome", flops=flops, min_keep=share, unmerge=True, image_size=bm.image_size)
    elif name.endswith("+official"):  # a method's official=True parity mode, at the default solve
        method = name[: -len("+official")]
        tokenthin.apply(enc, method, flops=flops, unmerge=True, image_size=bm.image_size, official=True)
    else:
        tokenthin.apply(enc, name, flops=flops, unmerge=True, image_size=bm.image_size)
    return tokenthin.explain(enc)["applied"]["schedule"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--budgets", default="0.25,0.5,0.75")
    ap.add_argument("--knn", action="store_true")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.manual_seed(0)
    bm = load_model("dinov2-s", 224)
    data = load_data(16, "", 50, 10, 224, args.knn)
    p = find_adapter(bm.encoder).num_protected
    ref_f, ref_m = encode(bm, data.images, True, p)
    if args.knn:
        tr, _ = encode(bm, data.knn_train[0], False, p)
        te, _ = encode(bm, data.knn_test[0], False, p)
        full_acc = knn_accuracy(tr, data.knn_train[1], te, data.knn_test[1], 20)
    grid = (224 // 14, 224 // 14)
    for b in [float(v) for v in args.budgets.split(",")]:
        for name in args.configs:
            t0 = time.time()
            sched = apply_config(bm, name, b, grid)
            try:
                feats, maps = encode(bm, data.images, True, p)
                info = tokenthin.explain(bm.encoder)["applied"]
                row = {
                    "config": name,
                    "budget": b,
                    "flops": round(info["flops_fraction"], 4),
                    "tokens_out": info["tokens_out"],
                    "cosine": round(F.cosine_similarity(feats, ref_f, dim=-1).mean().item(), 4),
                    "saliency_r": round(pearson(maps, ref_m).mean().item(), 4),
                    "schedule": sched,
                }
                if args.knn:
                    te_r, _ = encode(bm, data.knn_test[0], False, p)
                    acc = knn_accuracy(tr, data.knn_train[1], te_r, data.knn_test[1], 20)
                    row["knn_kept"] = round(acc / full_acc, 4)
            finally:
                tokenthin.remove(bm.encoder)
            row["s"] = round(time.time() - t0, 1)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
