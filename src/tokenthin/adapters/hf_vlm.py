"""Hugging Face vision-language models whose language model reads the visual tokens in its own sequence:
``LlavaForConditionalGeneration`` / ``LlavaModel`` (and look-alikes: a module with ``vision_tower``,
``multi_modal_projector`` and ``language_model``, an ``image_token_id`` in its config), and
``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration`` (``visual`` + ``language_model``,
multimodal rotary positions).

The adapter only says where things are; :mod:`tokenthin.vlm` does the work. Seams (transformers 4.57 - 5.24):

* the inner multimodal model (``LlavaModel``) receives ``input_ids``: a forward pre-hook reads where the image
  placeholder tokens are and whether this call is a prefill (an image, an empty cache) or a decoding step;
* the vision tower: a forward pre-hook records the image layout (how many visual tokens each image gives, its
  token grid); forward hooks on its query/key projections capture what scores need (e.g. [CLS] attention of the
  feature layer LLaVA reads, ``vision_feature_layer``). transformers 5.24's ``generate()`` runs the tower before the
  multimodal model's forward, so both are kept until the next prefill picks them up;
* the language model (``LlamaModel`` & co.) is always called with keyword arguments (``inputs_embeds``,
  ``attention_mask``, ``position_ids``, the cache): its forward pre-hook shortens the sequence at the ``output``
  site, and rewrites the mask and positions of every later decoding step to match the shorter cache;
* the language model's decoder layers, for ``llm:k``: a forward hook on layer k drops visual tokens from its output,
  and pre-hooks on the later layers hand them the matching attention mask and rotary embeddings.

No forward body is copied.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InputMismatchError, TokenThinError, UnsupportedModelError
from .contract import Adapter
from .hf_vision import HFVisionAdapter
from .registry import register


def _language_layers(lm: nn.Module) -> nn.ModuleList:
    for holder in (lm, getattr(lm, "model", None)):
        layers = getattr(holder, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise UnsupportedModelError(f"cannot find the decoder layers of {type(lm).__name__}")


@dataclass
class TokenMap:
    """Where a prompt's image tokens (M of them, in prompt order) come from."""

    flat: torch.Tensor  # (M,) index into the vision tower's tokens, image-major, host-dropped tokens excluded
    newline: torch.Tensor  # (M,) bool: a structure token (LLaVA-NeXT row end) that is kept and never scored
    view: torch.Tensor  # (M,) 0: the image (or AnyRes base view), k >= 1: the k-th crop of an AnyRes image
    grids: list[tuple[int, int]]  # per sample: its image's token grid; (0, 0) for several images / AnyRes


def _walk(per: list[int], layout: list[tuple[int, tuple[int, int]]]) -> list[list[int]] | None:
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


def assign_images(
    per: list[int], layout: list[tuple[int, tuple[int, int]]] | None
) -> tuple[list[tuple[int, int]], list[list[int]]]:
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


class VLMAdapter(Adapter):
    """What every vision-language host provides; subclasses fill in the vision side. The work is done by
    :mod:`tokenthin.vlm` (``kind = "vlm"``); the encoder members of :class:`Adapter` are the vision tower's."""

    kind = "vlm"
    sites = frozenset({"output", "llm", "output+llm", "layers", "layer"})
    shift_positions = True  # 1-D rotary positions: a shorter prompt is numbered 0..T'-1 at the output site
    vision: HFVisionAdapter | None = None  # a ViT-like tower whose attention tokenthin can score, or None
    feature_layer = 0  # vision layer whose output the language model reads (ReduceInput.layer)
    vision_layers = 0
    drops_protected = 0  # leading tokens ([CLS]) the host drops from each image's features
    needs_projected = False  # the runtime keeps the projector's output for token_map()

    def __init__(self, top: nn.Module, root: nn.Module, vision_root: nn.Module) -> None:
        self.top, self.root, self.vision_root = top, root, vision_root
        cfg = root.config
        self.config = cfg
        self.family = getattr(cfg, "model_type", type(root).__name__)
        self.lm: nn.Module = root.language_model
        self.lm_layers = list(_language_layers(self.lm))
        self.image_token_id = int(cfg.image_token_id if hasattr(cfg, "image_token_id") else cfg.image_token_index)
        tcfg = getattr(cfg, "text_config", cfg)
        attn = self.lm_layers[0].self_attn
        self.lm_heads = int(tcfg.num_attention_heads)
        self.lm_kv_heads = int(getattr(tcfg, "num_key_value_heads", None) or self.lm_heads)
        self.lm_head_dim = int(getattr(attn, "head_dim", tcfg.hidden_size // self.lm_heads))
        self.lm_scale = float(getattr(attn, "scaling", self.lm_head_dim**-0.5))
        self.lm_config = tcfg

    def layout(self, args: tuple, kwargs: dict[str, Any]) -> list[tuple[int, tuple[int, int]]]:
        """From the vision tower's call: (visual tokens, token grid (h, w)) of every image, in prompt order."""
        raise NotImplementedError

    def token_map(self, rows: torch.Tensor, per: list[int], rt: Any) -> TokenMap:
        """Map the prompt's image-token embeddings ``rows`` (M, D) to the vision tower's tokens. Default: the
        features were scattered in image-major order, one image after another, nothing re-packed."""
        grids, imgs = assign_images(per, rt._layout)
        start = [0]
        for t, _ in rt._layout:
            start.append(start[-1] + t)
        flat = torch.cat([torch.arange(start[img], start[img + 1], device=rows.device) for g in imgs for img in g])
        zeros = torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device)
        return TokenMap(flat, zeros.bool(), zeros, grids)

    # ----- language-model attention, for scores inside the LLM -----
    def lm_qk_modules(self, i: int) -> tuple[nn.Module, nn.Module]:
        att = self.lm_layers[i].self_attn
        return att.q_proj, att.k_proj

    def rope(self, i: int, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, which: str) -> torch.Tensor:
        """Layer i's queries (``which="q"``, (B, H, T, d)) or keys ("k", (B, KV, T, d)) as its attention sees them:
        per-head norm where the layer has one (Qwen3-style), then the layer module's own rotary function."""
        att = self.lm_layers[i].self_attn
        norm = getattr(att, f"{which}_norm", None)
        if isinstance(norm, nn.Module):
            t = norm(t)
        mod = sys.modules[type(att).__module__]
        if cos.dim() == 4 and hasattr(mod, "apply_multimodal_rotary_pos_emb"):  # Qwen2-VL before transformers 5.2x
            sec = (getattr(self.lm_config, "rope_scaling", None) or {}).get("mrope_section") or (
                getattr(self.lm_config, "rope_parameters", None) or {}
            ).get("mrope_section")
            return mod.apply_multimodal_rotary_pos_emb(t, t, cos, sin, sec)[0]
        return mod.apply_rotary_pos_emb(t, t, cos, sin)[0]

    @property
    def num_layers_reduced(self) -> int:
        return len(self.lm_layers)

    def site_names(self) -> list[str]:
        return ["output", *[f"llm:{i}" for i in range(len(self.lm_layers) - 1)]]

    def describe(self) -> dict[str, Any]:
        return {
            "vision_layers": self.vision_layers,
            "vision_feature_layer": self.feature_layer,
            "vision_signals": self.vision is not None,
            "language_layers": len(self.lm_layers),
        }

    def touched(self) -> list[str]:
        names = {m: n for n, m in self.top.named_modules()}
        return [
            f"{names[self.root] or type(self.root).__name__} (pre/post hooks: find image tokens, open/close a call)",
            f"{names[self.vision_root]} (pre-hook: image layout; query/key capture where a method needs scores)",
            f"{names[self.lm]} (pre-hook: shorter prompt at 'output'; mask/positions of every decoding step)",
            f"{names[self.lm]} layers k.. (for 'llm:k': output hook at k, mask/rotary pre-hooks after k)",
        ]


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

    def layout(self, args: tuple, kwargs: dict[str, Any]) -> list[tuple[int, tuple[int, int]]]:
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
    ports of VisionZip and FasterVLM that prune the visual features and keep the layout tokens. ``extras["view"]``
    tells methods which view a token belongs to (0: the base view, k: the k-th crop)."""

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

    def token_map(self, rows: torch.Tensor, per: list[int], rt: Any) -> TokenMap:
        proj = rt._projected
        if proj is None:
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
        return TokenMap(flat=flat, newline=newline, view=view, grids=[(0, 0)] * len(per))


@register
class HFQwen2VLAdapter(VLMAdapter):
    name = "hf_qwen2vl"
    priority = 30
    sites = frozenset({"output", "llm", "output+llm"})  # the fused, packed tower: no sites or signals inside it
    signals = frozenset()
    """Qwen2-VL / Qwen2.5-VL: a patch-merging vision tower (no [CLS]) and multimodal rotary positions (temporal,
    height, width). Kept visual tokens keep their original 3-D positions at every site, so a shorter prompt is
    *not* renumbered (the positions of the text after the image and of generated tokens stay as the model computed
    them from the full prompt). The tower's attention is not captured (fused qkv, packed images): methods here
    read the visual tokens themselves or the language model's attention."""

    families = (
        "Hugging Face Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration (and their *Model), "
        "with generate() and its KV cache"
    )
    shift_positions = False

    def __init__(self, top: nn.Module, root: nn.Module) -> None:
        super().__init__(top, root, root.visual)
        vcfg = self.config.vision_config
        self.merge = int(getattr(vcfg, "spatial_merge_size", 2))
        blocks = getattr(root.visual, "blocks", None)
        self.vision_layers = len(blocks) if isinstance(blocks, nn.ModuleList) else 1
        self.feature_layer = self.vision_layers - 1

    @classmethod
    def detect(cls, model: nn.Module) -> HFQwen2VLAdapter | None:
        for m in model.modules():
            if not all(isinstance(getattr(m, a, None), nn.Module) for a in ("visual", "language_model")):
                continue
            cfg = getattr(m, "config", None)
            vcfg = getattr(cfg, "vision_config", None)
            if vcfg is None or not hasattr(vcfg, "spatial_merge_size") or not hasattr(cfg, "image_token_id"):
                continue
            return cls(model, m)
        return None

    def layout(self, args: tuple, kwargs: dict[str, Any]) -> list[tuple[int, tuple[int, int]]]:
        thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if not isinstance(thw, torch.Tensor):
            raise UnsupportedModelError("the Qwen2-VL vision tower was called without grid_thw")
        out = []
        for t, h, w in thw.tolist():
            gh, gw = h // self.merge, w // self.merge
            out.append((t * gh * gw, (gh, gw)))
        return out
