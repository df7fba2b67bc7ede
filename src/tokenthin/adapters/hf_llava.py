"""LLaVA hosts: ``LlavaForConditionalGeneration`` / ``LlavaModel`` (and look-alikes: a module with
``vision_tower``, ``multi_modal_projector`` and ``language_model``, an ``image_token_id`` in its config) and
LLaVA-NeXT (AnyRes: ``LlavaNextForConditionalGeneration`` / ``LlavaNextModel``). The seams every Hugging Face
vision-language host shares are in :mod:`tokenthin.adapters.hf_vlm`; here are the LLaVA-specific ones: the
projector is ``multi_modal_projector``, the tower is a ViT-like encoder (CLIP, SigLIP) whose
``vision_feature_layer`` the language model reads, and LLaVA-NeXT re-packs its crops (:meth:`token_map`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import TokenThinError, UnsupportedModelError
from .hf_vision import HFVisionAdapter
from .hf_vlm import VLMAdapter
from .hf_vlm_tokens import ImageLayout, TokenMap, grid_place
from .registry import register


@register
class HFLlavaAdapter(VLMAdapter):
    name = "hf_llava"
    priority = 30
    """LLaVA-style host: vision tower -> projector -> image features scattered into the language model's input."""

    families = (
        "Hugging Face LlavaForConditionalGeneration / LlavaModel (CLIP or SigLIP tower, Llama/Mistral/Qwen2 "
        "language model), with generate() and its KV cache"
    )

    def __init__(self, top: nn.Module, root: nn.Module) -> None:
        super().__init__(top, root, root.vision_tower)
        self.projector = root.multi_modal_projector
        vision = HFVisionAdapter.detect(root.vision_tower)
        if vision is None:
            raise UnsupportedModelError(f"cannot read the vision tower {type(root.vision_tower).__name__}")
        self.vision = vision
        self.vision_layers = len(vision.layers)
        layer = getattr(self.config, "vision_feature_layer", -1)
        if not isinstance(layer, int):
            raise UnsupportedModelError(
                f"vision_feature_layer={layer!r}: several feature layers are not supported yet; use one layer"
            )
        n = len(vision.layers)
        # hidden_states[j] is the output of encoder layer j - 1 (index 0: the embeddings)
        self.feature_layer = (layer % (n + 1)) - 1
        if self.feature_layer < 0:
            raise UnsupportedModelError("vision_feature_layer selects the embeddings; nothing to score there")
        strategy = getattr(self.config, "vision_feature_select_strategy", "default")
        self.drops_protected = vision.num_protected if strategy == "default" else 0

    @classmethod
    def detect(cls, model: nn.Module) -> HFLlavaAdapter | None:
        for m in model.modules():
            if not all(isinstance(getattr(m, a, None), nn.Module) for a in ("vision_tower", "language_model")):
                continue
            if not isinstance(getattr(m, "multi_modal_projector", None), nn.Module):
                continue
            cfg = getattr(m, "config", None)
            if cfg is None or not (hasattr(cfg, "image_token_id") or hasattr(cfg, "image_token_index")):
                continue
            return cls(model, m)
        return None

    def layout(self, args: tuple, kwargs: dict[str, Any]) -> ImageLayout:
        pv = kwargs.get("pixel_values", args[0] if args else None)
        assert self.vision is not None and isinstance(pv, torch.Tensor)
        p = self.vision.patch
        grid = (pv.shape[-2] // p[0], pv.shape[-1] // p[1])
        extra = self.vision.num_protected - self.drops_protected
        return [(grid[0] * grid[1] + extra, grid)] * pv.shape[0]


def _row_hash(x: torch.Tensor) -> torch.Tensor:
    """(M, D) -> (M,) int64: an exact function of each row's bits (integer arithmetic, so the same row always gives
    the same value whatever the batch shape; equal rows collide, unequal rows almost never do)."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    bits = x.contiguous().view(ints).long()
    g = torch.Generator().manual_seed(0x70CE)
    coef = (torch.randint(1, 2**62, (x.shape[-1],), generator=g) * 2 + 1).to(x.device)
    return (bits * coef).sum(-1)


def _crop_places(newline: torch.Tensor, view: torch.Tensor, per: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every crop token (``view > 0``) in its image's unpadded grid, the crops tiled: its row is
    the number of row ends since its image's base view began, its column its place inside its row. Other tokens:
    -1. The counts restart at every sample."""
    m = newline.shape[0]
    pos = torch.arange(m, device=newline.device)
    crop = ~newline & (view > 0)
    base = ~newline & (view == 0)
    first = torch.zeros(m, dtype=torch.bool, device=newline.device)
    bounds = torch.tensor([0, *per], device=newline.device).cumsum(0)[:-1]
    first[bounds[bounds < m]] = True
    prev_base = torch.cat([base.new_zeros(1), base[:-1]])
    prev_crop = torch.cat([crop.new_zeros(1), crop[:-1]])
    image_start = torch.cummax(torch.where(first | (base & ~prev_base), pos, 0), 0).values
    ends_before = newline.long().cumsum(0) - newline.long()
    row = ends_before - ends_before[image_start]
    row_start = torch.cummax(torch.where(crop & (first | ~prev_crop), pos, 0), 0).values
    neg = torch.full_like(pos, -1)
    return torch.where(crop, row, neg), torch.where(crop, pos - row_start, neg)


@register
class HFLlavaNextAdapter(HFLlavaAdapter):
    name = "hf_llava_next"
    priority = 40  # a LLaVA look-alike too: tried first
    """LLaVA-NeXT (AnyRes): each image is a base view plus crops; inside its forward the model unpads the crops,
    re-packs them row by row and appends an ``image_newline`` embedding to every row.

    tokenthin maps every image token back to the vision-tower patch it came from by exact identity of its
    projected feature with the projector's output (a bit-exact row hash, then verified), and recognises row-end
    tokens by identity with ``image_newline``. Choice for the row-end tokens: they are structure, not content;
    they are kept (one per row of the crop grid) and never scored or counted in the budget, as in the LLaVA-NeXT
    ports of VisionZip and FasterVLM that prune the visual features and keep the layout tokens. Methods read
    which view a token belongs to (``ReduceInput.view``: 0 the base view, k the k-th crop) and its row and column
    (``ReduceInput.rows`` / ``cols``: in the base view's grid, or for a crop token in the image's unpadded grid,
    the crops tiled; both come from the row ends' places here)."""

    families = (
        "Hugging Face LlavaNextForConditionalGeneration / LlavaNextModel (AnyRes: base view + crops, row-end "
        "newline tokens), with generate() and its KV cache"
    )
    needs_projected = True

    @classmethod
    def detect(cls, model: nn.Module) -> HFLlavaNextAdapter | None:
        for m in model.modules():
            if isinstance(getattr(m, "image_newline", None), nn.Parameter) and hasattr(m, "vision_tower"):
                found = HFLlavaAdapter.detect(m)
                if found is not None:
                    return cls(model, m)
        return None

    def token_map(
        self, rows: torch.Tensor, per: list[int], layout: ImageLayout | None, projected: torch.Tensor | None
    ) -> TokenMap:
        proj = projected
        if proj is None or layout is None:
            raise TokenThinError("internal: the projector's output was not captured")
        n_tok = proj.shape[1]
        src = proj.reshape(-1, proj.shape[-1]).to(rows.dtype)
        newline = (rows == self.root.image_newline.to(rows.dtype)).all(-1)
        hs, order = torch.sort(_row_hash(src))
        hr = _row_hash(rows)
        at = torch.searchsorted(hs, hr).clamp(max=hs.numel() - 1)
        flat = order[at]
        found = (hs[at] == hr) & (src[flat] == rows).all(-1)
        if not bool((found | newline).all()):
            raise TokenThinError(
                "cannot map LLaVA-NeXT's image tokens back to the vision tower's patches (were the image features "
                "changed between the projector and the language model?)"
            )
        flat = torch.where(newline, torch.zeros_like(flat), flat)
        crop = torch.where(newline, torch.full_like(flat, -1), flat // n_tok)
        # a base view fills one contiguous run of n_tok tokens; a crop's tokens are interleaved with other crops'
        pos = torch.arange(rows.shape[0], device=rows.device)
        k = proj.shape[0]
        lo = torch.full((k,), rows.shape[0], device=rows.device).scatter_reduce(
            0, crop.clamp(min=0), torch.where(newline, rows.shape[0], pos), "amin"
        )
        hi = torch.full((k,), -1, device=rows.device).scatter_reduce(
            0, crop.clamp(min=0), torch.where(newline, -1, pos), "amax"
        )
        base = (hi - lo + 1) == n_tok
        base_of = torch.where(newline, -1, torch.where(base[crop.clamp(min=0)], crop, -1))
        base_of = torch.cummax(base_of, 0).values
        view = torch.where(newline, torch.zeros_like(crop), crop - base_of)
        row, col = _crop_places(newline, view, per)
        b_row, b_col = grid_place(flat % n_tok, n_tok, layout[0][1])  # every crop has the base view's grid
        on_base = ~newline & (view == 0)
        row = torch.where(on_base, b_row, row)
        col = torch.where(on_base, b_col, col)
        return TokenMap(flat=flat, newline=newline, view=view, grids=[(0, 0)] * len(per), row=row, col=col)
