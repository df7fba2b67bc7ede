"""diffusers UNets: ``UNet2DConditionModel`` (SD 1.x / 2.x / SDXL layouts) and ``UNet2DModel``.

Blocks, in the order the UNet runs them (down blocks, mid block, up blocks):

* ``UNet2DConditionModel``: every ``BasicTransformerBlock`` inside its ``Transformer2DModel`` s (SDXL's several
  blocks per transformer and ``use_linear_projection`` included: the blocks always see (B, N, C) tokens). Parts:
  ``attn`` = ``attn1`` (the whole self-attention module: its ``hidden_states`` argument is merged, its output
  unmerged), ``cross`` = ``attn2`` (its queries merged; the text states untouched), ``mlp`` = ``ff``. This is
  tomesd's patched block exactly: ``x = x + u(attn1(m(norm1(x))))`` etc., with the block's own forward.
* ``UNet2DModel``: every self-attention ``Attention`` module of its attention blocks (``AttnDownBlock2D``,
  ``UNetMidBlock2D``, ``AttnUpBlock2D`` ...), which take a (B, C, H, W) feature map and make tokens inside their
  processor. Part ``attn``: the inputs of ``to_q`` / ``to_k`` / ``to_v`` (the tokens after the module's group norm,
  where it has one) are merged and the output of ``to_out[0]`` is unmerged, so the group norm, the residual
  connection and the output rescale run on every token: ``x + u(out(attn(q(m(gn(x))), k(..), v(..))))``.
  Fused projections (``fuse_qkv_projections()``) bypass these seams and are refused.

Levels: a block's level counts 2x downsamplings from the finest resolution that has blocks (level 0). On SD 1.x /
2.x (attention at the latent's resolution) that is tomesd's ``max_downsample``; on SDXL (no attention at the
latent's resolution) and on ``UNet2DModel`` s whose first attention sits lower, level 0 is that first attention
resolution, not the latent's (tomesd would merge nothing there at ``max_downsample=1``).

Not touched: the attention modules of ``SimpleCrossAttn`` blocks (UnCLIP / Kandinsky: added key/value
projections), which are not ``BasicTransformerBlock`` s and not self-attention on a feature map.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from ..errors import InputMismatchError, UnsupportedModelError
from .contract import hidden_of
from .denoiser import CallGrid, DenoiserAdapter, DenoiserBlock, Part
from .registry import register


def _classes() -> tuple[type, type, type, type]:
    from diffusers import UNet2DConditionModel, UNet2DModel
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention

    return UNet2DConditionModel, UNet2DModel, BasicTransformerBlock, Attention


@register
class DiffusersUNetAdapter(DenoiserAdapter):
    name = "diffusers_unet"
    priority = 10
    families = "diffusers UNet2DConditionModel (SD 1.x / 2.x / SDXL) and UNet2DModel"

    def __init__(self, top: nn.Module, unet: nn.Module) -> None:
        cond_cls, _, btb, attn_cls = _classes()
        self.top = self.root = unet
        self.conditional = isinstance(unet, cond_cls)
        self.family = type(unet).__name__
        names = {m: n for n, m in unet.named_modules()}
        n_down, n_up = len(unet.down_blocks), len(unet.up_blocks)
        groups: list[tuple[int, nn.Module]] = [(j, b) for j, b in enumerate(unet.down_blocks)]
        if unet.mid_block is not None:
            groups.append((n_down - 1, unet.mid_block))
        groups += [(n_up - 1 - j, b) for j, b in enumerate(unet.up_blocks)]
        found: list[tuple[int, nn.Module]] = []
        for depth, group in groups:
            inner: set[nn.Module] = set()
            for m in group.modules():
                if isinstance(m, btb):
                    found.append((depth, m))
                    inner.update(x for x in (m.attn1, m.attn2) if x is not None)
                elif isinstance(m, attn_cls) and m not in inner and _plain_self_attention(m):
                    found.append((depth, m))
        if not found:
            raise UnsupportedModelError(
                f"this {self.family} has no transformer or self-attention blocks: there are no tokens to merge"
            )
        top_depth = min(d for d, _ in found)
        self.blocks = [
            DenoiserBlock(
                module=m,
                name=names[m],
                level=d - top_depth,
                downsample=2**d,
                parts=_transformer_parts(m) if isinstance(m, btb) else _attention_parts(m, names[m]),
                holds="tokens" if isinstance(m, btb) else "channels",
            )
            for d, m in found
        ]

    @classmethod
    def detect(cls, model: nn.Module) -> DiffusersUNetAdapter | None:
        if "diffusers" not in sys.modules:  # a diffusers model cannot exist without it: never import it for others
            return None
        cond_cls, plain_cls, _, _ = _classes()
        if isinstance(model, (cond_cls, plain_cls)):
            return cls(model, model)
        return None

    # ----- the call -----
    def call_grid(self, args: tuple, kwargs: dict[str, Any]) -> CallGrid:
        x = hidden_of(args, kwargs, "sample")
        if x.dim() != 4:
            raise InputMismatchError(f"{self.family} expects a (B, C, H, W) sample, got shape {tuple(x.shape)}")
        return CallGrid(latent=(x.shape[2], x.shape[3]), batch=x.shape[0], x=x)

    def timestep(self, args: tuple, kwargs: dict[str, Any], batch: int) -> torch.Tensor:
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        if t is None:
            raise InputMismatchError(f"{self.family} was called without a timestep")
        v = torch.as_tensor(t).detach().to(device="cpu", dtype=torch.float64).flatten()
        if v.numel() == 1:
            return v.expand(batch)
        if v.numel() != batch:
            raise InputMismatchError(f"{v.numel()} timesteps for a batch of {batch}: give one or one per sample")
        return v

    def block_tokens(self, i: int, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        x = hidden_of(args, kwargs)
        if x.dim() == 4:  # a feature map, made tokens the way the attention processors do
            return x.flatten(2).transpose(1, 2)
        return x


def _plain_self_attention(m: nn.Module) -> bool:
    """A UNet2DModel-style attention: self-attention over a feature map, no added key/value projections."""
    return not m.is_cross_attention and m.added_kv_proj_dim is None and not m.only_cross_attention


def _transformer_parts(b: nn.Module) -> dict[str, Part]:
    parts = {"attn": Part("attn", (b.attn1,), b.attn1, b.attn1, "attn1 on merged normalised tokens")}
    if b.attn2 is not None:
        parts["cross"] = Part("cross", (b.attn2,), b.attn2, b.attn2, "attn2 queries merged; text keys untouched")
    parts["mlp"] = Part("mlp", (b.ff,), b.ff, None, "ff on merged normalised tokens")
    return parts


def _attention_parts(a: nn.Module, name: str) -> dict[str, Part]:
    if a.fused_projections:
        raise UnsupportedModelError(
            f"{name} uses fused q/k/v projections (fuse_qkv_projections()); call unfuse_qkv_projections() first"
        )
    note = "to_q/to_k/to_v inputs merged (after the group norm), to_out[0] output unmerged"
    return {"attn": Part("attn", (a.to_q, a.to_k, a.to_v), a.to_out[0], a, note)}
