"""diffusers ``FluxTransformer2DModel`` (FLUX.1): double-stream blocks (``FluxTransformerBlock``: joint attention
over separate image and text streams) and single-stream blocks (``FluxSingleTransformerBlock``: one sequence, text
first, then image), with rotary position embeddings per token. Image tokens are reduced, text tokens never.

Tokens: Flux is fed packed latents (B, N, C), one token per 2x2 latent patch, and ``img_ids`` (N, 3) with each
token's (0, row, column); when the ids are an h x w raster in row-major order the token grid is (h, w), else (e.g.
Kontext's concatenated reference image) the factorisation of N closest to square (grid-based methods then see an
approximate grid). One level (level 0, downsample 1); ``DenoiseInfo.latent`` is that token grid. Blocks: the
double-stream blocks, then the single-stream blocks. Parts (forward hooks on the blocks' own sub-modules; no copied
forward):

* double-stream ``attn`` = ``attn``: the image input (``norm1``'s modulated tokens) is merged, so the image q/k/v
  projections and q/k norms run on merged tokens, which are concatenated after every text token's q/k/v
  (``add_q_proj`` ...) and attended jointly; the image output (after ``to_out``) is unmerged, the text output
  returned as computed (one row per text token). ``mlp`` = ``ff`` (image stream only; ``ff_context`` untouched);
* single-stream ``attn`` (the block's attention and MLP run side by side from one input into one output
  projection, so they form one part, role ``attn``; ``merge_mlp`` adds nothing there): the image slice of the
  modulated joint sequence (``norm`` output after the text tokens) is merged where it enters ``proj_mlp`` and
  ``attn``, the text slice passes through; ``proj_mlp`` + GELU, the attention and ``proj_out`` run on
  text + merged image tokens, and the image slice of ``proj_out``'s output is unmerged before the gate and the
  residual, which run on every token.

Rotary embeddings: a merged slot keeps the rotary row of its kept token (the destination of tomesd / ToMe, the
kept token of a prune: ``Assignment.slot_src``); merged-in sources lose their own positions, as their values are
averaged in. Text rows are unchanged. Because diffusers' ``apply_rotary_emb`` takes one (S, D) table for the whole
batch, the chosen attention modules' processor is wrapped (:class:`SlotRotaryProcessor`, set with
``set_processor`` and the original object restored on ``remove()``): a call with merged image tokens runs the
original processor once per group of samples that keep the same image tokens (batch 1 and identical plans: one
call; otherwise sample by sample, which costs parallelism, not FLOPs), each with its own rotary rows; any other call
goes straight through. Only the stock ``FluxAttnProcessor`` is wrapped (IP-Adapter processors are refused), and an
attention mask over merged tokens is refused. Everything else (embedders, timestep / guidance / pooled-text
embeddings, norms, gates, residuals, the output norm and projection, ControlNet residuals) runs on every token.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InputMismatchError, TokenThinError, UnsupportedModelError
from .contract import hidden_of
from .denoiser import CallGrid, DenoiserAdapter, DenoiserBlock, Part
from .diffusers_dit import arg, call_timestep
from .registry import register


def _classes() -> tuple[type, type, type]:
    from diffusers import FluxTransformer2DModel
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxSingleTransformerBlock

    return FluxTransformer2DModel, FluxSingleTransformerBlock, FluxAttnProcessor


@dataclass(frozen=True)
class SlotRotary:
    """The rotary table of a joint sequence whose image tokens were merged (handed to the processor instead of
    the (cos, sin) pair): the call's full table, the text rows before the image rows, and each merged slot's kept
    image token per sample."""

    cos: torch.Tensor  # (text + N, D)
    sin: torch.Tensor
    text: int
    slots: torch.Tensor  # (B, N')

    def rows(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (cos, sin) rows of the text tokens, then of the slots' kept image tokens ``kept`` (N',)."""
        idx = torch.cat([torch.arange(self.text, device=kept.device), kept + self.text])
        idx = idx.to(self.cos.device)
        return self.cos.index_select(0, idx), self.sin.index_select(0, idx)


class SlotRotaryProcessor:
    """Wraps a Flux attention processor so that it can take a :class:`SlotRotary` (see the module docstring)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    # diffusers' attention backends are set on the processor object: forward them to the wrapped one
    @property
    def _attention_backend(self) -> Any:
        return self.inner._attention_backend

    @_attention_backend.setter
    def _attention_backend(self, v: Any) -> None:
        self.inner._attention_backend = v

    @property
    def _parallel_config(self) -> Any:
        return self.inner._parallel_config

    @_parallel_config.setter
    def _parallel_config(self, v: Any) -> None:
        self.inner._parallel_config = v

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> Any:
        rot = image_rotary_emb
        if not isinstance(rot, SlotRotary):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rot)
        if attention_mask is not None:
            raise TokenThinError(
                "an attention mask covers every image token and cannot follow merged tokens; drop it or remove "
                "tokenthin from this Flux transformer"
            )
        s = rot.slots
        if s.shape[0] == 1 or bool((s == s[:1]).all()):
            return self.inner(attn, hidden_states, encoder_hidden_states, None, rot.rows(s[0]))
        uniq, inv = torch.unique(s, dim=0, return_inverse=True)
        outs, order = [], []
        for g in range(uniq.shape[0]):
            idx = (inv == g).nonzero().squeeze(1)
            text = None if encoder_hidden_states is None else encoder_hidden_states[idx]
            o = self.inner(attn, hidden_states[idx], text, None, rot.rows(uniq[g]))
            outs.append(o if isinstance(o, tuple) else (o,))
            order.append(idx)
        back = torch.argsort(torch.cat(order))
        res = tuple(torch.cat([o[k] for o in outs])[back] for k in range(len(outs[0])))
        return res if len(res) > 1 else res[0]


class _Restore:
    """Puts an attention module's original processor object back."""

    def __init__(self, attn: nn.Module, original: Any) -> None:
        self.attn, self.original = attn, original

    def remove(self) -> None:
        if isinstance(self.attn.processor, SlotRotaryProcessor):
            self.attn.set_processor(self.original)


def _parts(b: nn.Module, single: bool) -> dict[str, Part]:
    if single:
        note = "image slice of the joint sequence merged into proj_mlp and attn (rotary of kept tokens); proj_out's"
        return {"attn": Part("attn", (b.proj_mlp, b.attn), b.proj_out, b.attn, note + " image slice unmerged")}
    note = "image q/k/v from merged tokens (rotary of kept tokens), joint attention with every text token"
    return {
        "attn": Part("attn", (b.attn,), b.attn, b.attn, note),
        "mlp": Part("mlp", (b.ff,), b.ff, None, "image ff on merged modulated tokens (ff_context untouched)"),
    }


def _squarest(n: int) -> tuple[int, int]:
    h = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return h, n // h


@register
class DiffusersFluxAdapter(DenoiserAdapter):
    name = "diffusers_flux"
    priority = 10
    # ToDo's reduced keys would need their own rotary rows inside the joint attention: not wrapped
    block_modes = frozenset({"merge", "soft"})
    block_modes_note = "reduced keys / values would need their own rotary rows in the joint attention"
    families = "diffusers FluxTransformer2DModel (FLUX.1; image tokens only)"

    def __init__(self, model: nn.Module) -> None:
        self.top = self.root = model
        self.family = type(model).__name__
        names = {m: n for n, m in model.named_modules()}
        blocks = [(b, False) for b in model.transformer_blocks] + [(b, True) for b in model.single_transformer_blocks]
        self.single = [s for _, s in blocks]
        self.blocks = [
            DenoiserBlock(module=b, name=names[b], level=0, downsample=1, parts=_parts(b, s)) for b, s in blocks
        ]

    @classmethod
    def detect(cls, model: nn.Module) -> DiffusersFluxAdapter | None:
        if "diffusers" not in sys.modules:  # a diffusers model cannot exist without it: never import it for others
            return None
        return cls(model) if isinstance(model, _classes()[0]) else None

    def call_grid(self, args: tuple, kwargs: dict[str, Any]) -> CallGrid:
        x = hidden_of(args, kwargs)
        if x.dim() != 3:
            raise InputMismatchError(f"{self.family} expects packed (B, N, C) latents, got shape {tuple(x.shape)}")
        n = x.shape[1]
        ids = arg(args, kwargs, 4, "img_ids")
        grid = _squarest(n)
        if isinstance(ids, torch.Tensor):
            ids = (ids[0] if ids.dim() == 3 else ids).detach().to("cpu", torch.long)
            if ids.shape[0] == n and n:
                h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
                pos = torch.arange(n)
                if h * w == n and torch.equal(ids[:, 1], pos // w) and torch.equal(ids[:, 2], pos % w):
                    grid = (h, w)
        return CallGrid(latent=grid, batch=x.shape[0], x=x)

    def timestep(self, args: tuple, kwargs: dict[str, Any], batch: int) -> torch.Tensor:
        # forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, ...)
        return call_timestep(arg(args, kwargs, 3, "timestep"), batch, self.family)

    def block_tokens(self, i: int, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        return hidden_of(args, kwargs)  # the image tokens (both block kinds take hidden_states= and text apart)

    def block_prefix(self, i: int, args: tuple, kwargs: dict[str, Any]) -> int:
        if not self.single[i]:
            return 0
        return int(arg(args, kwargs, 1, "encoder_hidden_states").shape[1])  # text first in the joint sequence

    def enter_args(
        self, i: int, args: tuple, kwargs: dict[str, Any], x: torch.Tensor, slots: torch.Tensor | None
    ) -> tuple[tuple, dict[str, Any]]:
        args, kwargs = self.with_layer_input(args, kwargs, x)
        rot = kwargs.get("image_rotary_emb")
        if rot is None:  # a feed-forward or the MLP projection: tokens only
            return args, kwargs
        if not isinstance(self.blocks[i].parts["attn"].attention.processor, SlotRotaryProcessor):
            raise TokenThinError(
                f"the attention processor of {self.blocks[i].name} was replaced after tokenthin.apply(); set "
                "processors first, then apply"
            )
        text = kwargs["encoder_hidden_states"].shape[1] if kwargs.get("encoder_hidden_states") is not None else None
        if text is None:  # single-stream: the text is the prefix of x
            text = x.shape[1] - slots.shape[1]
        if slots is None:
            raise TokenThinError(
                f"{self.blocks[i].name}: this method's merged tokens are not built around one image token each, so "
                "they have no rotary position; use a method whose slots keep a token (tomesd, tome, toma, pool)"
            )
        cos, sin = rot
        return args, {**kwargs, "image_rotary_emb": SlotRotary(cos, sin, text, slots)}

    def touched(self) -> list[str]:
        out = super().touched()
        for b in self.blocks:
            out.append(f"{b.name}.attn.processor (wrapped while applied: rotary rows of merged tokens)")
        return out

    def part_seams(self, i: int, key: str, part: Part) -> list[Any]:
        attn = part.attention
        if attn is None:
            return []
        proc_cls = _classes()[2]
        if type(attn.processor) is not proc_cls:
            raise UnsupportedModelError(
                f"{self.blocks[i].name}.attn uses {type(attn.processor).__name__}; tokenthin wraps only the stock "
                "FluxAttnProcessor (merged tokens need their rotary rows): unload IP-Adapters or custom processors"
            )
        original = attn.processor
        attn.set_processor(SlotRotaryProcessor(original))
        return [_Restore(attn, original)]
