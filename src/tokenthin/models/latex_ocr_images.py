"""latex-ocr-junia's input pictures: the package's letterbox preprocessing and formulas rendered by matplotlib.

Part of :mod:`tokenthin.models.latex_ocr` (import the names from there).

Preprocessing (``latex_ocr_junia/data.py: load_and_preprocess_image``)
----------------------------------------------------------------------
``Image.open(path).convert("L")`` -> scale ``s = min(512 / w, 128 / h)`` (up or down) -> PIL bilinear
resize to ``(max(1, round(w s)), max(1, round(h s)))`` -> paste centred (offsets floored) on a **black**
128x512 canvas -> ``float32 / 255`` -> (1, 128, 512). No mean/std normalisation, no inversion: formulas
are dark ink on white, the letterbox bars are black. :func:`letterbox` and :func:`preprocess` do exactly
this on in-memory images (bit-identical to the package on the same picture).

:func:`render_formula` draws a formula with matplotlib's mathtext rasteriser (Agg, the bundled Computer
Modern fonts, black on white, a white margin) and letterboxes it. The model was trained on formulas
cropped from PDFs, so renderings are out of its distribution: it reads short formulas with some
artefacts (extra ``\\mathbf`` / display delimiters); what matters for tokenthin is agreement with the
unreduced model, not the ground truth.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tokenthin.models.cache import require
from tokenthin.models.latex_ocr_assets import IMAGE_HEIGHT, IMAGE_WIDTH
from tokenthin.models.loading import image_list

if TYPE_CHECKING:
    from PIL import Image as PILImage


def _as_gray_image(image: Any) -> PILImage.Image:
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as img:
            return img.convert("L")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"image arrays must be uint8 (H, W) or (H, W, 3), got {image.dtype}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, a uint8 array or a path, got {type(image).__name__}")
    return image.convert("L")


def letterbox(image: Any, height: int = IMAGE_HEIGHT, width: int = IMAGE_WIDTH) -> PILImage.Image:
    """The package's resize-with-pad: grayscale, scaled to fit (PIL bilinear), centred on black. Mode ``L``."""
    from PIL import Image

    img = _as_gray_image(image)
    old_w, old_h = img.size
    if old_w <= 0 or old_h <= 0:
        raise ValueError(f"empty image {img.size}")
    scale = min(float(width) / float(old_w), float(height) / float(old_h))
    new_w, new_h = max(1, round(old_w * scale)), max(1, round(old_h * scale))
    img = img.resize((new_w, new_h), resample=Image.Resampling.BILINEAR)
    canvas = Image.new("L", (width, height), color=0)
    canvas.paste(img, ((width - new_w) // 2, (height - new_h) // 2))
    return canvas


def preprocess(images: Any, height: int = IMAGE_HEIGHT, width: int = IMAGE_WIDTH) -> torch.Tensor:
    """Images (PIL, uint8 arrays or paths; one or a list) -> (B, 1, height, width) float32 in [0, 1].

    Each image goes through :func:`letterbox` (a no-op for an image already ``width x height``), then
    ``/ 255`` - the package's ``load_and_preprocess_image`` exactly.
    """
    arrays = [np.asarray(letterbox(img, height, width), dtype=np.float32) / 255.0 for img in image_list(images)]
    return torch.from_numpy(np.stack(arrays)[:, None])


def render_math(latex: str, fontsize: float = 12.0, dpi: int = 200, margin: float = 0.5) -> PILImage.Image:
    """``$latex$`` rasterised by matplotlib's mathtext (Agg, Computer Modern), black on white, mode ``L``.

    ``margin`` is white space on each side in units of the font size. Deterministic for a given
    matplotlib version; no TeX installation, no figure, no global state.
    """
    from PIL import Image

    require("matplotlib", "latex-ocr", extra="bench")
    from matplotlib import rc_context
    from matplotlib.font_manager import FontProperties
    from matplotlib.mathtext import MathTextParser

    text = latex.strip()
    if not text:
        raise ValueError("render_math() got an empty formula")
    if not (text.startswith("$") and text.endswith("$") and len(text) > 1):
        text = f"${text}$"
    prop = FontProperties(size=fontsize, math_fontfamily="cm")
    with rc_context({"mathtext.default": "it", "mathtext.fallback": "cm"}):
        try:
            parsed = MathTextParser("agg").parse(text, dpi=dpi, prop=prop, antialiased=True)
        except ValueError as exc:
            raise ValueError(f"matplotlib mathtext cannot render {latex!r}: {exc}") from exc
    ink = np.asarray(parsed.image, dtype=np.uint8)  # glyph coverage, 255 = ink
    pad = max(0, round(margin * fontsize * dpi / 72.0))
    ink = np.pad(ink, pad)
    return Image.fromarray(255 - ink, mode="L")


def render_formula(
    latex: str,
    height: int = IMAGE_HEIGHT,
    width: int = IMAGE_WIDTH,
    *,
    fontsize: float = 12.0,
    dpi: int = 200,
    margin: float = 0.5,
) -> PILImage.Image:
    """A formula as the model's input picture: :func:`render_math` then :func:`letterbox` (``width x height``, ``L``).

    ``preprocess(render_formula(s))`` is the (1, 1, 128, 512) input tensor.
    """
    return letterbox(render_math(latex, fontsize=fontsize, dpi=dpi, margin=margin), height, width)
