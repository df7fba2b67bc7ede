"""Hugging Face vision-language models whose language model reads the visual tokens in its own sequence:
``LlavaForConditionalGeneration`` / ``LlavaModel`` (and look-alikes: a module with ``vision_tower``,
``multi_modal_projector`` and ``language_model``, an ``image_token_id`` in its config).

The adapter only says where things are; :mod:`tokenthin.vlm` does the work. Seams (transformers 4.57 - 5.24):

* the inner multimodal model (``LlavaModel``) receives ``input_ids``: a forward pre-hook reads where the image
  placeholder tokens are and whether this call is a prefill (an image, an empty cache) or a decoding step;
* the vision tower's query/key projections: forward hooks capture what scores need (e.g. [CLS] attention of the
  feature layer LLaVA reads, ``vision_feature_layer``);
* the language model (``LlamaModel`` & co.) is always called with keyword arguments (``inputs_embeds``,
  ``attention_mask``, ``position_ids``, the cache): its forward pre-hook shortens the sequence at the ``output``
  site, and rewrites the mask and positions of every later decoding step to match the shorter cache;
* the language model's decoder layers, for ``llm:k``: a forward hook on layer k drops visual tokens from its output,
  and pre-hooks on the later layers hand them the matching attention mask and rotary embeddings.

No forward body is copied.
"""

from __future__ import annotations

import sys

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


class HFLlavaAdapter:
    """LLaVA-style host: vision tower -> projector -> image features scattered into the language model's input."""

    families = (
        "Hugging Face LlavaForConditionalGeneration / LlavaModel (CLIP or SigLIP tower, Llama/Mistral/Qwen2 "
        "language model), with generate() and its KV cache"
    )
    kind = "vlm"

    def __init__(self, top: nn.Module, root: nn.Module) -> None:
        self.top, self.root = top, root
        cfg = root.config
        self.config = cfg
        self.family = getattr(cfg, "model_type", type(root).__name__)
        vision = HFVisionAdapter.detect(root.vision_tower)
        if vision is None:
            raise UnsupportedModelError(f"cannot read the vision tower {type(root.vision_tower).__name__}")
        self.vision = vision
        self.lm: nn.Module = root.language_model
        self.lm_layers = list(_language_layers(self.lm))
        self.image_token_id = int(cfg.image_token_id if hasattr(cfg, "image_token_id") else cfg.image_token_index)
        layer = getattr(cfg, "vision_feature_layer", -1)
        if not isinstance(layer, int):
            raise UnsupportedModelError(
                f"vision_feature_layer={layer!r}: several feature layers are not supported yet; use one layer"
            )
        n = len(vision.layers)
        # hidden_states[j] is the output of encoder layer j - 1 (index 0: the embeddings)
        self.feature_layer = (layer % (n + 1)) - 1
        if self.feature_layer < 0:
            raise UnsupportedModelError("vision_feature_layer selects the embeddings; nothing to score there")
        strategy = getattr(cfg, "vision_feature_select_strategy", "default")
        self.drops_protected = vision.num_protected if strategy == "default" else 0
        self.grid = (vision.image_size[0] // vision.patch[0], vision.image_size[1] // vision.patch[1])
        self.tokens_per_image = self.grid[0] * self.grid[1] + (vision.num_protected - self.drops_protected)
        self.shift_positions = True  # 1-D rotary positions: a shorter prompt is numbered 0..T'-1
        tcfg = getattr(cfg, "text_config", cfg)
        attn = self.lm_layers[0].self_attn
        self.lm_heads = int(tcfg.num_attention_heads)
        self.lm_kv_heads = int(getattr(tcfg, "num_key_value_heads", None) or self.lm_heads)
        self.lm_head_dim = int(getattr(attn, "head_dim", tcfg.hidden_size // self.lm_heads))
        self.lm_scale = float(getattr(attn, "scaling", self.lm_head_dim**-0.5))
        self.lm_config = tcfg

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
        fn = sys.modules[type(att).__module__].apply_rotary_pos_emb
        return fn(t, t, cos, sin)[0]

    def touched(self) -> list[str]:
        names = {m: n for n, m in self.top.named_modules()}
        return [
            f"{names[self.root] or type(self.root).__name__} (pre/post hooks: find image tokens, open/close a call)",
            f"{names[self.lm]} (pre-hook: shorter prompt at 'output'; mask/positions of every decoding step)",
            "vision tower query/key projections (output capture where a method needs scores)",
            "language-model layers k.. (for 'llm:k': output hook at k, mask/rotary pre-hooks after k)",
        ]
