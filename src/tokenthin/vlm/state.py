"""Per-call state of the vision-language runtime, passed explicitly to the functions that plan and translate.

* :class:`Call`: one forward of the multimodal model (a prefill or a decoding step);
* :class:`Prefix`: how a cached prompt was shortened, kept with its cache for the decoding steps;
* :class:`Carry`: what hooks outside a call leave for the next prefill (the vision tower's captures, layout and
  projected features: ``generate()`` in transformers 5.24 runs the tower before the multimodal model's forward);
* :class:`VLMInfo`: what the last prefill did (``tokenthin.info``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapters.hf_vlm_tokens import ImageLayout, TokenMap


@dataclass
class VLMInfo:
    """What the last prefill did."""

    site: str
    visual_tokens: list[int]  # visual tokens per sample before (structure tokens such as row ends excluded)
    kept: list[int]  # visual tokens per sample after the last stage
    sequence: tuple[int, int]  # padded sequence length the language model would have read / its last layer read
    source: torch.Tensor  # (B, N_vis) visual token (in prompt order) -> its slot after the last stage, -1 dropped
    size: torch.Tensor  # (B, n_out) original visual tokens per output slot (0: padding)


@dataclass
class Prefix:
    """How a cached prompt was shortened: lets decoding steps translate the caller's mask and positions."""

    t0: int  # prompt length as the caller numbers it
    mask: torch.Tensor  # (B, T1) bool, valid tokens of the prompt as the language model's input holds it
    shift: torch.Tensor | None  # (B,) positions to subtract from the caller's (output site, 1-D rope)
    last_pos: torch.Tensor | None  # (B,) position of the last prompt token after shortening
    deep: dict[int, torch.Tensor] = field(default_factory=dict)  # llm point k -> (B, T') valid tokens after it


@dataclass
class Carry:
    """Captures made outside a call, for the next prefill to pick up."""

    q: dict[int, torch.Tensor] = field(default_factory=dict)  # vision-tower queries / keys by layer
    k: dict[int, torch.Tensor] = field(default_factory=dict)
    layout: ImageLayout | None = None  # of the last vision-tower call
    projected: torch.Tensor | None = None  # the projector's last output, for hosts that re-pack it
    tower_source: torch.Tensor | None = None  # (B_img, N0) tower slot of every patch, after a reduction in the tower


@dataclass
class Call:
    """One forward of the multimodal model. Per prompt position (B, T) tensors follow the current sequence."""

    prefill: bool
    vis: torch.Tensor | None = None  # (B, T) visual tokens (candidates) of the current sequence
    valid: torch.Tensor | None = None  # (B, T) valid tokens of the current sequence
    struct: torch.Tensor | None = None  # (B, T) image-structure tokens (row ends): kept, neither visual nor text
    prefix: Prefix | None = None
    q: dict[int, torch.Tensor] = field(default_factory=dict)  # vision tower captures
    k: dict[int, torch.Tensor] = field(default_factory=dict)
    lm_q: dict[int, torch.Tensor] = field(default_factory=dict)  # language-model captures at llm points
    lm_k: dict[int, torch.Tensor] = field(default_factory=dict)
    pos_emb: dict[int, Any] = field(default_factory=dict)  # rotary embeddings each llm point's layer applied
    tm: TokenMap | None = None  # of the prompt's image tokens
    flat: torch.Tensor | None = None  # (B, T) vision-tower token index per prompt position (output stage)
    view: torch.Tensor | None = None  # (B, T) AnyRes view per prompt position
    rows: torch.Tensor | None = None  # (B, T) row / column of each image token in its view's grid (-1: none)
    cols: torch.Tensor | None = None
    vis_pos: torch.Tensor | None = None  # (B, N) sequence position of each visual token the method sees
    gather: torch.Tensor | None = None  # (B, T') positions in the language model's input that deep layers hold
    src: torch.Tensor | None = None  # (B, N_vis) original visual token -> current visual slot, -1 dropped
    size: torch.Tensor | None = None  # (B, n) sizes of the current visual slots
    n_vis: list[int] = field(default_factory=list)
    n_in: torch.Tensor | None = None  # (B,) visual tokens entering the language model
    t0: int = 0
    info: VLMInfo | None = None
