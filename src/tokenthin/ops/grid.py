"""Patch grids: pooling bins (patch -> cell) and the out grid that keeps about ``k`` cells."""

from __future__ import annotations

import math
import operator
from fractions import Fraction

import torch

from tokenthin.errors import BudgetError

__all__ = ["grid_pool_map", "grid_shape_for_keep"]


def _int_at_least_one(value: int, error: type[Exception], not_int: str, too_small: str) -> int:
    """``value`` as an int >= 1, else ``error``: ``not_int`` for a non-integer (or a bool), ``too_small``
    (formatted with ``value``) below 1."""
    if isinstance(value, bool):
        raise error(not_int)
    try:
        value = operator.index(value)
    except TypeError:
        raise error(not_int) from None
    if value < 1:
        raise error(too_small.format(value=value))
    return value


def _check_positive_int(name: str, value: int) -> int:
    return _int_at_least_one(
        value,
        ValueError,
        f"{name} must be an int >= 1, got {value!r}; pass the grid size in patches.",
        f"{name} must be >= 1, got {{value}}; pass the grid size in patches.",
    )


def grid_pool_map(h: int, w: int, out_h: int, out_w: int, device=None) -> torch.Tensor:
    """Cell of an ``out_h x out_w`` grid for every raster-order patch of an ``h x w`` grid.

    Patch ``(r, c)`` (flat index ``r * w + c``) goes to cell
    ``floor(r * out_h / h) * out_w + floor(c * out_w / w)``. The bins do not overlap and are
    contiguous; when ``out_h`` divides ``h`` (and ``out_w`` divides ``w``) they are exactly
    the bins of adaptive average pooling. Every out cell gets at least one patch because
    ``out_h <= h`` and ``out_w <= w`` (required). Returns a ``(h * w,)`` LongTensor.
    """
    h, w = _check_positive_int("h", h), _check_positive_int("w", w)
    out_h, out_w = _check_positive_int("out_h", out_h), _check_positive_int("out_w", out_w)
    if out_h > h or out_w > w:
        raise BudgetError(
            f"out grid {out_h}x{out_w} is larger than the {h}x{w} patch grid; pick out_h <= {h} and "
            f"out_w <= {w} (grid_shape_for_keep does)."
        )
    r = torch.arange(h, device=device).mul_(out_h).div_(h, rounding_mode="floor")
    c = torch.arange(w, device=device).mul_(out_w).div_(w, rounding_mode="floor")
    return (r.unsqueeze(1) * out_w + c.unsqueeze(0)).reshape(-1)


def grid_shape_for_keep(h: int, w: int, k: int) -> tuple[int, int]:
    """Out grid ``(out_h, out_w)`` for keeping about ``k`` of the ``h x w`` patches.

    Rule: the real-valued grid that keeps the aspect ratio exactly with ``k`` cells is
    ``a* x b*`` with ``a* = sqrt(k h / w)``, ``b* = sqrt(k w / h)``. Candidates are
    ``out_h`` in ``{floor(a*), ceil(a*)}`` (clipped to ``[1, h]``) with
    ``out_w = min(w, k // out_h)``, and ``out_w`` in ``{floor(b*), ceil(b*)}`` (clipped to
    ``[1, w]``) with ``out_h = min(h, k // out_w)``. Of these, take the one with the most
    cells (``<= k``), then the smallest aspect error ``|log(out_h / out_w) - log(h / w)|``,
    then the smallest ``out_h``. ``k >= h * w`` gives ``(h, w)``. Raises BudgetError if
    ``k < 1``.
    """
    h, w = _check_positive_int("h", h), _check_positive_int("w", w)
    k = _int_at_least_one(
        k,
        BudgetError,
        f"k must be an int >= 1, got {k!r}; pass the number of tokens to keep.",
        "k={value} leaves no pooled token; pass k >= 1.",
    )
    if k >= h * w:
        return h, w
    a_star = math.sqrt(k * h / w)
    b_star = math.sqrt(k * w / h)
    options = set()
    for a in (math.floor(a_star), math.ceil(a_star)):
        a = min(max(a, 1), h)
        options.add((a, min(w, k // a)))
    for b in (math.floor(b_star), math.ceil(b_star)):
        b = min(max(b, 1), w)
        options.add((min(h, k // b), b))

    def rank(shape: tuple[int, int]) -> tuple[int, Fraction, int]:
        a, b = shape
        # exp(|log(a / b) - log(h / w)|) as an exact fraction, so mirrored shapes tie exactly
        return (-(a * b), Fraction(max(a * w, b * h), min(a * w, b * h)), a)

    return min((s for s in options if s[0] >= 1 and s[1] >= 1), key=rank)
