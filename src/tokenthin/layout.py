"""The typed token layout that hosts produce and methods read (see :mod:`tokenthin.adapters.contract`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch


@dataclass(frozen=True)
class View:
    """One view of an image inside a multi-view layout (AnyRes: the base image and its crops)."""

    grid: tuple[int, int]  # (rows, cols) of this view's tokens
    region: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)  # (top, left, bottom, right) in the image, 0..1


@dataclass(frozen=True)
class Layout:
    """Where the tokens of one call sit, as methods read it. Tokens are ``protected`` leading tokens (never merged or
    dropped) followed by the content tokens: ``frames`` x ``grid`` rows x cols, row-major.

    * ``kind="grid"``: image patches on a 2-D grid;
    * ``kind="sequence"``: a 1-D sequence (audio frames, text tokens) as a grid of one row, ``grid == (1, n)``, so
      grid methods (pooling windows, neighbourhoods) work on it unchanged;
    * ``padding``: (B, protected + n) True where a token is real input (False: the caller's padding, e.g. text
      padding or audio silence); None when every token is real. Padding tokens are never kept as content.
    * ``views``: for a multi-view image (AnyRes), the views in token order; empty for a single view.
    * ``cls``: the first protected token is a [CLS] token whose attention methods may read (False where the
      protected tokens are registers only, e.g. a timm ViT without a class token).
    """

    protected: int
    grid: tuple[int, int]
    kind: Literal["grid", "sequence"] = "grid"
    frames: int = 1
    padding: torch.Tensor | None = None
    views: tuple[View, ...] = field(default_factory=tuple)
    cls: bool = True

    @property
    def content(self) -> int:
        """Content (non-protected) tokens."""
        return self.frames * self.grid[0] * self.grid[1]

    @property
    def tokens(self) -> int:
        return self.protected + self.content

    @staticmethod
    def sequence(protected: int, n: int, padding: torch.Tensor | None = None) -> Layout:
        return Layout(protected=protected, grid=(1, n), kind="sequence", padding=padding)
