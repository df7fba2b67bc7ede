"""Why tomesd's terrain PSNR is not monotonic in the ratio: per-sample PSNR vs the unreduced output for tomesd at
several ratios with random destination offsets (two seeds), without them (``use_rand=False``: the top-left token
of every 2 x 2 cell) and with each fixed offset 0..3 of the cell (an experiment: ``destinations`` is replaced for
the run; 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right). Real terrain weights; not a test.

    PYTHONPATH=src python benchmarks/terrain_offsets.py [--samples 8] [--ratios 0.25,0.4,0.5,0.6,0.75]
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

try:
    import tokenthin
except ImportError:  # running from a checkout without PYTHONPATH=src
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import tokenthin

from tokenthin.bench.diffusion import psnr
from tokenthin.models.terrain import load_terrain, terrain_inputs

tomesd = importlib.import_module("tokenthin.methods.tomesd")


def fixed_offset(k: int):
    """A ``destinations`` that puts every cell's destination at offset ``k`` (row-major in the cell)."""

    def destinations(inp, sy, sx, use_rand, seed):  # tomesd.destinations's signature
        b = inp.x.shape[0]
        h, w = inp.grid
        hs, ws = h // sy, w // sx
        rows = torch.arange(hs).view(hs, 1) * sy + k // sx
        cols = torch.arange(ws).view(1, ws) * sx + k % sx
        dst = torch.zeros(h * w, dtype=torch.bool)
        dst[(rows * w + cols).reshape(-1)] = True
        return dst.view(1, h, w).expand(b, h, w).to(inp.x.device)

    return destinations


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--ratios", default="0.25,0.4,0.5,0.6,0.75")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = load_terrain()
    x = terrain_inputs(args.samples, 0)

    def call() -> torch.Tensor:
        with torch.inference_mode():
            return model(x.noisy, x.sigma, x.difficulty)

    full = call()
    ratios = [float(r) for r in args.ratios.split(",")]
    variants = [("random offsets, seed 0", {}, None), ("random offsets, seed 1", {"seed": 1}, None)]
    variants += [(f"fixed offset {k}", {}, k) for k in range(4)]
    print("| destinations | " + " | ".join(f"{r:g}" for r in ratios) + " |")
    print("|---|" + "---|" * len(ratios))
    orig = tomesd.destinations
    for name, kw, k in variants:
        cells = []
        try:
            if k is not None:
                tomesd.destinations = fixed_offset(k)
            for r in ratios:
                with tokenthin.applied(model.unet, "tomesd", ratio=r, **kw):
                    v = psnr(call(), full)
                cells.append(f"{float(v.mean()):.1f} (min {float(v.min()):.1f})")
        finally:
            tomesd.destinations = orig
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
