"""Hugging Face ViT-like vision encoders: ViT, DeiT, DINOv2 (with and without registers), CLIP and SigLIP vision
towers, also inside their composite models (``CLIPModel``, ``SiglipModel``, ``*ForImageClassification``).

Seams (transformers 5.9+ ViT/DeiT, 5.18+ DINOv2, every CLIP/SigLIP): the encoder runs ``hidden_states =
layer(hidden_states, attention_mask, **kwargs)`` and every attention implementation adds ``attention_mask`` to its
logits. A forward pre-hook on each
layer hands it the additive key bias (log token size, large negative for padding), a forward hook on a layer
replaces its output by the reduced tokens, and forward hooks on the query/key projections capture what scores
need. No forward body is copied. Older layers (4.57 - 5.17) take no additive mask: there the
bias goes through a registered attention function instead (:class:`_BiasedAttention`).

SigLIP's attention-pooling head (``nn.MultiheadAttention``) receives the same key bias through its ``attn_mask``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputMismatchError
from ..flops import EncoderDims
from ..ops import assign
from .contract import Adapter, BiasSource, Layout, Sink, capture_outputs, pre_hook_bias, touched_layers
from .registry import register


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


@register
class HFVisionAdapter(Adapter):
    name = "hf_vision"
    priority = 10
    sites = frozenset({"input", "layers", "layer", "output", "block"})
    families = (
        "Hugging Face ViTModel/ViTForImageClassification, DeiTModel, Dinov2Model (with and without registers), "
        "CLIPVisionModel and the image tower of CLIPModel, SiglipVisionModel/SiglipModel (transformers 4.57 and 5.x)"
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
        layer0 = self.layers[0]
        mlp = getattr(layer0, "mlp", None)
        if hasattr(mlp, "gate_proj"):
            mlp_hidden, mats = mlp.gate_proj.out_features, 3
        elif hasattr(mlp, "weights_in"):  # Dinov2SwiGLUFFN before transformers 5.18: fused gate+up
            mlp_hidden, mats = mlp.weights_in.out_features // 2, 3
        elif mlp is not None:
            mlp_hidden, mats = mlp.fc1.out_features, 2
        else:  # ViT/DeiT before transformers 5.9: layer.intermediate.dense / layer.output.dense
            mlp_hidden, mats = layer0.intermediate.dense.out_features, 2
        # transformers 5.9 (ViT, DeiT) / 5.18 (DINOv2) and CLIP/SigLIP: the layer takes the additive mask.
        # Older layers hard-code None (5.x) or take a multiplicative head_mask (4.x): bias via the attention fn.
        self.layer_takes_mask = "attention_mask" in inspect.signature(layer0.forward).parameters
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
        self.default_layout = self.layout_for(self.image_size)

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

    # ----- tokens -----
    def layout_for(self, size: tuple[int, int] | int | None) -> Layout:
        if size is None:
            return self.default_layout
        hw = _pair(size)
        return Layout(protected=self.num_protected, grid=(hw[0] // self.patch[0], hw[1] // self.patch[1]))

    def call_layout(self, args: tuple, kwargs: dict[str, Any]) -> tuple[Layout, int, torch.Tensor]:
        pv = self.pixel_values(args, kwargs)
        if not pv.is_floating_point():
            raise InputMismatchError(
                f"pixel_values has dtype {pv.dtype}; convert images to float and normalise them first "
                "(e.g. with the model's image processor)"
            )
        return self.layout_for((pv.shape[-2], pv.shape[-1])), pv.shape[0], pv

    @property
    def input_patch(self) -> int:
        return self.patch[0]

    def shrink_input(self, args: tuple, kwargs: dict[str, Any], size: tuple[int, int]) -> tuple[tuple, dict]:
        pv = self.pixel_values(args, kwargs)
        small = F.interpolate(pv.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        return self.with_pixel_values(args, kwargs, small.to(pv.dtype))

    def pixel_values(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        pv = kwargs.get("pixel_values", args[0] if args else None)
        if not isinstance(pv, torch.Tensor):
            raise InputMismatchError("expected pixel_values (a float tensor of images)")
        return pv

    def with_pixel_values(self, args: tuple, kwargs: dict[str, Any], pv: torch.Tensor) -> tuple[tuple, dict]:
        """Call arguments with the image replaced (and position interpolation switched on where needed)."""
        kwargs = dict(kwargs)
        if "pixel_values" in kwargs or not args:
            kwargs["pixel_values"] = pv
        else:
            args = (pv, *args[1:])
        if "interpolate_pos_encoding" in self._root_params:
            kwargs["interpolate_pos_encoding"] = True
        return args, kwargs

    # ----- layers and signals -----
    def bias_hooks(self, rt: BiasSource) -> list[Any]:
        """transformers 5.9+ ViT/DeiT, 5.18+ DINOv2, CLIP/SigLIP: ``layer(hidden_states, attention_mask, ...)``
        adds the mask to the logits, so a pre-hook passes the bias; older layers: a registered attention function."""
        if self.layer_takes_mask:
            return pre_hook_bias(self.layers, rt, "attention_mask", 1, "attention_mask")
        return [_BiasedAttention(self.config, rt)]

    def capture_qk(self, i: int, want_q: bool, sink: Sink) -> list[Any]:
        return capture_outputs(*self.qk_modules(i), want_q, sink)

    # ----- consumers -----
    def consumer_hooks(self, rt: BiasSource) -> list[Any]:
        """SigLIP's attention-pooling head (``nn.MultiheadAttention``) gets the key bias through ``attn_mask``."""
        head = getattr(self.root, "head", None) if getattr(self.root, "use_head", False) else None
        mha = getattr(head, "attention", None)
        if not isinstance(mha, nn.MultiheadAttention):
            return []
        heads = mha.num_heads

        def add_bias(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            bias = rt.current_bias()
            if bias is None:
                return None
            q = args[0] if args else kwargs["query"]
            b, n = bias.shape
            mask = bias.to(q.dtype).view(b, 1, 1, n).expand(b, heads, q.shape[1], n)
            kwargs = dict(kwargs)
            kwargs["attn_mask"] = mask.reshape(b * heads, q.shape[1], n)
            return args, kwargs

        return [mha.register_forward_pre_hook(add_bias, with_kwargs=True)]

    def finish(self, out: Any, source: torch.Tensor | None, unmerge: bool) -> Any:
        return unmerge_hidden(out, source, unmerge)

    def describe(self) -> dict[str, Any]:
        return {"patch": self.patch, "image_size": self.image_size}

    def touched(self) -> list[str]:
        return touched_layers(
            self.top, self.root, self.layers, self.qk_modules, "mask pre-hook; output hook at reduction points"
        )


def unmerge_hidden(out: Any, source: torch.Tensor | None, unmerge: bool) -> Any:
    """A Hugging Face model output with ``last_hidden_state`` put back on every original token (``unmerge=True``);
    None (keep the output) otherwise."""
    if unmerge and source is not None and hasattr(out, "last_hidden_state"):
        out["last_hidden_state"] = assign.unmerge(out.last_hidden_state, source)
        return out
    return None


class _BiasedAttention:
    """Key-bias seam for layers that take no additive mask: routes the model's attention calls through a
    registered attention function that adds the runtime's current bias, then calls the original function.
    ``remove()`` restores the config and unregisters, like a hook handle."""

    def __init__(self, config: Any, runtime: BiasSource) -> None:
        import sys

        import transformers
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        from ..errors import TokenThinError

        self.config, self.orig = config, config._attn_implementation or "eager"
        self.name = f"tokenthin_{id(self):x}"
        # 4.x ViT/DeiT/DINOv2 eager multiplies the probabilities by a head mask; SigLIP's eager of the same
        # release is the identical computation with the additive mask
        legacy = int(transformers.__version__.split(".")[0]) < 5
        table = ALL_ATTENTION_FUNCTIONS

        def base(module: nn.Module):
            if self.orig != "eager":
                return table[self.orig]
            return sys.modules[type(module).__module__].eager_attention_forward

        def attend(module, query, key, value, attention_mask, *args, **kwargs):
            bias = runtime.current_bias()
            fn = base(module)
            if bias is not None:
                if attention_mask is not None:
                    raise TokenThinError("tokenthin cannot combine a caller-supplied head_mask with merging")
                attention_mask = bias.to(query.dtype).view(bias.shape[0], 1, 1, -1)
                if legacy and self.orig == "eager":
                    from transformers.models.siglip import modeling_siglip

                    fn = modeling_siglip.eager_attention_forward
            return fn(module, query, key, value, attention_mask, *args, **kwargs)

        table[self.name] = attend
        self._table = table
        config._attn_implementation = self.name

    def remove(self) -> None:
        if self.config._attn_implementation == self.name:
            self.config._attn_implementation = self.orig
        if self.name in self._table:
            del self._table[self.name]
