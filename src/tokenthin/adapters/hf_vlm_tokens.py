"""Where a vision-language prompt's image tokens come from: the typed :class:`TokenMap` a host's
:meth:`~tokenthin.adapters.hf_vlm.VLMAdapter.token_map` returns (which vision-tower token, which view, which row
and column each image token is), and the helpers that build it from the vision tower's layout. Pure tensor code."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputMismatchError, TokenThinError

ImageLayout = list[tuple[int, tuple[int, int]]]  # per image, in prompt order: (visual tokens, token grid (h, w))


@dataclass
class TokenMap:
    """Where a prompt's image tokens (M of them, in prompt order) come from, and where they sit."""

    flat: torch.Tensor  # (M,) index into the vision tower's tokens, image-major, host-dropped tokens excluded
    newline: torch.Tensor  # (M,) bool: a structure token (LLaVA-NeXT row end) that is kept and never scored
    view: torch.Tensor  # (M,) 0: the image (or AnyRes base view), k >= 1: the k-th crop of an AnyRes image
    grids: list[tuple[int, int]]  # per sample: its image's token grid; (0, 0) for several images / AnyRes
    # (M,) row and column of each token in its view's grid (-1: not on a grid, e.g. a kept [CLS], a row end); the
    # crops of an AnyRes image share one grid, the image's unpadded high-resolution grid (crops tiled)
    row: torch.Tensor
    col: torch.Tensor


def _walk(per: list[int], layout: ImageLayout) -> list[list[int]] | None:
    """Images of each sample, consumed in order; None if the token counts do not line up."""
    out, i = [], 0
    for n in per:
        got, imgs = 0, []
        while got < n and i < len(layout):
            got += layout[i][0]
            imgs.append(i)
            i += 1
        if got != n:
            return None
        out.append(imgs)
    return out if i == len(layout) else None


def assign_images(per: list[int], layout: ImageLayout | None) -> tuple[list[tuple[int, int]], list[list[int]]]:
    """Each sample's image grid (h, w) ((0, 0) where a sample holds several images) and its images' indices in the
    vision tower's batch. ``generate()`` with beams or ``num_return_sequences`` repeats every prompt ``r`` times
    after the tower ran once per image: then each run of ``r`` samples shares its images."""
    if layout is None:
        raise TokenThinError("internal: the vision tower did not run before the language model")
    imgs = _walk(per, layout)
    total = sum(t for t, _ in layout)
    if imgs is None and total and sum(per) % total == 0 and len(per) % (sum(per) // total) == 0:
        r = sum(per) // total
        base = _walk(per[::r], layout)
        if base is not None and all(per[s] == per[(s // r) * r] for s in range(len(per))):
            imgs = [base[s // r] for s in range(len(per))]
    if imgs is None:
        raise InputMismatchError(
            f"the prompts hold {per} image tokens but the {len(layout)} image(s) give "
            f"{[t for t, _ in layout]}; build prompts with the model's processor (one image-token run per image)"
        )
    grids = [layout[g[0]][1] if len(g) == 1 else (0, 0) for g in imgs]
    return grids, imgs


def grid_place(local: torch.Tensor, tokens: int, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of token ``local`` (an index into one image's ``tokens`` features: leading extra tokens such
    as a kept [CLS], then frames x h x w row-major) in the image's grid; -1 for the extra tokens."""
    h, w = grid
    frames = tokens // (h * w) if h * w else 0
    extra = tokens - frames * h * w
    on = (local >= extra) & (frames > 0)
    g = (local - extra).clamp(min=0)
    neg = torch.full_like(local, -1)
    return torch.where(on, (g // max(w, 1)) % max(h, 1), neg), torch.where(on, g % max(w, 1), neg)
