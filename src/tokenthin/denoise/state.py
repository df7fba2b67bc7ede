"""Per-call and per-block state of the denoiser runtime, its options and the summary of the last call."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ops.assign import Assignment
from ..ops.soft import SoftPlan
from .fast import RowMerge


@dataclass(frozen=True)
class BlockOptions:
    """What a denoiser application does, resolved from the method's parameters and the budget.

    * ``ratio``: fraction of a chosen block's tokens merged away (tomesd's ``ratio``; ``keep=f`` is ``1 - f``);
      each block call merges ``int(N * ratio)`` of its N tokens, so every latent size works with no size hint;
    * ``max_downsample``: blocks whose level satisfies ``2 ** level <= max_downsample`` are chosen (tomesd);
    * ``blocks``: the chosen block indices (into ``adapter.blocks``); ``site="block:k"`` chooses one;
    * ``parts``: the roles computed on merged tokens in every chosen block (``attn``, ``cross``, ``mlp``);
    * ``mode``: the method's ``block_mode``: ``"merge"`` (merge -> compute -> unmerge by an assignment), ``"kv"``
      (the self-attention's keys / values reduced by an assignment, queries and outputs untouched) or ``"soft"``
      (merge -> compute -> unmerge by a many-to-many :class:`~tokenthin.ops.soft.SoftPlan`);
    * ``reuse_steps``: a soft plan is computed at one denoiser call and reused by the same block for this many
      calls in all (1: planned at every call), as long as the block's input shape does not change;
    * ``soft_tile``: in mode "soft", the method's ``tile`` (its planning cost grows with it), else 0.
    """

    ratio: float
    max_downsample: int
    blocks: tuple[int, ...]
    parts: tuple[str, ...]
    mode: str = "merge"
    reuse_steps: int = 1
    soft_tile: int = 0  # a soft plan's tile side (ToMA's ``tile``), for the planning cost (denoise/cost.py)

    def describe(self) -> str:
        reuse = f" reuse_steps={self.reuse_steps}" if self.mode == "soft" else ""
        return (
            f"site=block ratio={self.ratio} max_downsample={self.max_downsample} parts={','.join(self.parts)} "
            f"blocks={len(self.blocks)} mode={self.mode}{reuse}"
        )


@dataclass
class BlockMerge:
    """One block call's merge: planned from the block's input, used by every chosen part, dropped at its end.
    Either an assignment (``a`` and ``source``: modes "merge" and "kv") or a soft plan (``soft``: mode "soft")."""

    n: int  # tokens entering the block
    a: Assignment | None = None
    source: torch.Tensor | None = None  # (B, N) each token -> its slot
    soft: SoftPlan | None = None
    prefix: int = 0  # tokens before the image tokens in the parts' sequences (the adapter's block_prefix)
    rows: RowMerge | None = None  # the precomputed row plan (None: padding or dropped tokens, the general path)
    memo: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # role -> (input, merged)
    done: set[str] = field(default_factory=set)  # roles whose output was unmerged


@dataclass
class DenoiseCall:
    """The state of one denoiser call (opened by the root's pre-hook, closed by its post-hook)."""

    latent: tuple[int, int]
    batch: int
    step: torch.Tensor  # (B,) float64 timestep values
    active: dict[int, BlockMerge] = field(default_factory=dict)
    blocks: list[int] = field(default_factory=list)
    grids: list[tuple[int, int]] = field(default_factory=list)
    tokens_in: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


@dataclass
class DenoiseInfo:
    """What the last denoiser call did, per chosen block call in the order they ran."""

    latent: tuple[int, int]  # the latent's (H, W)
    blocks: list[int]  # block index (into the adapter's blocks) of each entry
    grids: list[tuple[int, int]]  # the token grid each block saw
    tokens_in: list[int]  # tokens entering each block
    tokens_per_layer: list[int]  # tokens the chosen parts of each block computed on (largest sample)
    parts: tuple[str, ...]  # the roles computed on merged tokens

    @property
    def merged(self) -> list[int]:
        """Tokens merged away in each block."""
        return [a - b for a, b in zip(self.tokens_in, self.tokens_per_layer, strict=True)]
