"""Kept / merged / dropped token overlays from a :class:`~tokenthin.runtime.TokenInfo` (no model knowledge).

Every original patch is drawn in its place on the image, coloured by the output token it ended up in:

* a patch that is a token on its own is left clear (the boundary lines around it outline it);
* patches merged into one token share a tint, a deterministic colour per output token (:func:`token_color`), and
  lines are drawn between patches that belong to different tokens;
* dropped patches are greyed and darkened.

The image is stretched to the patch grid's aspect (as a square-resizing preprocessor feeds it to the model) and
drawn ``cell`` pixels per patch. Rendering uses matplotlib's Agg canvas directly: no pyplot, never a window.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .runtime import TokenInfo

__all__ = [
    "DROPPED_COLOR",
    "LINE_COLOR",
    "overlay_grid",
    "patch_colors",
    "patch_tokens",
    "render_overlay",
    "save_overlay",
    "token_color",
    "token_overlay",
]

#: Colour dropped patches are blended towards (after being made grey).
DROPPED_COLOR: tuple[float, float, float] = (0.06, 0.06, 0.08)
#: Colour of the lines between patches that belong to different tokens.
LINE_COLOR: tuple[float, float, float] = (1.0, 1.0, 1.0)
MERGED_ALPHA = 0.5  # tint strength over merged patches
DROPPED_ALPHA = 0.72  # how far dropped patches go towards DROPPED_COLOR
LINE_ALPHA = 0.8
_MIN_CELL, _MAX_CELL = 8, 48  # default pixels per patch: the image's own, clamped to this range
_DPI = 100
_FONT_PT = 9
_LINE_PX = 15  # one title line at 9 pt, 100 dpi
_CHAR_PX = 6.5  # a generous average glyph width at 9 pt, 100 dpi
_MARGIN, _GAP, _MIN_PANEL = 6, 12, 160

ImageLike = Any  # PIL.Image.Image | np.ndarray (H, W, 3) uint8


# --------------------------------------------------------------------------------------------------
# what each patch became


def _grid(info: TokenInfo) -> tuple[int, int]:
    h, w = (int(g) for g in info.grid)
    return h, w


def patch_tokens(info: TokenInfo, sample: int = 0) -> np.ndarray:
    """(h*w,) int64: the output token each original patch (raster order) belongs to, -1 where it was dropped."""
    h, w = _grid(info)
    P = int(info.num_protected)
    if info.source is None:  # nothing was reduced: every patch is its own token
        return np.arange(P, P + h * w, dtype=np.int64)
    source = info.source.detach().cpu().numpy()
    if source.ndim != 2 or source.shape[1] != P + h * w:
        raise ValueError(f"TokenInfo.source has shape {source.shape}; expected (B, {P + h * w}) for a {h}x{w} grid")
    if not -source.shape[0] <= sample < source.shape[0]:
        raise IndexError(f"sample {sample} out of range for a batch of {source.shape[0]}")
    return source[sample, P:].astype(np.int64)


def _roles(tokens: np.ndarray, num_protected: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (merged, dropped) per patch; the rest are tokens on their own."""
    dropped = tokens < 0
    kept = tokens[~dropped]
    counts = np.bincount(kept, minlength=1) if kept.size else np.zeros(1, dtype=np.int64)
    merged = np.zeros_like(dropped)
    merged[~dropped] = (counts[kept] > 1) | (kept < num_protected)  # merged into a [CLS]-like token counts too
    return merged, dropped


def token_color(token: int) -> tuple[float, float, float]:
    """A deterministic RGB colour in [0, 1] for an output token index (golden-ratio hue steps)."""
    t = int(token)
    hue = (0.13 + t * 0.618033988749895) % 1.0
    sat = 0.65 + 0.3 * ((t * 0.381966) % 1.0)
    val = 0.85 + 0.15 * ((t * 0.7548776662) % 1.0)
    return colorsys.hsv_to_rgb(hue, sat, val)


def patch_colors(info: TokenInfo, sample: int = 0) -> np.ndarray:
    """(h*w, 3) float32 RGB in [0, 1]: each patch's tint, the colour of its output token (so patches merged into one
    token share it) or :data:`DROPPED_COLOR` for dropped patches. Patches that stay tokens on their own get their
    token's colour too but :func:`render_overlay` does not tint them."""
    tokens = patch_tokens(info, sample)
    colors = np.empty((tokens.size, 3), dtype=np.float32)
    cache: dict[int, tuple[float, float, float]] = {}
    for i, t in enumerate(tokens.tolist()):
        if t < 0:
            colors[i] = DROPPED_COLOR
        else:
            if t not in cache:
                cache[t] = token_color(t)
            colors[i] = cache[t]
    return colors


def _facts(info: TokenInfo, sample: int) -> str:
    h, w = _grid(info)
    P = int(info.num_protected)
    tokens = patch_tokens(info, sample)
    merged, dropped = _roles(tokens, P)
    if info.source is None:
        kept = P + h * w
    else:
        row = info.source[sample].detach().cpu().numpy()
        kept = int(np.unique(row[row >= 0]).size)
    total = P + h * w
    groups = int(np.unique(tokens[merged]).size)
    alone = int(tokens.size - merged.sum() - dropped.sum())
    parts = [f"{alone} alone"]
    if merged.any():
        parts.append(f"{int(merged.sum())} merged into {groups}")
    if dropped.any():
        parts.append(f"{int(dropped.sum())} dropped")
    return f"{kept}/{total} tokens kept ({kept / total:.0%}); patches: " + ", ".join(parts)


# --------------------------------------------------------------------------------------------------
# drawing


def _as_rgb_array(image: ImageLike) -> np.ndarray:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"image arrays must be uint8 (H, W, 3), got {image.dtype}")
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"image arrays must be (H, W, 3), got shape {image.shape}")
        return np.ascontiguousarray(image[..., :3])
    if hasattr(image, "convert"):
        return np.asarray(image.convert("RGB"))
    raise TypeError(f"image must be a PIL image or a uint8 array (H, W, 3), got {type(image).__name__}")


def _default_cell(shape: tuple[int, ...], grid: tuple[int, int]) -> int:
    native = round(min(shape[0] / grid[0], shape[1] / grid[1]))
    return int(min(_MAX_CELL, max(_MIN_CELL, native)))


def _band(n_px: int, cell: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """For each pixel along an axis: the nearest patch boundary index and whether it lies within the line width."""
    px = np.arange(n_px)
    k = (px + cell // 2) // cell
    off = px - k * cell
    return k, (off >= -(width // 2)) & (off < width - width // 2)


def render_overlay(image: ImageLike, info: TokenInfo, sample: int = 0, cell: int | None = None) -> np.ndarray:
    """The overlay as a uint8 array (h*cell, w*cell, 3); ``cell`` (pixels per patch) defaults to the image's own
    patch size, clamped to [8, 48]."""
    from PIL import Image as PILImage

    h, w = _grid(info)
    rgb = _as_rgb_array(image)
    cell = _default_cell(rgb.shape, (h, w)) if cell is None else int(cell)
    if cell < 1:
        raise ValueError(f"cell must be >= 1 pixel per patch, got {cell}")
    H, W = h * cell, w * cell
    if rgb.shape[:2] != (H, W):
        rgb = np.asarray(PILImage.fromarray(rgb).resize((W, H), PILImage.Resampling.LANCZOS))
    base = rgb.astype(np.float32) / 255.0

    tokens = patch_tokens(info, sample)
    merged, dropped = _roles(tokens, int(info.num_protected))
    colors = patch_colors(info, sample)
    alpha = np.where(dropped, DROPPED_ALPHA, np.where(merged, MERGED_ALPHA, 0.0)).astype(np.float32)

    def up(a: np.ndarray) -> np.ndarray:  # (h, w, ...) per patch -> (H, W, ...) per pixel
        return np.repeat(np.repeat(a, cell, axis=0), cell, axis=1)

    gray = base @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    drop_px = up(dropped.reshape(h, w))
    base = np.where(drop_px[..., None], gray[..., None], base)
    a = up(alpha.reshape(h, w))[..., None]
    out = base * (1.0 - a) + up(colors.reshape(h, w, 3)) * a

    # lines between patches of different tokens (none between two dropped patches)
    t = tokens.reshape(h, w)
    both_dropped_v = (t[:, 1:] < 0) & (t[:, :-1] < 0)
    both_dropped_h = (t[1:, :] < 0) & (t[:-1, :] < 0)
    vb = np.zeros((h, w + 1), dtype=bool)
    vb[:, 1:-1] = (t[:, 1:] != t[:, :-1]) & ~both_dropped_v
    hb = np.zeros((h + 1, w), dtype=bool)
    hb[1:-1, :] = (t[1:, :] != t[:-1, :]) & ~both_dropped_h
    width = max(1, cell // 16)
    kx, in_x = _band(W, cell, width)
    ky, in_y = _band(H, cell, width)
    rows, cols = np.arange(H) // cell, np.arange(W) // cell
    lines = (vb[rows][:, kx] & in_x[None, :]) | (hb[ky][:, cols] & in_y[:, None])
    line = np.asarray(LINE_COLOR, dtype=np.float32)
    out = np.where(lines[..., None], out * (1.0 - LINE_ALPHA) + line * LINE_ALPHA, out)
    return (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _figure(panels: Sequence[tuple[np.ndarray, str]]) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("no panels to draw")
    n_lines = max(title.count("\n") + 1 for _, title in panels)
    title_px = n_lines * _LINE_PX + _MARGIN
    slots = [
        max(arr.shape[1], _MIN_PANEL, int(_CHAR_PX * max(len(line) for line in title.split("\n"))) + 2 * _MARGIN)
        for arr, title in panels
    ]
    width = 2 * _MARGIN + sum(slots) + _GAP * (len(panels) - 1)
    height = 2 * _MARGIN + title_px + max(arr.shape[0] for arr, _ in panels)
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor="white")
    FigureCanvasAgg(fig)
    x = _MARGIN
    for (arr, title), slot in zip(panels, slots):
        ph, pw = arr.shape[:2]
        left = x + (slot - pw) / 2
        top = _MARGIN + title_px
        ax = fig.add_axes((left / width, 1 - (top + ph) / height, pw / width, ph / height))
        ax.imshow(arr, interpolation="nearest")
        ax.set_axis_off()
        fig.text(
            (x + slot / 2) / width,
            1 - _MARGIN / height,
            title,
            ha="center",
            va="top",
            fontsize=_FONT_PT,
            linespacing=1.25,
        )
        x += slot + _GAP
    return fig


def _title(info: TokenInfo, sample: int, title: str | None) -> str:
    facts = _facts(info, sample)
    if len(facts) > 48 and "; " in facts:  # two short lines read better over a narrow panel
        facts = facts.replace("; ", "\n", 1)
    return facts if not title else f"{title}\n{facts}"


def token_overlay(
    image: ImageLike, info: TokenInfo, sample: int = 0, title: str | None = None, cell: int | None = None
) -> Figure:
    """A matplotlib Figure of :func:`render_overlay` titled with ``title`` (optional) and the method-independent
    facts: kept tokens / original tokens, and how many patches stayed alone, were merged or dropped. Pixels map
    one to one onto the saved PNG (``fig.savefig(path, dpi=fig.dpi)``)."""
    return _figure([(render_overlay(image, info, sample, cell), _title(info, sample, title))])


def overlay_grid(panels: Sequence[Sequence[Any]], cell: int | None = None) -> Figure:
    """One row of overlays; each panel is ``(image, info)``, ``(image, info, sample)`` or
    ``(image, info, sample, title)``."""
    drawn = []
    for panel in panels:
        if not 2 <= len(panel) <= 4:
            raise ValueError("each panel is (image, info[, sample[, title]])")
        image, info = panel[0], panel[1]
        sample = int(panel[2]) if len(panel) > 2 and panel[2] is not None else 0
        title = panel[3] if len(panel) > 3 else None
        drawn.append((render_overlay(image, info, sample, cell), _title(info, sample, title)))
    return _figure(drawn)


def save_overlay(
    image: ImageLike,
    info: TokenInfo,
    path: str | Path,
    sample: int = 0,
    title: str | None = None,
    cell: int | None = None,
) -> Path:
    """:func:`token_overlay` saved as a PNG at ``path`` (parent folders are created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = token_overlay(image, info, sample, title, cell)
    fig.savefig(path, dpi=fig.dpi, format="png", facecolor=fig.get_facecolor())
    return path
