"""diffusers class-conditional and text-conditional diffusion transformers over a patchified latent:
``DiTTransformer2DModel`` (DiT: ``BasicTransformerBlock`` s with ``ada_norm_zero``) and
``PixArtTransformer2DModel`` (PixArt-alpha / -sigma: ``ada_norm_single``, cross-attention to the text).

Tokens: the latent (B, C, H, W) is cut into ``patch_size`` x ``patch_size`` patches, one token each, an
``H / p`` x ``W / p`` raster grid (every block sees the same grid: one level, level 0, downsample ``p``); no
[CLS], no registers. Blocks: every ``BasicTransformerBlock`` of ``transformer_blocks``, in order. Parts, as on the
UNet host (tomesd's patched block, with the block's own forward):

* ``attn`` = ``attn1``: its input, the block's normalised and ada-modulated tokens (``norm1`` then shift / scale:
  ``ada_norm_zero`` modulates inside ``norm1``, ``ada_norm_single`` after it) is merged; self-attention runs on the
  merged tokens (queries, keys and values); its output is unmerged before the gate (``gate_msa``) and the residual,
  which run on every token: ``x + gate * u(attn1(m(mod(norm1(x)))))``;
* ``cross`` = ``attn2`` (PixArt only): its queries (the block's tokens, PixArt applies no norm before it) are
  merged, the text keys and values untouched; output unmerged before the residual;
* ``mlp`` = ``ff``: the modulated ``norm2`` (PixArt) / ``norm3`` (DiT) tokens merged, output unmerged before the
  gate and residual.

Everything else (patch embedding, timestep / class / caption embeddings, the norms and their modulation, gates,
residuals, the final norm and unpatchify) runs on every token. The attention processor (SDPA or eager) is untouched.
Refused: PixArt's self-attention ``attention_mask=`` over image tokens (it cannot follow merged tokens; the
pipelines pass none), fused q/k/v projections and chunked feed-forward (errors at the first call).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from ..errors import InputMismatchError
from .contract import hidden_of
from .denoiser import CallGrid, DenoiserAdapter, DenoiserBlock
from .diffusers_unet import _transformer_parts
from .registry import register


def _classes() -> tuple[type, type]:
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    return DiTTransformer2DModel, PixArtTransformer2DModel


def call_timestep(t: Any, batch: int, family: str) -> torch.Tensor:
    """(B,) float64 timestep values of a denoiser call from its ``timestep`` argument (a scalar is broadcast)."""
    if t is None:
        raise InputMismatchError(f"{family} was called without a timestep")
    v = torch.as_tensor(t).detach().to(device="cpu", dtype=torch.float64).flatten()
    if v.numel() == 1:
        return v.expand(batch)
    if v.numel() != batch:
        raise InputMismatchError(f"{v.numel()} timesteps for a batch of {batch}: give one or one per sample")
    return v


def arg(args: tuple, kwargs: dict[str, Any], pos: int, name: str) -> Any:
    """A call argument given by position ``pos`` or keyword ``name`` (None when absent)."""
    return args[pos] if len(args) > pos else kwargs.get(name)


@register
class DiffusersDiTAdapter(DenoiserAdapter):
    name = "diffusers_dit"
    priority = 10
    families = "diffusers DiTTransformer2DModel (DiT) and PixArtTransformer2DModel (PixArt-alpha / -sigma)"

    def __init__(self, model: nn.Module) -> None:
        dit_cls, _ = _classes()
        self.top = self.root = model
        self.family = type(model).__name__
        self.patch = int(model.config.patch_size)
        self._timestep_pos = 1 if isinstance(model, dit_cls) else 2  # DiT: (x, t, y); PixArt: (x, text, t, ...)
        names = {m: n for n, m in model.named_modules()}
        self.blocks = [
            DenoiserBlock(module=b, name=names[b], level=0, downsample=self.patch, parts=_transformer_parts(b))
            for b in model.transformer_blocks
        ]

    @classmethod
    def detect(cls, model: nn.Module) -> DiffusersDiTAdapter | None:
        if "diffusers" not in sys.modules:  # a diffusers model cannot exist without it: never import it for others
            return None
        return cls(model) if isinstance(model, _classes()) else None

    def call_grid(self, args: tuple, kwargs: dict[str, Any]) -> CallGrid:
        x = hidden_of(args, kwargs)
        if x.dim() != 4:
            raise InputMismatchError(f"{self.family} expects a (B, C, H, W) latent, got shape {tuple(x.shape)}")
        if self._timestep_pos == 2 and arg(args, kwargs, 5, "attention_mask") is not None:
            raise InputMismatchError(
                f"{self.family}'s self-attention mask (attention_mask=) covers every image token and cannot follow "
                "merged tokens; drop it (the PixArt pipelines pass none; encoder_attention_mask= is fine)"
            )
        return CallGrid(latent=(x.shape[2], x.shape[3]), batch=x.shape[0], x=x)

    def timestep(self, args: tuple, kwargs: dict[str, Any], batch: int) -> torch.Tensor:
        return call_timestep(arg(args, kwargs, self._timestep_pos, "timestep"), batch, self.family)

    def block_tokens(self, i: int, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        return hidden_of(args, kwargs)
