"""What ``tokenthin.calibrate`` costs on a vision-language model, end to end from a processor: a tiny random checkpoint
laid out like a real one (``tokenthin.eval.tiny``: LLaVA-1.5's 576 visual tokens per image, or LLaVA-NeXT /
Qwen2-VL), the 6 drawn demo images with their questions as calibration prompts (chat template, left padding), and
each method calibrated at each FLOPs target (a fraction of the language model's prefill FLOPs).

Random weights say nothing about quality: the fidelities printed only show the search runs; the cost (forwards,
one-thread CPU seconds) and the schedules' FLOPs are what carry over.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/calibrate_vlm_tiny.py --kind llava --flops 0.5 \\
        --methods fastv,divprune,visionzip,aim,todre --batch-size 3
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

import tokenthin
from tokenthin.eval.loading import chat_text, encode, load_vlm, question_messages
from tokenthin.eval.tiny import KINDS, make_vqa_data, save_tiny


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", default="llava", choices=KINDS)
    ap.add_argument("--flops", default="0.5", help="comma-separated targets (one schedule each)")
    ap.add_argument("--methods", default="fastv,divprune,visionzip,aim,todre")
    ap.add_argument("--batch-size", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    targets = [float(f) for f in args.flops.split(",")]
    with tempfile.TemporaryDirectory() as d:
        save_tiny(args.kind, Path(d) / "model")
        model, proc = load_vlm(str(Path(d) / "model"), device="cpu")
        data = make_vqa_data(Path(d) / "data")
        rows = [json.loads(line) for line in data.read_text().splitlines()]
        images = [[Image.open(data.parent / r["image"]).convert("RGB")] for r in rows]
        texts = [chat_text(proc, question_messages(r["question"])) for r in rows]
        b, dev = args.batch_size, torch.device("cpu")
        samples = [encode(proc, texts[i : i + b], images[i : i + b], dev, model.dtype) for i in range(0, len(rows), b)]
        for method in args.methods.split(","):
            t0 = time.thread_time()
            try:
                found = tokenthin.calibrate(model, method, flops=targets, samples=samples, progress=False)
            except tokenthin.TokenThinError as e:
                print(f"{method}: refused: {e}")
                continue
            cpu = time.thread_time() - t0
            for s in found:  # type: ignore[union-attr]
                print(f"{s.describe()}; one-thread CPU {cpu:.1f} s for all targets")


if __name__ == "__main__":
    main()
