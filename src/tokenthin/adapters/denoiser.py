"""The denoiser host contract: what a diffusion denoiser (a UNet, a diffusion transformer) declares about its seams.

An encoder carries one token stream through every layer. A denoiser does not: each transformer block sees its own
token set (a UNet's blocks at 64x64, 32x32, 16x16 ... latent grids; text tokens apart), and a block-local method
(tomesd) merges tokens inside a block and unmerges them before the block returns. So a denoiser host declares:

* **the call**: :attr:`DenoiserAdapter.root` (the denoiser; its pre-hook opens a call, its post-hook closes it),
  :meth:`DenoiserAdapter.call_grid` (the latent's size and the batch from the call's ``sample`` / ``hidden_states``)
  and :meth:`DenoiserAdapter.timestep` ((B,) per-sample timestep values, which seed a method's randomness so that
  a sample's result does not depend on its batch: classifier-free guidance batches equal separate runs);
* **the blocks**: :attr:`DenoiserAdapter.blocks`, ordered :class:`DenoiserBlock` records. Each names its module
  (whose input hidden states are the merge metric, tomesd's choice), its ``level`` (0: the finest resolution that
  carries tokens; ``max_downsample`` selects blocks with ``2 ** level <= max_downsample``), its ``downsample``
  factor from the latent, how its input holds tokens (``"tokens"``: (B, N, C); ``"channels"``: (B, C, H, W)),
  and its :class:`Part` s;
* **the parts** of a block that may compute on merged tokens, by role: ``"attn"`` (self-attention), ``"cross"``
  (cross-attention: queries merged, the text keys untouched), ``"mlp"`` (feed-forward). A part is a pair of seams:
  the first tensor argument of each ``enter`` module is merged (forward pre-hooks; a later ``enter`` module merges
  only the very tensor the first one received, e.g. ``to_k`` / ``to_v`` of self-attention, never text states),
  and the output of ``exit`` is unmerged (a forward hook). For a residual block ``x + f(norm(x))`` this is
  tomesd's ``x + unmerge(f(merge(norm(x))))`` with no copied forward body and the host's attention processor
  (SDPA or eager) untouched. ``attention`` is the part's attention module (diffusers ``Attention``: ``to_q``,
  ``to_k``, ``to_v``, ``to_out``, ``heads``) for methods that act on keys / values only (ToDo: the runtime reduces
  the inputs of :meth:`DenoiserAdapter.kv_inputs`, by default ``to_k`` / ``to_v``) or need the heads.
  A block's parts are keyed by name: the role, except where a block has two parts of one role (SD3.5's second
  self-attention, key ``"attn2"``, role ``"attn"``); a role chosen by the options selects every part that has it;
* **joint sequences** (diffusion transformers with text and image tokens in one sequence): where a block's parts
  see a sequence whose first :meth:`DenoiserAdapter.block_prefix` tokens are not image tokens (Flux's single-stream
  blocks: text first), only the image tokens after that prefix are merged and unmerged, the prefix passes through;
  :meth:`DenoiserAdapter.enter_args` may rewrite an ``enter`` module's other per-token inputs for the merged
  tokens (Flux: the rotary embedding follows each merged slot's kept token), and
  :meth:`DenoiserAdapter.part_seams` may add seams a part needs besides its hooks (an attention-processor wrapper),
  each removed exactly with the rest;
* **grids**: :meth:`DenoiserAdapter.block_grid` is the (h, w) token grid block i sees for a call, exact for odd
  latent sizes (checked against the block's actual token count).

The runtime (:mod:`tokenthin.denoise`) computes one assignment per block call (from the block's input tokens, a
method's plan as in :mod:`tokenthin.ops.assign`), merges at every chosen part's entry, unmerges at its exit, and
forgets it when the block returns. Nothing else in the model changes. A host file implements ``detect``,
``root``, ``blocks``, ``call_grid``, ``timestep`` and ``block_tokens``; the rest (``block_prefix``,
``enter_args``, ``part_seams``, ``block_grid``) has defaults here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ..errors import InputMismatchError, UnsupportedModelError
from .contract import Adapter

__all__ = ["PART_ROLES", "CallGrid", "DenoiserAdapter", "DenoiserBlock", "Part", "denoiser_of"]

PART_ROLES = ("attn", "cross", "mlp")  # the roles a block's parts may have, in the order they run


@dataclass(frozen=True)
class Part:
    """A sub-computation of a block that may run on merged image tokens (see the module docstring)."""

    role: str  # "attn" | "cross" | "mlp"
    enter: tuple[nn.Module, ...]  # their first input, (B, N, C) image tokens, is merged
    exit: nn.Module  # its output, (B, N', C), is unmerged to (B, N, C)
    attention: nn.Module | None = None  # the attention module of an attention part (q/k/v/out projections, heads)
    note: str = ""  # what exactly runs on merged tokens, for explain()


@dataclass(frozen=True)
class DenoiserBlock:
    """One token-carrying block of a denoiser."""

    module: nn.Module  # its pre-hook reads the block's input tokens (the metric); its post-hook ends the block
    name: str  # the module's name in the denoiser, for explain()
    level: int  # 0: the finest token-carrying resolution; each downsampling adds 1
    downsample: int  # latent pixels per token side at this block (2 ** levels below the latent)
    parts: Mapping[str, Part]  # name (the role, or e.g. "attn2" for a second part of a role) -> part
    holds: Literal["tokens", "channels"] = "tokens"  # input (B, N, C) tokens, or a (B, C, H, W) feature map


@dataclass(frozen=True)
class CallGrid:
    """The latent a denoiser call is fed: its (height, width), the batch size and the input tensor."""

    latent: tuple[int, int]
    batch: int
    x: torch.Tensor


class DenoiserAdapter(Adapter):
    """A denoiser host family (runtime kind ``"denoiser"``, site ``"block"``, signal ``"keys"``: a block's input
    tokens stand in for keys, as in tomesd; attention signals do not exist before a block runs)."""

    kind: ClassVar[str] = "denoiser"
    sites: ClassVar[frozenset[str]] = frozenset({"block"})
    signals: ClassVar[frozenset[str]] = frozenset({"keys"})
    # the methods' block modes this host takes ("merge", "kv": reduced keys / values only, "soft": many-to-many),
    # and why a mode is missing (support() and apply() say it)
    block_modes: ClassVar[frozenset[str]] = frozenset({"merge", "kv", "soft"})
    block_modes_note: ClassVar[str] = ""
    num_protected = 0  # no [CLS]: every image token may be merged

    root: nn.Module
    blocks: list[DenoiserBlock]

    @property
    def layers(self) -> list[nn.Module]:  # type: ignore[override]  # the Adapter view: the blocks' modules
        return [b.module for b in self.blocks]

    # ----- the call -----
    def call_grid(self, args: tuple, kwargs: dict[str, Any]) -> CallGrid:
        """The latent's (H, W), the batch size and the input tensor of a denoiser call."""
        raise NotImplementedError

    def timestep(self, args: tuple, kwargs: dict[str, Any], batch: int) -> torch.Tensor:
        """(B,) float64 per-sample timestep values of a call (a scalar is broadcast over the batch)."""
        raise NotImplementedError

    # ----- the blocks -----
    def block_tokens(self, i: int, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        """Block i's input hidden states as (B, N, C) tokens (the merge metric)."""
        raise NotImplementedError

    def block_prefix(self, i: int, args: tuple, kwargs: dict[str, Any]) -> int:
        """How many tokens precede block i's image tokens in the sequences its parts' ``enter`` modules receive
        and their ``exit`` modules return (text tokens of a joint sequence; they are never merged). 0: the parts
        see image tokens only (every UNet, DiT, PixArt, SD3 and Flux's double-stream blocks)."""
        return 0

    def enter_args(
        self, i: int, args: tuple, kwargs: dict[str, Any], x: torch.Tensor, slots: torch.Tensor | None
    ) -> tuple[tuple, dict[str, Any]]:
        """An ``enter`` module's call arguments with its tokens replaced by the merged ``x`` (prefix included).
        ``slots`` (B, N') is the block-input image token that each merged slot keeps (its representative), for
        per-token side inputs that must follow the merge (rotary position embeddings); None for a soft plan whose
        merged tokens are not built around one token each; default: ``x`` only."""
        return self.with_layer_input(args, kwargs, x)

    def part_seams(self, i: int, key: str, part: Part) -> list[Any]:
        """Seams part ``key`` of block i needs besides its hooks (e.g. an attention-processor wrapper), installed
        when the part is chosen; each returned handle's ``remove()`` restores the model exactly."""
        return []

    def level(self, i: int) -> int:
        return self.blocks[i].level

    def parts(self, i: int) -> Mapping[str, Part]:
        return self.blocks[i].parts

    def kv_inputs(self, part: Part) -> tuple[nn.Module, ...]:
        """The modules whose first input is an attention part's key / value tokens (block mode ``"kv"``, ToDo):
        diffusers ``Attention``'s ``to_k`` and ``to_v``, fed the same (B, N, C) tensor in self-attention."""
        if part.attention is None:
            raise UnsupportedModelError(f"the {part.role} part has no attention module: its keys cannot be reduced")
        return (part.attention.to_k, part.attention.to_v)

    def block_grid(self, i: int, latent: tuple[int, int], n: int) -> tuple[int, int]:
        """The (h, w) token grid of block i for a latent of size ``latent`` whose input has ``n`` tokens:
        ``ceil(H / d) x ceil(W / d)`` (stride-2 convolutions with padding 1 round up) for the block's downsample
        factor ``d``; where that does not match ``n`` (another downsampler), the factorisation of ``n`` closest to
        the latent's aspect ratio."""
        d = self.blocks[i].downsample
        h, w = math.ceil(latent[0] / d), math.ceil(latent[1] / d)
        if h * w == n:
            return h, w
        h, w = latent[0] // d, latent[1] // d
        if h * w == n:
            return h, w
        aspect = latent[0] / max(latent[1], 1)
        best = None
        for hh in range(1, n + 1):
            if n % hh == 0:
                err = abs(math.log(hh / (n // hh) / aspect))
                if best is None or err < best[0]:
                    best = (err, hh)
        if best is None:
            raise InputMismatchError(f"block {self.blocks[i].name} holds {n} tokens, no grid for a {latent} latent")
        return best[1], n // best[1]

    # ----- explain() -----
    @property
    def num_layers_reduced(self) -> int:
        return len(self.blocks)

    def site_names(self) -> list[str]:
        return ["block", *(f"block:{i}" for i in range(len(self.blocks)))]

    def touched(self) -> list[str]:
        names = {m: n for n, m in self.top.named_modules()}
        out = [f"{names.get(self.root) or type(self.root).__name__} (pre/post hooks: open and close a call)"]
        for b in self.blocks:
            out.append(f"{b.name} (pre-hook: plan the merge from its input tokens; post-hook: forget it)")
            for p in b.parts.values():
                enter = ", ".join(names.get(m, "?") for m in p.enter)
                out.append(f"{enter} -> {names.get(p.exit, '?')} ({p.role}: merge in, unmerge out)")
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "blocks": [
                {"name": b.name, "level": b.level, "downsample": b.downsample, "parts": sorted(b.parts)}
                for b in self.blocks
            ],
            "levels": sorted({b.level for b in self.blocks}),
        }


def denoiser_of(obj: object) -> nn.Module | None:
    """The denoiser of a whole diffusion pipeline (an object that is not a module, with a ``unet`` or
    ``transformer`` module), else None. Duck-typed: diffusers is never imported."""
    if isinstance(obj, nn.Module):
        return None
    for attr in ("unet", "transformer"):
        m = getattr(obj, attr, None)
        if isinstance(m, nn.Module):
            return m
    return None
