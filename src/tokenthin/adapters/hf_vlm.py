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
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .hf_vision import HFVisionAdapter


def _language_layers(lm: nn.Module) -> nn.ModuleList:
    for holder in (lm, getattr(lm, "model", None)):
        layers = getattr(holder, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise UnsupportedModelError(f"cannot find the decoder layers of {type(lm).__name__}")


class VLMAdapter:
    """What every vision-language host provides; subclasses fill in the vision side."""

    families: str
    kind = "vlm"
    shift_positions = True  # 1-D rotary positions: a shorter prompt is numbered 0..T'-1 at the output site
    vision: HFVisionAdapter | None = None  # a ViT-like tower whose attention tokenthin can score, or None
    feature_layer = 0  # vision layer whose output the language model reads (ReduceInput.layer)
    vision_layers = 0
    drops_protected = 0  # leading tokens ([CLS]) the host drops from each image's features

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

    def touched(self) -> list[str]:
        names = {m: n for n, m in self.top.named_modules()}
        return [
            f"{names[self.root] or type(self.root).__name__} (pre/post hooks: find image tokens, open/close a call)",
            f"{names[self.vision_root]} (pre-hook: image layout; query/key capture where a method needs scores)",
            f"{names[self.lm]} (pre-hook: shorter prompt at 'output'; mask/positions of every decoding step)",
            f"{names[self.lm]} layers k.. (for 'llm:k': output hook at k, mask/rotary pre-hooks after k)",
        ]


class HFLlavaAdapter(VLMAdapter):
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


class HFQwen2VLAdapter(VLMAdapter):
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
