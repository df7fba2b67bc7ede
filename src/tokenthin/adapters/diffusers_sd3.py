"""diffusers ``SD3Transformer2DModel`` (Stable Diffusion 3 / 3.5 MMDiT): joint attention over image and text
tokens; image tokens are reduced, text tokens never.

Tokens: the latent (B, C, H, W) patchified into an ``H / p`` x ``W / p`` raster grid of image tokens (one level,
level 0, downsample ``p``); the text tokens (``encoder_hidden_states``) are a separate stream. Blocks: every
``JointTransformerBlock`` in ``transformer_blocks`` (the last one has ``context_pre_only``: its text stream ends
there; skipped layers, ``skip_layers=``, are not called and so not merged). Parts, all through forward hooks on the
block's own sub-modules (no copied forward, the block's ``JointAttnProcessor2_0`` untouched):

* ``attn`` = ``attn``: the joint attention module's image input (``hidden_states``: the block's ``norm1`` output,
  ada-modulated) is merged, so the image queries, keys and values (``to_q`` / ``to_k`` / ``to_v`` and the q/k
  norms) are computed for the merged tokens, concatenated with the text's (``add_q_proj`` ...: every text token)
  and attended jointly: image and text queries both see the merged image keys (no proportional attention, as in
  tomesd). Of the module's (image, text) output the image part (after ``to_out``) is unmerged; the text part is
  returned as computed, one row per text token. The gate, the residual and the text stream's own norm, gate,
  feed-forward and residual run on every token;
* ``attn2`` (role ``attn``, SD3.5's dual-attention layers): the second, image-only self-attention, its input
  (``norm1``'s second modulated output) merged with the same assignment and its output unmerged;
* ``mlp`` = ``ff``: the image stream's modulated ``norm2`` tokens merged, output unmerged before gate and residual
  (``ff_context``, the text feed-forward, is untouched).

There is no cross-attention part (the text is in the joint attention). Everything else (patch and position
embeddings, timestep / pooled-text embeddings, the text embedder, norms, gates, residuals, the output norm and
unpatchify) runs on every token. Refused: fused q/k/v projections and chunked feed-forward (errors at the first
call).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from ..errors import InputMismatchError
from .contract import hidden_of
from .denoiser import CallGrid, DenoiserAdapter, DenoiserBlock, Part
from .diffusers_dit import arg, call_timestep
from .registry import register


def _sd3_class() -> type:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel


def _parts(b: nn.Module) -> dict[str, Part]:
    note = "image q/k/v from merged tokens, joint attention with every text token; image output unmerged"
    parts = {"attn": Part("attn", (b.attn,), b.attn, b.attn, note)}
    if b.attn2 is not None:
        parts["attn2"] = Part("attn", (b.attn2,), b.attn2, b.attn2, "SD3.5's image self-attention on merged tokens")
    parts["mlp"] = Part("mlp", (b.ff,), b.ff, None, "image ff on merged modulated tokens (ff_context untouched)")
    return parts


@register
class DiffusersSD3Adapter(DenoiserAdapter):
    name = "diffusers_sd3"
    priority = 10
    families = "diffusers SD3Transformer2DModel (Stable Diffusion 3 / 3.5; image tokens only)"

    def __init__(self, model: nn.Module) -> None:
        self.top = self.root = model
        self.family = type(model).__name__
        self.patch = int(model.config.patch_size)
        names = {m: n for n, m in model.named_modules()}
        self.blocks = [
            DenoiserBlock(module=b, name=names[b], level=0, downsample=self.patch, parts=_parts(b))
            for b in model.transformer_blocks
        ]

    @classmethod
    def detect(cls, model: nn.Module) -> DiffusersSD3Adapter | None:
        if "diffusers" not in sys.modules:  # a diffusers model cannot exist without it: never import it for others
            return None
        return cls(model) if isinstance(model, _sd3_class()) else None

    def call_grid(self, args: tuple, kwargs: dict[str, Any]) -> CallGrid:
        x = hidden_of(args, kwargs)
        if x.dim() != 4:
            raise InputMismatchError(f"{self.family} expects a (B, C, H, W) latent, got shape {tuple(x.shape)}")
        return CallGrid(latent=(x.shape[2], x.shape[3]), batch=x.shape[0], x=x)

    def timestep(self, args: tuple, kwargs: dict[str, Any], batch: int) -> torch.Tensor:
        # forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, ...)
        return call_timestep(arg(args, kwargs, 3, "timestep"), batch, self.family)

    def block_tokens(self, i: int, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        return hidden_of(args, kwargs)  # the image stream (the block is called with hidden_states=)
