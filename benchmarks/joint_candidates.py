"""Every candidate of ``resize-tome``'s joint calibration (input size x ToMe ``smooth`` schedule, and plain
downsampling; :mod:`tokenthin.calibration.joint`) scored on the real DINOv2-S, on the bench's evaluation images and on
its calibration images: [CLS] cosine, mean patch-token cosine after unmerge, the same with each image's mean token
subtracted (``cpatch``), and saliency Pearson r. Shows which candidate each objective would pick and whether any
candidate beats the ``downsample`` baseline on the evaluation images.

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/joint_candidates.py --budgets 0.25,0.5 \\
        --out docs/bench/goals/joint_candidates.jsonl
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

import tokenthin
from tokenthin.adapters.registry import find_adapter
from tokenthin.bench.main import load_data, load_model
from tokenthin.bench.runner import pearson
from tokenthin.budget import Schedule, flops_fraction
from tokenthin.calibration.joint import joint_candidates
from tokenthin.calibration.schedule import CalibratedSchedule
from tokenthin.methods.downsample import scaled_size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="0.25,0.5")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.manual_seed(0)
    bm = load_model("dinov2-s", 224)
    data = load_data(16, "", 50, 10, 224, False)
    a = find_adapter(bm.encoder)
    P, L, p = a.num_protected, a.dims.num_layers, 14
    grid = (224 // p, 224 // p)

    def input_patches(f: float) -> int:
        hh, ww = scaled_size(224, 224, p, f)
        return (hh // p) * (ww // p)

    def flops_of(s: Schedule) -> float:
        f = s.input_fraction
        return flops_fraction(s, a.dims, grid, None if f is None else input_patches(f))

    def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            out = bm.encoder(pixel_values=x)
            pt = out.last_hidden_state[:, P:]
            assert bm.head is not None
            return out.pooler_output.float(), pt.float(), bm.head(pt, grid).float()

    sets = {"eval": data.images, "cal": data.calibration}
    refs = {k: encode(x) for k, x in sets.items()}

    def centred(t: torch.Tensor) -> torch.Tensor:
        return t - t.mean(1, keepdim=True)

    for b in [float(v) for v in args.budgets.split(",")]:
        for s in joint_candidates(b, grid[0] * grid[1], L, input_patches, flops_of):
            cs = CalibratedSchedule(
                method="resize-tome",
                site="layers",
                num_layers=L,
                grid=grid,
                protected=P,
                flops_target=b,
                flops=flops_of(s),
                objective="-",
                fidelity=0.0,
                search="joint",
                r=s.r,
                input_keep=s.input_keep,
                resized_patches=None if s.input_keep is None else input_patches(s.input_keep),
            )
            n_out = cs.tokens()[-1]
            row: dict = {"budget": b, "input_keep": s.input_keep, "patches": cs.input_patches, "tokens_out": n_out}
            row.update(flops=round(flops_of(s), 4), plain=not any(s.r or ()), r=list(s.r or ()))
            with tokenthin.applied(bm.encoder, "resize-tome", schedule=cs, unmerge=True):
                for k, x in sets.items():
                    pooled, pt, maps = encode(x)
                    rp, rt, rm = refs[k]
                    row[k] = {
                        "cls": round(F.cosine_similarity(pooled, rp, dim=-1).mean().item(), 4),
                        "patch": round(F.cosine_similarity(pt, rt, dim=-1).mean().item(), 4),
                        "cpatch": round(F.cosine_similarity(centred(pt), centred(rt), dim=-1).mean().item(), 4),
                        "saliency_r": round(pearson(maps, rm).mean().item(), 4),
                    }
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
