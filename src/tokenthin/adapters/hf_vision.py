"""Hugging Face ViT-like vision encoders: ViT, DeiT, DINOv2 (with and without registers), CLIP and SigLIP vision
towers, also inside their composite models (``CLIPModel``, ``SiglipModel``, ``*ForImageClassification``).

Seams (transformers 5.x, checked on 5.23): the encoder runs ``hidden_states = layer(hidden_states, attention_mask,
**kwargs)`` and every attention implementation adds ``attention_mask`` to its logits. A forward pre-hook on each
layer hands it the additive key bias (log token size, large negative for padding), a forward hook on a layer
replaces its output by the reduced tokens, and forward hooks on the query/key projections capture what scores
need. No forward body is copied. transformers 4.x is not supported: its ViT/DINOv2 layers take no attention mask.

SigLIP's attention-pooling head (``nn.MultiheadAttention``) receives the same key bias through its ``attn_mask``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..flops import EncoderDims
from .base import Adapter


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


def _layer_list(m: nn.Module) -> nn.ModuleList | None:
    enc = getattr(m, "encoder", None)
    for holder, attr in ((enc, "layer"), (enc, "layers"), (m, "layers")):
        ml = getattr(holder, attr, None) if holder is not None else None
        if isinstance(ml, nn.ModuleList) and len(ml) > 0:
            return ml
    return None


def _attention(layer: nn.Module) -> nn.Module:
    att = getattr(layer, "attention", None) or getattr(layer, "self_attn", None)
    if att is None:
        raise AttributeError("layer has no attention module")
    return att


class HFVisionAdapter(Adapter):
    families = (
        "Hugging Face ViTModel/ViTForImageClassification, DeiTModel, Dinov2Model (with and without registers), "
        "CLIPVisionModel and the image tower of CLIPModel, SiglipVisionModel/SiglipModel (transformers 5.x)"
    )

    def __init__(self, top: nn.Module, root: nn.Module, layers: nn.ModuleList) -> None:
        self.top = top
        self.root = root
        self.layers = list(layers)
        cfg = root.config
        self.config = cfg
        self.family = getattr(cfg, "model_type", type(root).__name__)
        emb = root.embeddings
        has_cls = getattr(emb, "cls_token", None) is not None or getattr(emb, "class_embedding", None) is not None
        self.num_protected = (
            int(has_cls)
            + int(getattr(emb, "distillation_token", None) is not None)
            + int(getattr(cfg, "num_register_tokens", 0) or 0)
        )
        self.num_heads = int(cfg.num_attention_heads)
        self.hidden = int(cfg.hidden_size)
        att = _attention(self.layers[0])
        self.head_dim = int(getattr(att, "head_dim", self.hidden // self.num_heads))
        self.scale = float(getattr(att, "scaling", getattr(att, "scale", self.head_dim**-0.5)))
        self.patch = _pair(cfg.patch_size)
        self.image_size = _pair(cfg.image_size)
        self._root_params = set(inspect.signature(root.forward).parameters)
        mlp = self.layers[0].mlp
        if hasattr(mlp, "gate_proj"):
            mlp_hidden, mats = mlp.gate_proj.out_features, 3
        else:
            mlp_hidden, mats = mlp.fc1.out_features, 2
        head, head_mlp = "none", 0
        if getattr(root, "pooler", None) is not None and hasattr(root.pooler, "dense"):
            head = "dense"
        if getattr(root, "use_head", False) and getattr(root, "head", None) is not None:
            head, head_mlp = "map", root.head.mlp.fc1.out_features
        self.dims = EncoderDims(
            hidden=self.hidden,
            mlp_hidden=mlp_hidden,
            mlp_mats=mats,
            num_layers=len(self.layers),
            patch=self.patch,
            channels=int(getattr(cfg, "num_channels", 3)),
            num_protected=self.num_protected,
            head=head,
            head_mlp_hidden=head_mlp,
        )

    @classmethod
    def detect(cls, model: nn.Module) -> HFVisionAdapter | None:
        for m in model.modules():
            emb = getattr(m, "embeddings", None)
            if emb is None or getattr(m, "config", None) is None:
                continue
            if not (hasattr(emb, "patch_embeddings") or hasattr(emb, "patch_embedding")):
                continue
            layers = _layer_list(m)
            if layers is None:
                continue
            try:
                att = _attention(layers[0])
            except AttributeError:
                continue
            if hasattr(att, "q_proj") or hasattr(getattr(att, "attention", None), "query"):
                return cls(model, m, layers)
        return None

    def qk_modules(self, i: int) -> tuple[nn.Module, nn.Module]:
        att = _attention(self.layers[i])
        if hasattr(att, "q_proj"):
            return att.q_proj, att.k_proj
        return att.attention.query, att.attention.key

    def pixel_values(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        pv = kwargs.get("pixel_values", args[0] if args else None)
        if not isinstance(pv, torch.Tensor):
            raise TypeError("expected pixel_values")
        return pv

    def with_pixel_values(self, args: tuple, kwargs: dict[str, Any], pv: torch.Tensor) -> tuple[tuple, dict]:
        kwargs = dict(kwargs)
        if "pixel_values" in kwargs or not args:
            kwargs["pixel_values"] = pv
        else:
            args = (pv, *args[1:])
        if "interpolate_pos_encoding" in self._root_params:
            kwargs["interpolate_pos_encoding"] = True
        return args, kwargs

    def extra_hooks(self, runtime: Any) -> list[torch.utils.hooks.RemovableHandle]:
        head = getattr(self.root, "head", None) if getattr(self.root, "use_head", False) else None
        mha = getattr(head, "attention", None)
        if not isinstance(mha, nn.MultiheadAttention):
            return []
        heads = mha.num_heads

        def add_bias(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            bias = runtime.current_bias()
            if bias is None:
                return None
            q = args[0] if args else kwargs["query"]
            b, n = bias.shape
            mask = bias.to(q.dtype).view(b, 1, 1, n).expand(b, heads, q.shape[1], n)
            kwargs = dict(kwargs)
            kwargs["attn_mask"] = mask.reshape(b * heads, q.shape[1], n)
            return args, kwargs

        return [mha.register_forward_pre_hook(add_bias, with_kwargs=True)]

    def touched(self) -> list[str]:
        names = {m: n for n, m in self.top.named_modules()}
        out = [f"{names[self.root] or type(self.root).__name__} (pre/post hooks: open and close a call)"]
        for i, layer in enumerate(self.layers):
            q, k = self.qk_modules(i)
            out.append(f"{names[layer]} (mask pre-hook; output hook at reduction points)")
            out.append(f"{names[q]}, {names[k]} (output capture where a method needs scores)")
        return out
